"""On-media layout: a versioned, checksummed header at the start of the region.

Bytes 0..63 hold the immutable header (little-endian, CRC32 over bytes 0..55 stored at 56).
Bytes 64..71 hold the state word, written with one aligned 8-byte store so that a crash during
an update leaves either the old or the new word, never a torn header. The data area starts at
``data_offset`` (4 KiB aligned) and is ``data_size`` bytes, a multiple of ``block_size``.

    offset  size  field
    0       8     magic "PMEMBLK\\0"
    8       2     layout version (1; 2 when features are set)
    10      2     header size (64)
    12      4     block size
    16      16    region UUID
    32      8     data offset
    40      8     data size
    48      8     creation time (ns since the epoch)
    56      4     CRC32 of bytes 0..55
    60      4     features (version 2): bit 0 = atomic blocks (pmemblk.atomicblocks: the data
                  area holds a block map, and clients read and write through it)
    64      8     state word: bit 0 = clean shutdown, bits 8.. = times served
    72      16    boot id of the system that last opened the region to serve it (0: unknown)
    88      8     loss epoch: times the region was opened after an unclean stop in an earlier
                  boot, when writes that were never flushed may have been lost. One word:
                  the count in bits 0..31, the CRC32 of "loss epoch" and its 4 bytes in bits
                  32..63 (the prefix keeps an all-ones word from checking out; written
                  with one aligned store, so never torn; damage is seen, not believed)

The boot id tells a killed target from a lost machine: when a target process dies, every write
that reached the region's memory is still there (the page cache or the pmem and CPU caches
survive a process); only a reboot or power cut can lose unflushed writes. Reconnecting clients
compare the loss epoch to learn whether that happened while they were away (docs/security.md).

The loss epoch is not covered by the header's CRC (it changes), so it carries its own. A word
whose upper half is zero is the plain count earlier versions wrote, believed only when it is no
more than the times served (each increment came with a serve). At its maximum, 2^32 - 1, a
region that needs another increment is refused rather than left at a value clients have seen.
"""

from __future__ import annotations

import struct
import time
import uuid
import zlib
from dataclasses import dataclass

from . import atomicblocks
from .errors import LayoutError
from .pmem import PmemRegion

MAGIC = b"PMEMBLK\0"
LAYOUT_VERSION = 1
#: The version a header with features has (a pmemblk that reads only version 1 refuses it).
FEATURES_VERSION = 2
FEATURE_ATOMIC_BLOCKS = 1 << 0
HEADER_STRUCT = struct.Struct("<8sHHI16sQQQII")
HEADER_SIZE = HEADER_STRUCT.size  # 64
STATE_OFFSET = 64
BOOT_ID_OFFSET = 72
LOSS_EPOCH_OFFSET = 88
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
DATA_ALIGN = 4096
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 65536
DEFAULT_BLOCK_SIZE = 4096

#: The highest loss epoch (its word keeps 32 bits for a CRC of the count).
LOSS_EPOCH_MAX = 2**32 - 1

STATE_CLEAN = 1 << 0
_SERVED_SHIFT = 8

assert HEADER_SIZE == 64


