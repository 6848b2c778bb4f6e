"""The client's side of atomic blocks: reads and writes of logical blocks through the map.

The on-media format (the info block, the flog, the map) and its recovery are
``atomicblocks``, which knows no transport; this module moves blocks over one (RDMA or TCP), by
the steps the format's docstring describes: data into a lane's free block, the move into the
lane's flog, both persisted, then the map entry moved by compare-and-swap (or ATOMIC WRITE).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .atomicblocks import (
    ENTRY,
    FLOG_LANE,
    INFO_SIZE,
    LANES_PER_WRITER,
    Info,
    Lane,
    entry_block,
    lane_from,
    next_entry,
)
from .errors import LayoutError, RemoteError, RequestError

if TYPE_CHECKING:
    from .transport import Persist, Transport

log = logging.getLogger(__name__)

#: Makes ranges just written on a channel persistent, by the client's flush method.
Persister = Callable[["Transport", list[tuple[int, int]]], None]
#: Reads that find the map moved under them this many times in a row give up (EIO).
READ_RETRIES = 1000
#: A sole writer's locks, by logical block: one move of a block at a time (ATOMIC WRITE).
BLOCK_LOCKS = 64


class BlockMap:
    """A client's reads and writes of logical blocks through the map, on any transport.

    A read takes the map entries of its blocks, reads the blocks, then the entries again: a
    block whose entry changed meanwhile is read again, so each block is one write's data,
    whole. A write takes up to 8 of the client's lanes and moves its blocks in rounds, one
    per lane: each block's data into its lane's free block and the move into the lane's flog,
    both persisted (the flush method's step), then the map entries moved by compare-and-swap,
    then persisted. If another writer moved an entry first, that block's move is recorded
    again against what it found (a partial block is merged again), so concurrent writers
    never lose a block or share one.

    A sole writer (the export is not ``--shared``) whose connection offers the ATOMIC WRITE
    verb moves the entry with it instead: no other client moves entries, and its own threads
    move one block at a time (``BLOCK_LOCKS``), so the entry it read is the one it replaces.
    """

    def __init__(self, info: Info) -> None:
        self.info = info
        self._locks = [threading.Lock() for _ in range(BLOCK_LOCKS)]
        self.mover: str | None = None  # how the last write moved entries (for the log)
        self._cond = threading.Condition()
        self._grant: int | None = None  # the grant the lanes below came with
        self._free: list[Lane] = []
        self._usable = 0  # lanes of that grant not retired

    @classmethod
    def load(cls, t: Transport) -> BlockMap:
        """The layout of the export ``t`` reaches (which says it has atomic blocks)."""
        raw = bytearray(INFO_SIZE)
        t.read(memoryview(raw), 0)
        try:
            return cls(Info.decode(bytes(raw), t.info.export_size))
        except LayoutError as exc:
            raise RemoteError(f"the target's region: {exc}", errno.EIO) from None

    # -- reads ---------------------------------------------------------------------------

    def _entries(self, t: Transport, first: int, count: int) -> array.array[int]:
        raw = bytearray(count * ENTRY)
        t.read(memoryview(raw), self.info.map_at(first))
        entries = array.array("Q", raw)
        for i, value in enumerate(entries):
            self._check_entry(value, first + i)
        return entries

    def read(self, t: Transport, buf: memoryview, offset: int) -> None:
        size = self.info.sector_size
        first = offset // size
        count = (offset + len(buf) - 1) // size - first + 1
        entries = self._entries(t, first, count)
        todo = list(range(count))
        for _ in range(READ_RETRIES):
            self._read_blocks(t, buf, offset, first, entries, todo)
            again = self._entries(t, first, count)
            todo = [i for i in todo if again[i] != entries[i]]
            if not todo:
                return
            entries = again
        raise RemoteError(f"blocks {first}..{first + count - 1} kept moving while read "
                          f"({READ_RETRIES} times)", errno.EIO)

    def _read_blocks(self, t: Transport, buf: memoryview, offset: int, first: int,
                     entries: array.array[int], todo: list[int]) -> None:
        """Read the blocks ``todo`` (indexes from ``first``) into ``buf``, runs of blocks that
        are consecutive in both spaces in one read."""
        size, end = self.info.sector_size, offset + len(buf)
        i = 0
        while i < len(todo):
            j = i
            while (j + 1 < len(todo) and todo[j + 1] == todo[j] + 1
                   and entry_block(entries[todo[j + 1]]) == entry_block(entries[todo[j]]) + 1):
                j += 1
            lba = first + todo[i]
            lo = max(offset, lba * size)
            hi = min(end, (first + todo[j] + 1) * size)
            start = self.info.block_at(entry_block(entries[todo[i]])) + lo - lba * size
            t.read(buf[lo - offset:hi - offset], start)
            i = j + 1

    # -- lanes -----------------------------------------------------------------------------

    def _take(self, t: Transport, persist: Persister, most: int) -> list[Lane]:
        """One lane (waiting for it if need be), and up to ``most`` in all if they are free
        now: a write of several blocks moves one per lane, all at once."""
        while True:
            with self._cond:
                while True:
                    if t.info.lane_grant != self._grant:
                        self._load_lanes(t)
                    if self._free:
                        n = min(most, len(self._free))
                        taken, self._free = self._free[-n:], self._free[:-n]
                        break
                    if not self._usable:
                        raise RemoteError("every lane of this client was retired after failed "
                                          "writes: reconnect to get new ones", errno.EIO)
                    self._cond.wait(1.0)
            usable, retired = [], []
            try:
                for lane in taken:
                    if lane.pending is None or self._resolve(t, lane, persist):
                        usable.append(lane)
                    else:
                        retired.append(lane)
            except BaseException:  # back to the pool, a lane not yet resolved still pending
                for lane in taken:
                    if lane not in retired:
                        self._give(lane)
                raise
            if usable:
                return usable

    def _load_lanes(self, t: Transport) -> None:
        """The lanes of ``t``'s grant (a new writer session), as recovery left them."""
        welcome = t.info
        if not welcome.lane_count:
            raise RequestError("the target gave this client no lanes to write through",
                               errno.EPERM)
        raw = bytearray(welcome.lane_count * FLOG_LANE)
        t.read(memoryview(raw), self.info.slot_at(welcome.lane_first, 0))
        try:
            lanes = [lane_from(self.info, welcome.lane_first + i,
                               bytes(raw[i * FLOG_LANE:(i + 1) * FLOG_LANE]),
                               welcome.lane_grant) for i in range(welcome.lane_count)]
        except LayoutError as exc:
            raise RemoteError(f"the target's region: {exc}", errno.EIO) from None
        self._free, self._grant, self._usable = lanes, welcome.lane_grant, len(lanes)
        self._cond.notify_all()

    def _give(self, lane: Lane) -> None:
        with self._cond:
            if lane.grant == self._grant:
                self._free.append(lane)
                self._cond.notify()

    def _resolve(self, t: Transport, lane: Lane, persist: Persister) -> bool:
        """A lane whose last move failed midway: done if the map holds its new entry (made
        persistent again before its old block is reused), not done if the old; retired
        (False) if neither (it cannot tell which block is free)."""
        assert lane.pending is not None
        lba, old, new = lane.pending
        now = self._entries(t, lba, 1)[0]
        if now == new:
            persist(t, [(self.info.map_at(lba), ENTRY)])
            lane.free = entry_block(old)
        elif now != old:
            log.warning("atomic-blocks lane %d is retired until the target recovers it (its "
                        "interrupted move of block %d was overtaken)", lane.index, lba)
            with self._cond:
                if lane.grant == self._grant:
                    self._usable -= 1
            return False
        lane.pending = None
        return True

    # -- writes ----------------------------------------------------------------------------

    def write(self, t: Transport, data: memoryview | None, offset: int, length: int,
              persist: Persister, step: Persist) -> None:
        """Write ``data`` (None: zeros) at logical ``offset``, block by block, each all or
        nothing and persistent (by ``persist``, or ``step`` posted behind writes) when this
        returns. Blocks move in rounds, one per lane taken, each step of a round in flight at
        once: four round trips a round (the map entries read; the data and the records
        written and persisted; the entries moved; the entries persisted)."""
        size = self.info.sector_size
        first = offset // size
        count = (offset + length - 1) // size - first + 1
        store = t.info.atomic_write and not t.info.shared
        mover = "ATOMIC WRITE (sole writer)" if store else "compare-and-swap"
        if mover != self.mover:
            self.mover = mover
            log.info("atomic blocks: map entries move by %s", mover)
        lanes = self._take(t, persist, min(count, LANES_PER_WRITER))
        try:
            for start in range(first, first + count, len(lanes)):
                lbas = list(range(start, min(start + len(lanes), first + count)))
                with contextlib.ExitStack() as held:
                    if store:  # one move of a block at a time: then the entry read is current
                        for i in sorted({lba % BLOCK_LOCKS for lba in lbas}):
                            held.enter_context(self._locks[i])
                    olds = list(self._entries(t, lbas[0], len(lbas)))
                    self._move(t, lanes, lbas, olds, data, offset, length, persist, step,
                               store)
        finally:
            for lane in lanes:
                self._give(lane)

    def _move(self, t: Transport, lanes: list[Lane], lbas: list[int], olds: list[int],
              data: memoryview | None, offset: int, length: int, persist: Persister,
              step: Persist, store: bool) -> None:
        """Move ``lbas`` from the entries ``olds`` (one block per lane): the new data into the
        lanes' free blocks and the records, persisted; the map entries moved; the moved ones
        persisted. Blocks whose entry another writer moved first go round again, against
        what it found (a part of a block merged again into what the other wrote)."""
        info = self.info
        while lbas:
            n = len(lbas)
            blocks = [self._merged(t, olds[i], *self._part(lbas[i], data, offset, length))
                      for i in range(n)]
            news = [next_entry(olds[i], lanes[i].free) for i in range(n)]
            records = []
            for i, lba in enumerate(lbas):
                slot, record = lanes[i].record(lba, olds[i], news[i])
                lanes[i].pending = (lba, olds[i], news[i])
                records.append((info.slot_at(lanes[i].index, slot), memoryview(record)))
            # The data and the records persistent before the map moves (in any order between
            # them, so in one step): a crash then finds the record and decides from the map
            # which block is free.
            t.write_many([(info.block_at(lanes[i].free), blocks[i]) for i in range(n)]
                         + records, step)
            for lane in lanes[:n]:
                lane.recorded()  # in place: the next record goes to the other slot
            if store:
                t.atomic_write_many([(info.map_at(lba), news[i]) for i, lba in enumerate(lbas)])
                found = list(olds)
            else:
                found = t.compare_swap_many([(info.map_at(lba), olds[i], news[i])
                                             for i, lba in enumerate(lbas)])
            moved = [i for i in range(n) if found[i] == olds[i]]
            if moved:
                # The old blocks are free only once the moves are persistent: written to
                # before, a power cut could bring back a map entry pointing at one.
                persist(t, [(info.map_at(lbas[i]), ENTRY) for i in moved])
            for i in moved:
                lanes[i].free = entry_block(olds[i])
            for i in range(n):
                lanes[i].pending = None
            again = [i for i in range(n) if found[i] != olds[i]]
            for i in again:
                self._check_entry(found[i], lbas[i])
            lanes = [lanes[i] for i in again]
            lbas, olds = [lbas[i] for i in again], [found[i] for i in again]

    def _part(self, lba: int, data: memoryview | None, offset: int,
              length: int) -> tuple[int, int, memoryview | None]:
        """What a write of ``data`` (None: zeros) at ``offset`` puts in block ``lba``: where in
        the block, how many bytes, and which (None: zeros)."""
        size = self.info.sector_size
        lo, hi = max(offset, lba * size), min(offset + length, (lba + 1) * size)
        return lo - lba * size, hi - lo, None if data is None else data[lo - offset:hi - offset]

    def _merged(self, t: Transport, old: int, at: int, n: int,
                piece: memoryview | None) -> memoryview:
        """A whole block: ``piece`` (None: zeros) at ``at``, the rest from the block ``old``
        maps to (read only for a part of a block)."""
        size = self.info.sector_size
        if n == size:
            return memoryview(bytes(size)) if piece is None else piece
        merged = bytearray(size)
        t.read(memoryview(merged), self.info.block_at(entry_block(old)))
        merged[at:at + n] = bytes(n) if piece is None else piece
        return memoryview(merged)

    def _check_entry(self, raw: int, lba: int) -> None:
        if entry_block(raw) >= self.info.internal_blocks:
            raise RemoteError(f"the block map entry of block {lba} points past the last "
                              "block: the region's map is corrupt", errno.EIO)
