"""Atomic blocks: a BTT-like layout in which every sector write is all or nothing.

Memory has no sector atomicity: a power cut in the middle of a 4 KiB write can leave a block
half old and half new. On a region made with ``pmemblk create --atomic-blocks`` a block is never
written in place. The client writes the new data to a free block of its own, makes it
persistent, records the move in its lane's log (the *flog*), makes that persistent, and only
then points the block's map entry at the new data with one 8-byte atomic update (RDMA
compare-and-swap, or the target's own compare-and-store over TCP). The block it replaced is the
lane's next free block. A reader follows the map, so it sees the old block or the new one,
never a mix. This is the design of the kernel's ``nd_btt`` and PMDK's libpmemblk, done over
one-sided RDMA.

Layout of the data area (offsets from its start; all little-endian; docs/protocol.md)::

    0            info block (INFO, CRC32)                 4 KiB
    flog_offset  lanes x 2 slots of FLOG_SLOT bytes        rounded up to 4 KiB
    map_offset   external blocks x 8-byte map entries      rounded up to 4 KiB
    data_offset  internal blocks (external + lanes) x sector size

A map entry is ``seq << 32 | block``: the physical block holding the logical one, and a count
of the times it was moved, so that a reader that reads an entry, the block, then the same entry
again knows that the block did not change under it. A flog slot records one move (logical
block, old entry, new entry) with a sequence number and a CRC; a lane's current record is its
valid slot with the newer sequence, and a new one is written to the other slot, so a torn flog
write leaves the previous record. A lane's free block is the new entry's block when the move
did not happen, else the old one's.

Recovery (``recover``) runs where the region is mapped, when no writer is connected: when the
target starts and when its last writer leaves. It decides each lane's free block and writes it
back as a *settled* record (old = new = the free block), so it is idempotent. Each writer gets
lanes of its own (``LANES_PER_WRITER``) in its WELCOME, so writers never share a free block.
"""

from __future__ import annotations

import array
import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LayoutError

log = logging.getLogger(__name__)

INFO_MAGIC = b"PMBATOM\0"
INFO_VERSION = 1
INFO = struct.Struct("<8sHHIIIQQQQQII")
INFO_SIZE = INFO.size
FLOG_SLOT = struct.Struct("<QQQII")  # logical block, old entry, new entry, seq, CRC32
FLOG_LANE = 2 * FLOG_SLOT.size
ENTRY = 8
PAGE = 4096
#: Lanes a region has unless ``create --lanes`` says otherwise, and each writer's share.
DEFAULT_LANES = 64
LANES_PER_WRITER = 8
MAX_LANES = 4096
BLOCK_MASK = 0xFFFF_FFFF
SECTOR_SIZES = (512, 4096)

assert INFO_SIZE == 72 and FLOG_SLOT.size == 32


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def entry(block: int, seq: int) -> int:
    return ((seq & BLOCK_MASK) << 32) | block


def entry_block(raw: int) -> int:
    return raw & BLOCK_MASK


def next_entry(old: int, block: int) -> int:
    """The entry that moves a logical block from ``old`` to physical ``block``."""
    seq = (old >> 32) + 1
    return entry(block, seq if seq <= BLOCK_MASK else 1)