@dataclass(frozen=True)
class Header:
    uuid: uuid.UUID
    block_size: int
    data_offset: int
    data_size: int
    created_ns: int
    features: int = 0

    @property
    def version(self) -> int:
        return FEATURES_VERSION if self.features else LAYOUT_VERSION

    @property
    def atomic_blocks(self) -> bool:
        return bool(self.features & FEATURE_ATOMIC_BLOCKS)

    def encode(self) -> bytes:
        body = HEADER_STRUCT.pack(
            MAGIC, self.version, HEADER_SIZE, self.block_size, self.uuid.bytes,
            self.data_offset, self.data_size, self.created_ns, 0, 0,
        )
        crc = zlib.crc32(body[:56])
        return body[:56] + struct.pack("<II", crc, self.features)

    @classmethod
    def decode(cls, raw: bytes, region_size: int, path: str = "REGION") -> Header:
        """Parse and validate a header; every failure says what is wrong (``path`` names the
        region in the command that fixes a short one)."""
        if len(raw) < HEADER_SIZE:
            raise LayoutError(f"header truncated: {len(raw)} of {HEADER_SIZE} bytes")
        (magic, version, hsize, block_size, uuid_b, data_offset, data_size, created,
         crc, features) = HEADER_STRUCT.unpack_from(raw)
        if magic != MAGIC:
            raise LayoutError(f"no pmemblk header (magic is {magic!r}, expected {MAGIC!r})")
        if version not in (LAYOUT_VERSION, FEATURES_VERSION):
            raise LayoutError(
                f"layout version {version} is not supported (this pmemblk reads versions "
                f"{LAYOUT_VERSION} and {FEATURES_VERSION})"
            )
        if hsize != HEADER_SIZE:
            raise LayoutError(f"header size {hsize} is invalid (expected {HEADER_SIZE})")
        actual = zlib.crc32(raw[:56])
        if crc != actual:
            raise LayoutError(
                f"header checksum mismatch (stored 0x{crc:08x}, computed 0x{actual:08x}): "
                "the header is corrupt"
            )
        if version == LAYOUT_VERSION and features != 0:
            raise LayoutError("reserved header field is not zero")
        if version == FEATURES_VERSION and (not features or features & ~FEATURE_ATOMIC_BLOCKS):
            raise LayoutError(f"header features 0x{features:x} are not supported (this pmemblk "
                              f"knows 0x{FEATURE_ATOMIC_BLOCKS:x}, atomic blocks)")
        check_block_size(block_size, LayoutError)
        if data_offset < DATA_ALIGN or data_offset % DATA_ALIGN:
            raise LayoutError(f"data offset {data_offset} is not a positive multiple of 4096")
        if data_size <= 0 or data_size % block_size:
            raise LayoutError(
                f"data size {data_size} is not a positive multiple of the block size {block_size}"
            )
        if data_offset + data_size > region_size:
            raise LayoutError(
                f"the region is {region_size} bytes but its header says "
                f"{data_offset + data_size}: it was truncated or copied in part. "
                f"fallocate -l {data_offset + data_size} {path} restores its length (what was "
                "cut off reads back as zeros)"
            )
        return cls(uuid.UUID(bytes=uuid_b), block_size, data_offset, data_size, created, features)


@dataclass(frozen=True)
class State:
    clean: bool
    times_served: int

    def encode(self) -> int:
        return (self.times_served << _SERVED_SHIFT) | (STATE_CLEAN if self.clean else 0)

    @classmethod
    def decode(cls, word: int) -> State:
        return cls(bool(word & STATE_CLEAN), word >> _SERVED_SHIFT)


@dataclass(frozen=True)
class Opening:
    """What serving the region found when it started."""

    previous: State
    #: Whether every write the previous target took is still in the region.
    continuity: bool
    loss_epoch: int


def current_boot_id() -> bytes:
    try:
        with open(BOOT_ID_FILE) as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)  # unknown: an unclean stop then counts as a possible loss


def _epoch_check(epoch: int) -> int:
    # Without the prefix, the CRC32 of four 0xff bytes is 0xffffffff: an all-ones word (memory
    # that lost its contents) would check out as the maximum.
    return zlib.crc32(b"loss epoch" + epoch.to_bytes(4, "little"))


def encode_loss_epoch(epoch: int) -> int:
    """The loss epoch's word: the count, and its check above it."""
    if not 0 <= epoch <= LOSS_EPOCH_MAX:
        raise LayoutError(f"loss epoch {epoch} is out of range (0 to {LOSS_EPOCH_MAX})")
    return _epoch_check(epoch) << 32 | epoch


def decode_loss_epoch(word: int, times_served: int) -> int:
    """The count in a loss epoch word; a damaged word raises LayoutError."""
    epoch, check = word & LOSS_EPOCH_MAX, word >> 32
    if check == _epoch_check(epoch):
        return epoch
    if check == 0 and epoch <= times_served:  # the plain count of a region served before
        return epoch
    raise LayoutError(
        f"its loss epoch word (byte {LOSS_EPOCH_OFFSET} of the header, 0x{word:016x}) is "
        "damaged, so clients cannot be told whether writes they did not flush were lost. "
        "Serve it --readonly to copy the data out, then create it again")


def read_loss_epoch(region: PmemRegion) -> int:
    word = int.from_bytes(region.read(LOSS_EPOCH_OFFSET, 8), "little")
    return decode_loss_epoch(word, read_state(region).times_served)


