"""Atomic blocks, the client's side (BlockMap) against the in-memory transports of
tests/test_client.py, judged by the durable copy: what a power cut followed by the target's
recovery would leave. A sole writer's ATOMIC WRITE locks, writes of several rounds, lanes
cut short, retired lanes, and sequence numbers across their wrap."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from pmemblk import atomicblocks as ab
from pmemblk import blockmap
from pmemblk.client import Client
from pmemblk.errors import RemoteError, TransportError
from pmemblk.transport import Transport

from .test_client import (
    SIZE,
    LosesAMoveReply,
    MemoryTransport,
    atomic_client,
    atomic_transport,
)

BLOCK = 4096
DEADLINE = 30.0  # seconds: only ever reached when something hangs


def after_power_cut(t: MemoryTransport, info: ab.Info) -> list[bytes]:
    """Every logical block as the target would serve it after a power cut (only the durable
    copy survives) and its recovery; asserts the map and the lanes are whole."""
    image = bytearray(t.durable)

    def put(off: int, data: bytes) -> None:
        image[off:off + len(data)] = data

    area = ab.Area(lambda o, n: bytes(image[o:o + n]), put, lambda o, n: None, 0, SIZE)
    ab.recover(area, info)
    mapped = [ab.entry_block(int.from_bytes(image[info.map_at(i):info.map_at(i) + 8], "little"))
              for i in range(info.external_blocks)]
    frees = []
    for lane in range(info.lanes):
        cur = ab.current_record(area.read(info.slot_at(lane, 0), ab.FLOG_LANE))
        assert cur is not None and cur[1].settled
        frees.append(ab.entry_block(cur[1].new))
    assert sorted(mapped + frees) == list(range(info.internal_blocks)), \
        "after the cut a block is both mapped and free, or mapped twice"
    return [bytes(image[info.block_at(b):info.block_at(b) + BLOCK]) for b in mapped]


def live_whole(t: MemoryTransport, c: Client) -> None:
    """The client's own view: every block mapped once or one free lane's, never both."""
    assert c.blocks is not None
    info = c.blocks.info
    mapped = [ab.entry_block(int.from_bytes(t.mem[info.map_at(i):info.map_at(i) + 8], "little"))
              for i in range(info.external_blocks)]
    frees = [lane.free for lane in c.blocks._free]
    assert len(frees) == info.lanes
    assert sorted(mapped + frees) == list(range(info.internal_blocks))


def pattern(tag: int, lba: int) -> bytes:
    return bytes([tag, lba & 0xFF]) * (BLOCK // 2)


@pytest.mark.parametrize("applied", [True, False])
def test_a_lane_cut_short_and_reused_leaves_a_whole_durable_copy(applied: bool) -> None:
    """The map move's reply is lost (after or before the target moved the map): the next
    write resolves the lanes from the map and reuses their free blocks. A power cut then
    must find the first write whole or absent, never the second write's data in its blocks
    (the map move made persistent before the old block is reused)."""
    t = atomic_transport(shared=True, atomic_write=False, t=LosesAMoveReply(applied))
    c, info = atomic_client(t)
    with pytest.raises(TransportError):
        c.pwrite(memoryview(b"A" * BLOCK * 3), 0)
    c.pwrite(memoryview(b"B" * BLOCK * 4), BLOCK * 20)  # the same lanes, resolved first
    blocks = after_power_cut(t, info)
    for lba in range(3):
        assert blocks[lba] in (b"A" * BLOCK, bytes(BLOCK)), f"block {lba} lost"
    assert blocks[20:24] == [b"B" * BLOCK] * 4
    live_whole(t, c)


@pytest.mark.parametrize(("shared", "atomic_write"), [(False, True), (True, False)])
def test_a_write_of_several_rounds_moves_every_block_once(shared: bool,
                                                          atomic_write: bool) -> None:
    """20 blocks through 8 lanes: three rounds, each lane moving a block in each, its free
    block the one its last move freed; blocks scattered by earlier writes read back whole,
    also in one read spanning blocks that are not consecutive in the data area."""
    t = atomic_transport(shared=shared, atomic_write=atomic_write, t=MemoryTransport())
    c, info = atomic_client(t)
    for lba in (3, 9, 10, 15, 22):  # scatter some blocks first
        c.pwrite(memoryview(pattern(1, lba)), lba * BLOCK)
    data = b"".join(pattern(2, lba) for lba in range(2, 22))
    c.pwrite(memoryview(data), 2 * BLOCK)
    c.pwrite(memoryview(b"p" * 10), 21 * BLOCK + 4090)  # a part across two blocks
    expect = bytearray(bytes(2 * BLOCK) + data + pattern(1, 22) + bytes(BLOCK))
    expect[21 * BLOCK + 4090:21 * BLOCK + 4100] = b"p" * 10
    buf = bytearray(24 * BLOCK)
    c.pread(memoryview(buf), 0)
    assert buf == expect
    blocks = after_power_cut(t, info)
    assert b"".join(blocks[:24]) == expect
    live_whole(t, c)


def commit(t: Transport, ranges: list[tuple[int, int]]) -> None:
    t.commit(ranges)


class SignalLock:
    """A lock that tells when a thread had to wait for it."""

    def __init__(self, waited: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._waited = waited

    def __enter__(self) -> SignalLock:
        if not self._lock.acquire(blocking=False):
            self._waited()
            self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


class HoldsTheFirstMove(MemoryTransport):
    """The first ATOMIC WRITE of the map (thread ``holder``'s) waits until another thread
    either waits for a block lock or reads the map entry of ``lba``: with the locks right,
    the other thread waits; with them wrong, it reads the entry the holder is replacing."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()
        self.holder: int | None = None
        self.lba_at = -1
        self.other_waited = self.other_read = self.holding = False

    def read(self, buf: memoryview, offset: int) -> None:
        if offset == self.lba_at and threading.get_ident() != self.holder:
            with self.cond:
                self.other_read = True
                self.cond.notify_all()
        super().read(buf, offset)

    def waited(self) -> None:
        if threading.get_ident() != self.holder:
            with self.cond:
                self.other_waited = True
                self.cond.notify_all()

    def atomic_write_many(self, items: list[tuple[int, int]]) -> None:
        if threading.get_ident() == self.holder and not self.holding:
            with self.cond:
                self.holding = True
                self.cond.notify_all()
                assert self.cond.wait_for(lambda: self.other_waited or self.other_read,
                                          DEADLINE)
        super().atomic_write_many(items)


@pytest.mark.parametrize("other", [[2], [5, 6], [0, 1]])
def test_a_sole_writers_round_of_several_blocks_holds_every_blocks_lock(
        other: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """ATOMIC WRITE replaces an entry without comparing it: a round moving blocks 0..5 (6 of
    the 8 lanes) must hold every one of their locks until its entries moved, so another
    thread's write of one of them (alone or in a round with others) reads the entry only
    after the move."""
    t = atomic_transport(shared=False, atomic_write=True, t=HoldsTheFirstMove())
    c, info = atomic_client(t)
    bm = c.blocks  # two threads on one BlockMap (the client's channels, one transport here)
    assert bm is not None
    monkeypatch.setattr(bm, "_locks", [SignalLock(t.waited) for _ in range(blockmap.BLOCK_LOCKS)])

    def write(data: bytes, offset: int) -> None:
        bm.write(t, memoryview(data), offset, len(data), commit, t.commit_step)
    t.lba_at = info.map_at(other[0])
    errors: list[BaseException] = []

    def first() -> None:
        t.holder = threading.get_ident()
        try:
            write(b"".join(pattern(1, lba) for lba in range(6)), 0)
        except BaseException as exc:
            errors.append(exc)

    a = threading.Thread(target=first)
    a.start()
    with t.cond:
        assert t.cond.wait_for(lambda: t.holding, DEADLINE)
    t.lba_at = info.map_at(other[0])
    write(b"".join(pattern(2, lba) for lba in other), other[0] * BLOCK)
    a.join(DEADLINE)
    assert not a.is_alive() and not errors
    expect = [pattern(1, lba) for lba in range(6)] + [bytes(BLOCK)] * 2
    for lba in other:
        expect[lba] = pattern(2, lba)  # the second write waited: it lands on top
    buf = bytearray(8 * BLOCK)
    c.pread(memoryview(buf), 0)
    assert buf == b"".join(expect)
    live_whole(t, c)
    assert after_power_cut(t, info)[:8] == expect


def test_when_every_lane_is_retired_a_write_fails_instead_of_waiting() -> None:
    """All 8 lanes were cut short and overtaken: none can be resolved, so a write gives up
    with EIO (reconnect for new lanes) rather than wait for a lane that never comes back."""
    t = atomic_transport(shared=True, atomic_write=False, t=LosesAMoveReply(applied=False))
    c, info = atomic_client(t)
    with pytest.raises(TransportError):
        c.pwrite(memoryview(b"A" * BLOCK * 8), 0)
    for lba in range(8):  # another writer moved each of them since
        at = info.map_at(lba)
        old = int.from_bytes(t.mem[at:at + 8], "little")
        t.mem[at:at + 8] = ab.next_entry(old, ab.entry_block(old)).to_bytes(8, "little")
    failed: list[BaseException] = []

    def write() -> None:
        try:
            c.pwrite(memoryview(b"B" * BLOCK), 30 * BLOCK)
        except BaseException as exc:
            failed.append(exc)

    w = threading.Thread(target=write, daemon=True)
    w.start()
    w.join(DEADLINE)
    assert not w.is_alive(), "a write with every lane retired waits for ever"
    assert len(failed) == 1 and isinstance(failed[0], RemoteError)
    assert "retired" in str(failed[0])
    assert c.blocks is not None and c.blocks._usable == 0


TOP = ab.BLOCK_MASK


def wrap_lanes(t: MemoryTransport, info: ab.Info, seq: int) -> None:
    """Every lane's settled record rewritten at sequence ``seq`` (live and durable, as the
    target's recovery would leave it after that many moves)."""
    for lane in range(info.lanes):
        at = info.slot_at(lane, 0)
        cur = ab.current_record(bytes(t.mem[at:at + ab.FLOG_LANE]))
        assert cur is not None
        slot, rec = cur
        for s, n in ((slot, seq), (1 - slot, seq - 1 if seq > 1 else TOP)):
            raw = ab.FlogRecord(rec.lba, rec.old, rec.new, n).encode()
            t.mem[info.slot_at(lane, s):info.slot_at(lane, s) + len(raw)] = raw
    t.durable[:] = t.mem


@pytest.mark.parametrize("seq", [TOP - 1, TOP])
@pytest.mark.parametrize(("shared", "atomic_write"), [(False, True), (True, False)])
def test_writes_whose_flog_records_cross_the_sequence_wrap_survive_a_power_cut(
        seq: int, shared: bool, atomic_write: bool) -> None:
    """Lanes at the last sequence numbers, map entries moved 2^32 - 1 times: three moves a
    lane take the records past the wrap (to 1, 2); the durable copy then recovers to every
    block's last data, whole."""
    t = atomic_transport(shared=shared, atomic_write=atomic_write, t=MemoryTransport())
    info = ab.geometry(SIZE, BLOCK, 8)
    wrap_lanes(t, info, seq)
    for lba in range(8):
        at = info.map_at(lba)
        t.mem[at:at + 8] = ab.entry(lba, TOP).to_bytes(8, "little")
    t.durable[:] = t.mem
    c, info = atomic_client(t)
    for tag in (1, 2, 3):
        c.pwrite(memoryview(b"".join(pattern(tag, lba) for lba in range(8))), 0)
    for lba in range(8):
        at = info.map_at(lba)
        assert int.from_bytes(t.mem[at:at + 8], "little") >> 32 == 3  # TOP, then 1, 2, 3
    buf = bytearray(8 * BLOCK)
    c.pread(memoryview(buf), 0)
    expect = [pattern(3, lba) for lba in range(8)]
    assert buf == b"".join(expect)
    assert after_power_cut(t, info)[:8] == expect
    live_whole(t, c)