@dataclass(frozen=True)
class Info:
    """The geometry, from the info block at the start of the data area."""

    sector_size: int
    lanes: int
    external_blocks: int
    flog_offset: int
    map_offset: int
    data_offset: int

    @property
    def internal_blocks(self) -> int:
        return self.external_blocks + self.lanes

    @property
    def export_size(self) -> int:
        return self.external_blocks * self.sector_size

    @property
    def end(self) -> int:
        return self.data_offset + self.internal_blocks * self.sector_size

    def map_at(self, lba: int) -> int:
        return self.map_offset + lba * ENTRY

    def block_at(self, block: int) -> int:
        return self.data_offset + block * self.sector_size

    def slot_at(self, lane: int, slot: int) -> int:
        return self.flog_offset + lane * FLOG_LANE + slot * FLOG_SLOT.size

    def encode(self) -> bytes:
        body = INFO.pack(INFO_MAGIC, INFO_VERSION, INFO_SIZE, self.sector_size, self.lanes, 0,
                         self.external_blocks, self.internal_blocks, self.flog_offset,
                         self.map_offset, self.data_offset, 0, 0)
        return body[:64] + struct.pack("<II", zlib.crc32(body[:64]), 0)

    @classmethod
    def decode(cls, raw: bytes, area_size: int) -> Info:
        """Parse and check an info block against the data area it describes."""
        if len(raw) < INFO_SIZE:
            raise LayoutError(f"atomic-blocks info truncated: {len(raw)} of {INFO_SIZE} bytes")
        (magic, version, size, sector, lanes, reserved, external, internal, flog, map_off,
         data, crc, reserved2) = INFO.unpack_from(raw)
        if magic != INFO_MAGIC:
            raise LayoutError(f"no atomic-blocks info (magic is {magic!r})")
        if version != INFO_VERSION or size != INFO_SIZE:
            raise LayoutError(f"atomic-blocks info version {version} (size {size}) is not "
                              f"supported (this pmemblk reads version {INFO_VERSION})")
        if zlib.crc32(raw[:64]) != crc:
            raise LayoutError("atomic-blocks info checksum mismatch: the info block is corrupt")
        if reserved or reserved2:
            raise LayoutError("atomic-blocks info reserved field is not zero")
        if sector not in SECTOR_SIZES and not (512 <= sector <= 65536
                                               and sector & (sector - 1) == 0):
            raise LayoutError(f"atomic-blocks sector size {sector} is invalid")
        if not 1 <= lanes <= MAX_LANES or internal != external + lanes:
            raise LayoutError(f"atomic-blocks lanes {lanes} (blocks {external}/{internal}) "
                              "are inconsistent")
        info = cls(sector, lanes, external, flog, map_off, data)
        if not (external >= 1 and internal <= BLOCK_MASK and flog == PAGE
                and map_off >= flog + lanes * FLOG_LANE and map_off % PAGE == 0
                and data >= map_off + external * ENTRY and data % PAGE == 0
                and data % sector == 0 and info.end <= area_size):
            raise LayoutError(f"atomic-blocks geometry does not fit the {area_size}-byte data "
                              "area: the info block is corrupt")
        return info