def open_for_serving(region: PmemRegion, boot_id: bytes | None = None) -> Opening:
    """Record that a target now serves the region read-write (state word: not clean).
    Refused, with the region unchanged, when its loss epoch is damaged or cannot move."""
    state = read_state(region)
    boot = current_boot_id() if boot_id is None else boot_id
    same_boot = boot != bytes(16) and region.read(BOOT_ID_OFFSET, 16) == boot
    continuity = state.clean or same_boot
    epoch = read_loss_epoch(region)
    if not continuity:
        if epoch == LOSS_EPOCH_MAX:
            raise LayoutError(
                f"its loss epoch is at its maximum ({LOSS_EPOCH_MAX}) and must move again (an "
                "unclean stop in another boot), which clients could not tell from no loss. "
                "Serve it --readonly to copy the data out, then create it again")
        epoch += 1
    region.store_u64(LOSS_EPOCH_OFFSET, encode_loss_epoch(epoch))
    region.store_u64(BOOT_ID_OFFSET, int.from_bytes(boot[:8], "little"))
    region.store_u64(BOOT_ID_OFFSET + 8, int.from_bytes(boot[8:], "little"))
    region.persist(BOOT_ID_OFFSET, 24)
    write_state(region, State(clean=False, times_served=state.times_served + 1))
    return Opening(state, continuity, epoch)


def check_block_size(block_size: int, exc: type[Exception]) -> None:
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise exc(
            f"block size {block_size} is invalid: it must be a power of two from "
            f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )


def data_size_for(region_size: int, block_size: int) -> int:
    """How much data a region of ``region_size`` bytes holds after the header."""
    return max(0, (region_size - DATA_ALIGN) // block_size * block_size)


def format_region(region: PmemRegion, block_size: int = DEFAULT_BLOCK_SIZE,
                  atomic_lanes: int | None = None) -> Header:
    """Write a new header (the caller has decided that overwriting is wanted); with
    ``atomic_lanes``, lay out atomic blocks of ``block_size`` in the data area first."""
    check_block_size(block_size, LayoutError)
    data_size = data_size_for(region.size, block_size)
    if data_size <= 0:
        raise LayoutError(
            f"{region.path}: {region.size} bytes is too small: the header takes {DATA_ALIGN} "
            f"bytes and at least one {block_size}-byte block must follow"
        )
    features = 0
    if atomic_lanes is not None:
        # Before the header: a region whose layout failed has no header saying it is one.
        atomicblocks.format_area(data_area(region, DATA_ALIGN, data_size), block_size,
                                 atomic_lanes)
        features = FEATURE_ATOMIC_BLOCKS
    header = Header(uuid.uuid4(), block_size, DATA_ALIGN, data_size, time.time_ns(), features)
    region.write(0, header.encode() + bytes(DATA_ALIGN - HEADER_SIZE))
    region.store_u64(STATE_OFFSET, State(clean=True, times_served=0).encode())
    region.persist(0, DATA_ALIGN)
    return header


def data_area(region: PmemRegion, offset: int, size: int) -> atomicblocks.Area:
    return atomicblocks.Area(region.read, region.write, region.persist, offset, size)


def read_atomic_info(region: PmemRegion, header: Header) -> atomicblocks.Info | None:
    """The atomic-blocks geometry of a region that has them (None for a plain one)."""
    if not header.atomic_blocks:
        return None
    area = data_area(region, header.data_offset, header.data_size)
    try:
        return atomicblocks.read_info(area)
    except LayoutError as exc:
        raise LayoutError(f"{region.path}: {exc}") from None


def has_header(region: PmemRegion) -> bool:
    return region.size >= HEADER_SIZE and region.read(0, len(MAGIC)) == MAGIC


def read_header(region: PmemRegion) -> Header:
    """The region's header. A region with none is told how to create one; a damaged one is
    not (creating would erase it): its error says what is wrong and, when it can, the fix."""
    path = region.path
    try:
        if region.size < DATA_ALIGN:
            raise LayoutError(f"{region.size} bytes is too small to hold a region")
        return Header.decode(region.read(0, HEADER_SIZE), region.size, path)
    except LayoutError as exc:
        if has_header(region):
            raise LayoutError(f"{path}: {exc}") from None
        raise LayoutError(f"{path} holds no valid pmemblk region: {exc}. Create one with: "
                          f"pmemblk create {path} --size SIZE (this erases what it holds)"
                          ) from None


def read_state(region: PmemRegion) -> State:
    return State.decode(int.from_bytes(region.read(STATE_OFFSET, 8), "little"))


def write_state(region: PmemRegion, state: State) -> None:
    region.store_u64(STATE_OFFSET, state.encode())
    region.persist(STATE_OFFSET, 8)