def geometry(area_size: int, sector_size: int, lanes: int = DEFAULT_LANES) -> Info:
    """The largest layout of ``sector_size`` blocks with ``lanes`` lanes in ``area_size``."""
    if sector_size not in SECTOR_SIZES:
        raise LayoutError(f"--atomic-blocks sector size {sector_size} is invalid: use "
                          f"{' or '.join(map(str, SECTOR_SIZES))} (--block-size)")
    if not 1 <= lanes <= MAX_LANES:
        raise LayoutError(f"--lanes {lanes} is out of range 1..{MAX_LANES}")
    flog = PAGE
    map_off = _round_up(flog + lanes * FLOG_LANE, PAGE)
    align = max(PAGE, sector_size)
    external = max(0, (area_size - map_off - lanes * sector_size - 2 * align)
                   // (sector_size + ENTRY))
    while external > 0:
        data = _round_up(map_off + external * ENTRY, align)
        if data + (external + lanes) * sector_size <= area_size:
            break
        external -= 1
    if external <= 0:
        raise LayoutError(f"{area_size} bytes is too small for atomic blocks of {sector_size} "
                          f"bytes with {lanes} lanes")
    external = min(external, BLOCK_MASK - lanes)
    return Info(sector_size, lanes, external, flog, map_off,
                _round_up(map_off + external * ENTRY, align))


@dataclass(frozen=True)
class FlogRecord:
    lba: int
    old: int
    new: int
    seq: int

    @property
    def settled(self) -> bool:
        return self.old == self.new

    def encode(self) -> bytes:
        body = FLOG_SLOT.pack(self.lba, self.old, self.new, self.seq, 0)[:28]
        return body + struct.pack("<I", zlib.crc32(body))

    @staticmethod
    def decode(raw: bytes) -> FlogRecord | None:
        """The record in one slot, or None if it is empty or torn."""
        lba, old, new, seq, crc = FLOG_SLOT.unpack_from(raw)
        if seq == 0 or zlib.crc32(raw[:28]) != crc:
            return None
        return FlogRecord(lba, old, new, seq)


def newer(a: int, b: int) -> bool:
    """Whether sequence ``a`` comes after ``b`` (32-bit, wrapping)."""
    return 0 < (a - b) & BLOCK_MASK < 1 << 31


def current_record(raw_lane: bytes) -> tuple[int, FlogRecord] | None:
    """(slot, record) of a lane's current flog record, from its two slots' bytes."""
    found = [(i, r) for i in (0, 1)
             if (r := FlogRecord.decode(raw_lane[i * FLOG_SLOT.size:])) is not None]
    if not found:
        return None
    if len(found) == 2 and newer(found[0][1].seq, found[1][1].seq):
        return found[0]
    return found[-1]


def next_seq(seq: int) -> int:
    return seq + 1 if seq < BLOCK_MASK else 1


@dataclass
class Lane:
    """A lane as a writer uses it: its free block and where its next record goes."""

    index: int
    free: int
    slot: int  # the slot holding the current record: the next one goes to the other
    seq: int
    grant: int
    #: A move whose outcome is unknown (the connection failed in it): (lba, old, new).
    pending: tuple[int, int, int] | None = None

    def record(self, lba: int, old: int, new: int) -> tuple[int, bytes]:
        """The next record: (the slot it goes to, its bytes); ``recorded()`` once written."""
        seq = next_seq(self.seq)
        return 1 - self.slot, FlogRecord(lba, old, new, seq).encode()

    def recorded(self) -> None:
        self.slot, self.seq = 1 - self.slot, next_seq(self.seq)


def lane_from(info: Info, index: int, raw_lane: bytes, grant: int) -> Lane:
    """A writer's lane from its flog bytes, which recovery settled (old = new)."""
    cur = current_record(raw_lane)
    if cur is None or not cur[1].settled or entry_block(cur[1].new) >= info.internal_blocks:
        raise LayoutError(f"atomic-blocks lane {index} was not recovered (its flog record is "
                          f"{'torn' if cur is None else 'unsettled or out of range'})")
    slot, rec = cur
    return Lane(index, entry_block(rec.new), slot, rec.seq, grant)


# -- formatting and recovery, where the region is mapped --------------------------------------

class Area:
    """The data area of a mapped region, as ``format_area`` and ``recover`` use it: the
    region's read, write and persist, at offsets from ``base``."""

    def __init__(self, read: Callable[[int, int], bytes], write: Callable[[int, bytes], None],
                 persist: Callable[[int, int], None], base: int, size: int) -> None:
        self._read, self._write, self._persist = read, write, persist
        self.base, self.size = base, size

    def read(self, off: int, n: int) -> bytes:
        return self._read(self.base + off, n)

    def write(self, off: int, data: bytes) -> None:
        self._write(self.base + off, data)

    def persist(self, off: int, n: int) -> None:
        self._persist(self.base + off, n)


def format_area(area: Area, sector_size: int, lanes: int = DEFAULT_LANES) -> Info:
    """Lay out atomic blocks in an area: identity map, one settled free block per lane."""
    info = geometry(area.size, sector_size, lanes)
    flog = bytearray(info.map_offset - info.flog_offset)
    for lane in range(lanes):
        free = entry(info.external_blocks + lane, 0)
        rec = FlogRecord(0, free, free, 1).encode()
        flog[lane * FLOG_LANE:lane * FLOG_LANE + len(rec)] = rec
    area.write(info.flog_offset, bytes(flog))
    step = 1 << 17
    for first in range(0, info.external_blocks, step):
        last = min(first + step, info.external_blocks)
        area.write(info.map_at(first), array.array("Q", range(first, last)).tobytes())
    area.persist(info.flog_offset, info.data_offset - info.flog_offset)
    area.write(0, info.encode().ljust(PAGE, b"\0"))
    area.persist(0, PAGE)
    return info


def read_info(area: Area) -> Info:
    return Info.decode(area.read(0, INFO_SIZE), area.size)


@dataclass(frozen=True)
class Recovery:
    lanes: int
    #: Lanes whose last move was found done (its old block freed) or not (its new one).
    completed: int
    rolled_back: int


def recover(area: Area, info: Info | None = None) -> Recovery:
    """Settle every lane: decide its free block from its current record and the map, make
    the map entries of unsettled moves persistent, and write the free block back as a settled
    record. Only while no writer is connected. Idempotent."""
    info = read_info(area) if info is None else info
    raw = area.read(info.flog_offset, info.lanes * FLOG_LANE)
    records: list[tuple[int, FlogRecord]] = []
    for lane in range(info.lanes):
        cur = current_record(raw[lane * FLOG_LANE:(lane + 1) * FLOG_LANE])
        if cur is None:
            raise LayoutError(f"atomic-blocks lane {lane}: both flog slots are corrupt")
        rec = cur[1]
        if (rec.lba >= info.external_blocks or entry_block(rec.old) >= info.internal_blocks
                or entry_block(rec.new) >= info.internal_blocks):
            raise LayoutError(f"atomic-blocks lane {lane}: flog record out of range: {rec}")
        records.append(cur)
    frees: dict[int, int] = {}
    overtaken: list[int] = []
    for lane, (_, rec) in enumerate(records):
        if rec.settled:
            frees[lane] = entry_block(rec.new)
            continue
        now = int.from_bytes(area.read(info.map_at(rec.lba), ENTRY), "little")
        if now == rec.new:  # done: the old block is free
            frees[lane] = entry_block(rec.old)
        elif now == rec.old:  # never happened: the new block still is
            frees[lane] = entry_block(rec.new)
        else:  # someone moved the logical block since
            overtaken.append(lane)
    _decide_overtaken(area, info, records, frees, overtaken)
    done = sum(1 for lane, (_, rec) in enumerate(records)
               if not rec.settled and frees[lane] == entry_block(rec.old))
    undone = sum(1 for _, rec in records if not rec.settled) - done
    if len(set(frees.values())) != len(frees):  # decided before anything is written back
        raise LayoutError("atomic-blocks recovery found two lanes with the same free block: "
                          "the flog is corrupt")
    # A writer that left mid-move may have moved the map without persisting it: the entries
    # its lanes name are made persistent before their old blocks are free (a power cut after
    # the next writer reused one must not bring back an entry pointing at it).
    for lba in sorted({rec.lba for _, rec in records if not rec.settled}):
        area.persist(info.map_at(lba), ENTRY)
    for lane, (slot, rec) in enumerate(records):
        free = frees[lane]
        if not rec.settled:
            settled = FlogRecord(rec.lba, entry(free, 0), entry(free, 0), next_seq(rec.seq))
            off = info.slot_at(lane, 1 - slot)
            area.write(off, settled.encode())
            area.persist(off, FLOG_SLOT.size)
    result = Recovery(info.lanes, done, undone)
    if done or undone:
        log.info("atomic blocks: %d lanes settled after their last move, %d moves that never "
                 "happened rolled back (interrupted writes)", done, undone)
    return result


def _decide_overtaken(area: Area, info: Info, records: list[tuple[int, FlogRecord]],
                      frees: dict[int, int], lanes: list[int]) -> None:
    """The free blocks of ``lanes``, whose last move's logical block someone moved since.

    Every block is mapped or one lane's free block, so a lane's free block is whichever of
    its move's two blocks is neither mapped nor another lane's free block. Decided one lane
    at a time as the others' become known. A block only named in another lane's record
    proves nothing: that record may be older than the moves since (its block moved on)."""
    mapped: dict[int, bool] = {}

    def unmapped(block: int) -> bool:
        if block not in mapped:
            mapped[block] = _in_map(area, info, block)
        return not mapped[block]

    todo = list(lanes)
    while todo:
        left = []
        for lane in todo:
            rec = records[lane][1]
            taken = set(frees.values())
            free = [b for b in dict.fromkeys((entry_block(rec.old), entry_block(rec.new)))
                    if b not in taken and unmapped(b)]
            if not free:
                raise LayoutError(f"atomic-blocks lane {lane}: both blocks of its last move "
                                  f"are in use ({rec}): the flog is corrupt")
            if len(free) == 1:
                frees[lane] = free[0]
            else:
                left.append(lane)
        if len(left) == len(todo):
            raise LayoutError(f"atomic-blocks lanes {left}: which block of their last moves is "
                              "free cannot be told (each is mapped nowhere): the flog is corrupt")
        todo = left


#: How much of the map recovery reads at a time when it searches it.
MAP_CHUNK = 8 << 20


def _in_map(area: Area, info: Info, block: int) -> bool:
    """Whether any map entry points at ``block`` (a search in C, a chunk at a time)."""
    pattern = block.to_bytes(4, "little")
    total = info.external_blocks * ENTRY
    for start in range(0, total, MAP_CHUNK):
        mapped = area.read(info.map_offset + start, min(MAP_CHUNK, total - start))
        pos = mapped.find(pattern)
        while pos >= 0:
            if pos % ENTRY == 0:
                return True
            pos = mapped.find(pattern, pos + 1)
    return False
