"""The client core's flush policy, against an in-memory transport (no RDMA involved)."""

from __future__ import annotations

import dataclasses
import errno
import uuid
from typing import TypeVar

import pytest

from pmemblk import atomicblocks as ab
from pmemblk import protocol as p
from pmemblk.client import Client
from pmemblk.errors import (
    ConfigError,
    ConnectionLost,
    GaveUp,
    ProtocolError,
    RemoteError,
    RequestError,
    TransportError,
)
from pmemblk.transport import Persist, PersistStep

SIZE = 1 << 20


class MemoryTransport:
    """Records what the client asks for; a 'durable' copy only changes on persistence."""

    def __init__(self, readonly: bool = False, is_pmem: bool = True,
                 methods: int = p.FLUSH_APM | p.FLUSH_GPSPM, durable: int | None = None) -> None:
        flags = (p.REGION_READONLY if readonly else 0) | (p.REGION_IS_PMEM if is_pmem else 0)
        self.info = p.Welcome(SIZE, 4096, flags, methods, 1, 4096, uuid.uuid4(), 4096, 8,
                              methods if durable is None else durable)
        self.mem = bytearray(SIZE)
        self.durable = bytearray(SIZE)
        self.calls: list[tuple[str, object]] = []
        self.fail_commit = 0

    def read(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.mem[offset:offset + len(buf)]

    def write(self, data: memoryview, offset: int, persist: Persist | None = None) -> None:
        self.mem[offset:offset + len(data)] = data
        self.calls.append(("write", (offset, len(data))))
        self._persist(persist, offset, len(data))

    def write_zeroes(self, offset: int, length: int, persist: Persist | None = None) -> None:
        self.mem[offset:offset + length] = bytes(length)
        self.calls.append(("zero", (offset, length)))
        self._persist(persist, offset, length)

    def _persist(self, persist: Persist | None, offset: int, length: int) -> None:
        if persist is self.barrier_step:
            self.read_barrier(offset)
        elif persist is self.commit_step:
            self.commit([(offset, length)])
        elif persist is self.flush_step:
            self.native_flush([(offset, length)])

    #: Like RDMA: a write's completion does not prove placement; a barrier does.
    placed_on_reply = False
    kind = "memory"
    tls = False
    barrier_step = PersistStep("barrier")
    commit_step = PersistStep("commit")
    flush_step: PersistStep | None = PersistStep("flush")

    def read_barrier(self, offset: int) -> None:
        self.durable[:] = self.mem  # apm: everything written on this QP is placed
        self.calls.append(("barrier", offset))

    def start_barrier(self, offset: int) -> None:
        self._barrier_at = offset

    def finish_barrier(self) -> None:
        self.read_barrier(self._barrier_at)

    def commit(self, ranges: list[tuple[int, int]]) -> None:
        self.calls.append(("commit", list(ranges)))
        if self.fail_commit:
            raise RemoteError("cannot persist", self.fail_commit)
        for off, n in ranges:
            self.durable[off:off + n] = self.mem[off:off + n]

    def native_flush(self, ranges: list[tuple[int, int]]) -> None:
        self.calls.append(("native", list(ranges)))
        for off, n in ranges:
            self.durable[off:off + n] = self.mem[off:off + n]

    def atomic_write(self, offset: int, value: bytes) -> None:
        self.calls.append(("atomic write", (offset, value)))
        self.mem[offset:offset + 8] = value

    def atomic_write_many(self, items: list[tuple[int, int]]) -> None:
        for offset, value in items:
            self.atomic_write(offset, value.to_bytes(8, "little"))

    def compare_swap_many(self, items: list[tuple[int, int, int]]) -> list[int]:
        return [self.compare_swap(*item) for item in items]

    def write_many(self, items: list[tuple[int, memoryview]],
                   persist: Persist | None = None) -> None:
        for offset, data in items:
            self.write(data, offset, persist)

    def compare_swap(self, offset: int, expected: int, new: int) -> int:
        self.calls.append(("cas", (offset, expected, new)))
        found = int.from_bytes(self.mem[offset:offset + 8], "little")
        if found == expected:
            self.mem[offset:offset + 8] = new.to_bytes(8, "little")
        return found

    def close(self) -> None:
        self.calls.append(("close", None))


def test_gpspm_flush_commits_exactly_the_dirty_ranges() -> None:
    t = MemoryTransport()
    c = Client(t, "gpspm")
    c.pwrite(memoryview(b"a" * 100), 0)
    c.pwrite(memoryview(b"b" * 100), 100)  # adjacent: merged
    c.pwrite(memoryview(b"c" * 10), 5000)
    c.zero(8192, 4096)
    assert t.durable == bytes(SIZE)  # nothing persistent before the flush
    c.flush()
    assert t.calls[-1] == ("commit", [(0, 200), (5000, 10), (8192, 4096)])
    assert t.durable == t.mem
    n = len(t.calls)
    c.flush()  # nothing dirty: no round trip
    assert len(t.calls) == n


def test_gpspm_fua_persists_only_that_range() -> None:
    t = MemoryTransport()
    c = Client(t, "gpspm")
    c.pwrite(memoryview(b"x" * 10), 0)
    c.pwrite(memoryview(b"y" * 10), 4096, fua=True)
    assert t.calls[-1] == ("commit", [(4096, 10)])
    assert t.durable[4096:4106] == b"y" * 10 and t.durable[0:10] == bytes(10)
    c.flush()
    assert t.calls[-1] == ("commit", [(0, 10)])


def test_gpspm_failed_commit_keeps_ranges_dirty() -> None:
    t = MemoryTransport()
    c = Client(t, "gpspm")
    c.pwrite(memoryview(b"x" * 10), 0)
    t.fail_commit = errno.EIO
    with pytest.raises(RemoteError):
        c.flush()
    t.fail_commit = 0
    c.flush()
    assert t.calls[-1] == ("commit", [(0, 10)])
    assert t.durable[:10] == b"x" * 10


def test_apm_flush_is_one_read_barrier_after_writes() -> None:
    t = MemoryTransport()
    c = Client(t, "apm")
    c.flush()
    assert not [x for x in t.calls if x[0] == "barrier"]  # nothing written: nothing to do
    c.pwrite(memoryview(b"z" * 10), 300)
    c.flush()
    assert t.calls[-1] == ("barrier", 300)
    c.pwrite(memoryview(b"q"), 7, fua=True)
    assert t.calls[-1] == ("barrier", 7)


def test_reads_and_bounds() -> None:
    t = MemoryTransport()
    c = Client(t, "gpspm")
    c.pwrite(memoryview(b"hello"), SIZE - 5)
    buf = bytearray(5)
    c.pread(memoryview(buf), SIZE - 5)
    assert buf == b"hello"
    with pytest.raises(RequestError, match="outside"):
        c.pread(memoryview(bytearray(6)), SIZE - 5)
    with pytest.raises(RequestError, match="outside"):
        c.pwrite(memoryview(b"x"), SIZE)
    with pytest.raises(RequestError, match="outside"):
        c.zero(-1, 2)


def test_readonly_export_refuses_writes_with_eperm() -> None:
    c = Client(MemoryTransport(readonly=True), "gpspm")
    with pytest.raises(RequestError) as exc:
        c.pwrite(memoryview(b"x"), 0)
    assert exc.value.errno == errno.EPERM
    with pytest.raises(RequestError):
        c.zero(0, 1)
    assert Client(MemoryTransport(), "gpspm", readonly=True).readonly


def test_flush_method_must_be_known_and_offered() -> None:
    with pytest.raises(ConfigError, match="unknown flush method"):
        Client(MemoryTransport(), "magic")
    with pytest.raises(ConfigError, match="does not offer"):
        Client(MemoryTransport(methods=p.FLUSH_GPSPM), "apm")


def test_auto_prefers_a_persistent_apm_then_gpspm() -> None:
    assert Client(MemoryTransport(), "auto").flush_method == "apm"
    c = Client(MemoryTransport(durable=p.FLUSH_GPSPM), "auto")
    assert (c.flush_method, c.persistent) == ("gpspm", True)


def test_visibility_only_method_is_refused_unless_accepted(
        caplog: pytest.LogCaptureFixture) -> None:
    t = MemoryTransport(is_pmem=False, durable=p.FLUSH_GPSPM)
    with pytest.raises(ConfigError, match="gives only visibility"):
        Client(t, "apm")
    c = Client(t, "apm", allow_visibility_only=True)
    assert (c.flush_method, c.persistent) == ("apm", False)
    assert "visibility only" in caplog.text
    with pytest.raises(ConfigError, match="no flush method that gives persistence"):
        Client(MemoryTransport(durable=0), "auto")
    assert Client(MemoryTransport(durable=0), "auto", allow_visibility_only=True).flush_method \
        == "gpspm"


# --- reconnect (the transports' real reconnects are in tests/integration/test_reconnect.py) ---

class Dropping(MemoryTransport):
    """Loses its connection on the next ``drops`` requests."""

    def __init__(self, drops: int = 0, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.drops = drops

    def write(self, data: memoryview, offset: int, persist: Persist | None = None) -> None:
        if self.drops:
            self.drops -= 1
            raise ConnectionLost("gone")
        super().write(data, offset, persist)


def reconnecting(first: MemoryTransport, answers: list[object]) -> Client:
    """A client whose reconnects return (or raise) ``answers`` in turn."""
    def again() -> MemoryTransport:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, MemoryTransport)
        return answer
    return Client(first, "gpspm", reconnect=again, reconnect_timeout=30)


def same_region(t: MemoryTransport, **changes: object) -> MemoryTransport:
    new = MemoryTransport()
    new.info = dataclasses.replace(t.info, **changes)  # type: ignore[arg-type]
    new.mem, new.durable = t.mem, t.durable  # the same memory, as after a restart
    return new


def test_a_lost_write_is_issued_again_after_reconnecting() -> None:
    old = Dropping(drops=1)
    new = same_region(old)
    busy = RemoteError("another client has this export open read-write", errno.EBUSY)
    c = reconnecting(old, [TransportError("refused"), busy, new])
    c.pwrite(memoryview(b"abc"), 10)
    assert ("close", None) in old.calls and ("write", (10, 3)) in new.calls
    c.flush()
    assert new.durable[10:13] == b"abc" and c.reconnects == 1 and c.lost is None


@pytest.mark.parametrize("refusal", [
    RemoteError("authentication failed", errno.EACCES),
    ConfigError("target requires authentication: give the client the target's secret"),
    ProtocolError("protocol version 3 is not supported"),
])
def test_a_refusal_other_than_busy_ends_the_connection(refusal: Exception) -> None:
    c = reconnecting(Dropping(drops=1), [refusal])
    with pytest.raises(GaveUp, match=f"reconnecting failed: {refusal}") as exc:
        c.pwrite(memoryview(b"x"), 0)
    assert exc.value.errno == errno.EIO
    with pytest.raises(GaveUp):
        c.pread(memoryview(bytearray(1)), 0)


def test_a_new_loss_epoch_fails_flush_only_if_writes_were_unflushed() -> None:
    old = Dropping(drops=0)
    answers: list[object] = []
    c = reconnecting(old, answers)
    c.pwrite(memoryview(b"a"), 0)
    c.flush()
    # Flushed, then the target comes back in a new epoch: the write that found the
    # connection gone is sent again in full, so nothing acknowledged is at risk.
    old.drops = 1
    first = Dropping(drops=0)
    first.info = dataclasses.replace(old.info, loss_epoch=1)
    answers.append(first)
    c.pwrite(memoryview(b"b"), 1)
    assert c.reconnects == 1 and c.lost is None
    # "b" is acknowledged and unflushed when the next loss (epoch 2) happens.
    first.drops = 1
    second = Dropping(drops=0)
    second.info = dataclasses.replace(old.info, loss_epoch=2)
    answers.append(second)
    c.pwrite(memoryview(b"c"), 2)
    assert c.lost is not None
    for _ in range(2):
        with pytest.raises(GaveUp, match="loss epoch 1 → 2") as exc:
            c.flush()
        assert exc.value.errno == errno.EIO
    with pytest.raises(GaveUp, match="loss epoch"):  # FUA cannot promise either
        c.pwrite(memoryview(b"d"), 3, fua=True)


def test_a_different_region_is_refused_for_good() -> None:
    old = Dropping(drops=1)
    c = reconnecting(old, [same_region(old, region_uuid=uuid.uuid4())])
    with pytest.raises(GaveUp, match="now serves region") as exc:
        c.pwrite(memoryview(b"x"), 0)
    assert exc.value.errno == errno.EIO
    with pytest.raises(GaveUp, match="now serves region"):
        c.flush()


# --- channels: what a flush must order when several threads wrote -------------------------

class RcTarget:
    """A target's memory as RDMA RC sees it from several queue pairs: a completed WRITE is not
    yet placed; a later READ or SEND on the *same* channel places it (RC orders a QP's own
    operations, nothing across QPs). ``durable`` changes only on a COMMIT."""

    def __init__(self, gate: int = 0) -> None:
        import threading

        self.info = MemoryTransport(methods=p.FLUSH_APM | p.FLUSH_GPSPM | p.FLUSH_NATIVE).info
        self.mem = bytearray(SIZE)
        self.durable = bytearray(SIZE)
        self.channels = 0
        #: The first ``gate`` writes wait for each other: that many channels are in use at once.
        self.gate = threading.Barrier(gate) if gate else None


class RcChannel:
    placed_on_reply = False
    kind = "memory"
    tls = False
    barrier_step = PersistStep("barrier")
    commit_step = PersistStep("commit")
    flush_step: PersistStep | None = PersistStep("flush")

    def __init__(self, target: RcTarget) -> None:
        self.target = target
        self.info = target.info
        self.pending: list[tuple[int, bytes]] = []  # completed, not yet placed
        target.channels += 1

    def _place(self) -> None:
        for off, data in self.pending:
            self.target.mem[off:off + len(data)] = data
        self.pending.clear()

    def read(self, buf: memoryview, offset: int) -> None:
        self._place()
        buf[:] = self.target.mem[offset:offset + len(buf)]

    def write(self, data: memoryview, offset: int, persist: Persist | None = None) -> None:
        if self.target.gate is not None:
            self.target.gate.wait(timeout=10)
        self.pending.append((offset, bytes(data)))
        if persist is self.commit_step:
            self.commit([(offset, len(data))])
        elif persist is self.barrier_step:
            self._place()

    def write_zeroes(self, offset: int, length: int, persist: Persist | None = None) -> None:
        self.write(memoryview(bytes(length)), offset, persist)

    def read_barrier(self, offset: int) -> None:
        self._place()

    def start_barrier(self, offset: int) -> None:
        pass

    def finish_barrier(self) -> None:
        self._place()

    def commit(self, ranges: list[tuple[int, int]]) -> None:
        self._place()  # the SEND follows this channel's writes
        for off, n in ranges:
            self.target.durable[off:off + n] = self.target.mem[off:off + n]

    def native_flush(self, ranges: list[tuple[int, int]]) -> None:
        self.commit(ranges)  # a FLUSH, too, orders only this channel's writes

    def compare_swap(self, offset: int, expected: int, new: int) -> int:
        raise AssertionError("no atomic blocks here")

    def atomic_write(self, offset: int, value: bytes) -> None:
        raise AssertionError("no atomic blocks here")

    def atomic_write_many(self, items: list[tuple[int, int]]) -> None:
        raise AssertionError("no atomic blocks here")

    def compare_swap_many(self, items: list[tuple[int, int, int]]) -> list[int]:
        raise AssertionError("no atomic blocks here")

    def write_many(self, items: list[tuple[int, memoryview]],
                   persist: Persist | None = None) -> None:
        raise AssertionError("no atomic blocks here")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("method", ["gpspm", "apm", "native"])
def test_a_flush_orders_the_writes_of_every_channel(method: str) -> None:
    """Three threads write at once (so on three channels); another flushes. Every write is
    then placed (apm) and persisted (gpspm, native): the flush put a barrier on each channel
    that wrote, not only on the one it took (a COMMIT or a FLUSH orders only its own QP)."""
    import threading

    target = RcTarget(gate=3)
    c = Client(RcChannel(target), method, reconnect=lambda: RcChannel(target),
               reconnect_timeout=30)
    blobs = {i * 8192: bytes([i + 1]) * 5000 for i in range(3)}

    def write(off: int) -> None:
        c.pwrite(memoryview(blobs[off]), off)

    threads = [threading.Thread(target=write, args=(off,)) for off in blobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert target.channels == 3 and c.channels == 3
    assert not any(target.mem)  # completed, not placed: nothing has ordered them yet
    target.gate = None
    c.flush()
    seen = target.durable if method == "gpspm" else target.mem
    for off, blob in blobs.items():
        assert seen[off:off + len(blob)] == blob, f"the write at {off} was not covered"


def test_a_restart_counts_once_whichever_channel_meets_it_first() -> None:
    """A channel lost the target and is looking for it; between two of its tries a channel
    opened afresh reaches the restarted target (a new instance) and counts the restart. The
    first channel's success then is the same restart, not another (the demo showed 2 for 1)."""
    import time

    from pmemblk.client import _Channel

    first = MemoryTransport()
    tries: list[int] = []

    def again() -> MemoryTransport:
        tries.append(1)
        if len(tries) == 1:  # meanwhile, a new channel meets the restarted target
            c._adopt(_Channel(2, None, c._generation), same_region(first, instance=2))
            raise TransportError("not listening yet")
        return same_region(first, instance=2)

    c = Client(first, "gpspm", reconnect=again, reconnect_timeout=30)
    c._recover(c._first, ConnectionLost("gone"), time.monotonic() + 5)
    assert len(tries) == 2 and c.reconnects == 1
    # A connection that breaks with the target still running (the same start) is a
    # reconnect of its own.
    c._recover(c._first, ConnectionLost("reset"), time.monotonic() + 5)
    assert c.reconnects == 2


def test_a_channel_that_fails_to_open_is_not_a_reconnect() -> None:
    """Opening another channel fails once (in the VM: a race finding its completion channel's
    descriptor) while the target keeps running: it tries again and opens; nothing was lost,
    so nothing counts as a reconnect (the VM's status showed 2 reconnects for 1 restart)."""
    first = MemoryTransport()
    tries: list[int] = []

    def again() -> MemoryTransport:
        tries.append(1)
        if len(tries) == 1:
            raise TransportError("cannot find the file descriptor of the new completion channel")
        return same_region(first)  # the same start of the target

    c = Client(first, "gpspm", reconnect=again, reconnect_timeout=30)
    busy = c._take()  # the first channel, in use
    other = c._take()  # none idle: a second one is opened, at the second try
    assert other is not busy and len(tries) == 2
    assert c.channels == 2 and c.reconnects == 0


def test_a_new_channel_that_finds_another_region_gives_up_and_is_not_kept() -> None:
    """A channel opened while the first is busy reaches a target that now serves another
    region: the client gives up for good, and the channel that never worked is not one of
    its channels (nor handed out, nor closed twice)."""
    first = MemoryTransport()
    c = Client(first, "gpspm", reconnect=lambda: same_region(first, region_uuid=uuid.uuid4()),
               reconnect_timeout=30)
    busy = c._take()
    with pytest.raises(GaveUp, match="now serves region"):
        c._take()
    assert c.channels == 1
    c._idle.put(busy)
    with pytest.raises(GaveUp, match="now serves region"):
        c.pwrite(memoryview(b"x"), 0)
    c.close()


def test_native_flushes_the_dirty_ranges_and_fua_posts_the_flush_with_the_write() -> None:
    all3 = p.FLUSH_APM | p.FLUSH_GPSPM | p.FLUSH_NATIVE
    t = MemoryTransport(methods=all3)
    c = Client(t, "auto")
    assert c.flush_method == "native" and c.persistent  # auto prefers it where durable
    c.pwrite(memoryview(b"a" * 100), 0)
    c.pwrite(memoryview(b"b" * 50), 9000)
    assert t.durable == bytes(SIZE)
    c.flush()
    assert t.calls[-1] == ("native", [(0, 100), (9000, 50)])
    assert not [x for x in t.calls if x[0] == "commit"]  # the target's CPU is not asked
    c.pwrite(memoryview(b"f" * 10), 20000, fua=True)
    assert t.calls[-1] == ("native", [(20000, 10)]) and t.durable[20000:20010] == b"f" * 10
    calls = len(t.calls)
    c.flush()
    assert len(t.calls) == calls  # the FUA write persisted itself: nothing left to flush


def test_native_visibility_only_is_refused_unless_accepted() -> None:
    all3 = p.FLUSH_APM | p.FLUSH_GPSPM | p.FLUSH_NATIVE
    t = MemoryTransport(methods=all3, durable=p.FLUSH_GPSPM)  # FLUSH_GLOBAL only
    assert Client(t, "auto").flush_method == "gpspm"
    with pytest.raises(ConfigError, match="flush=native gives only visibility"):
        Client(t, "native")
    assert not Client(t, "native", allow_visibility_only=True).persistent


M = TypeVar("M", bound=MemoryTransport)


def atomic_transport(*, shared: bool, atomic_write: bool, t: M) -> M:
    """The in-memory transport ``t``, its export holding a fresh atomic-blocks layout (8
    lanes, all granted), persisted."""

    def put(off: int, data: bytes) -> None:
        t.mem[off:off + len(data)] = data

    ab.format_area(ab.Area(lambda o, n: bytes(t.mem[o:o + n]), put, lambda o, n: None, 0,
                           SIZE), 4096, lanes=8)
    t.durable[:] = t.mem
    flags = (t.info.region_flags | p.REGION_ATOMIC_BLOCKS
             | (p.REGION_SHARED if shared else 0) | (p.REGION_ATOMIC_WRITE if atomic_write else 0))
    t.info = dataclasses.replace(t.info, region_flags=flags, lane_first=0, lane_count=8,
                                 lane_grant=1)
    return t


def atomic_client(t: MemoryTransport) -> tuple[Client, ab.Info]:
    c = Client(t, "gpspm")
    assert c.blocks is not None
    return c, c.blocks.info


def durable_block(t: MemoryTransport, info: ab.Info, lba: int) -> bytes:
    """A logical block as the durable copy holds it (what a power cut would leave)."""
    entry = int.from_bytes(t.durable[info.map_at(lba):info.map_at(lba) + 8], "little")
    at = info.block_at(ab.entry_block(entry))
    return bytes(t.durable[at:at + info.sector_size])


@pytest.mark.parametrize(("shared", "atomic_write", "mover"), [
    (False, True, "atomic write"), (True, True, "cas"), (False, False, "cas")])
def test_atomic_blocks_writes_are_persistent_when_acknowledged(
        shared: bool, atomic_write: bool, mover: str) -> None:
    """Without any FLUSH, every block written is in the durable copy through the durable
    map; the map moves by ATOMIC WRITE only for a sole writer that has it."""
    t = atomic_transport(shared=shared, atomic_write=atomic_write, t=MemoryTransport())
    c = Client(t, "gpspm")
    assert c.blocks is not None
    info = c.blocks.info
    assert c.size == info.export_size < SIZE
    data = bytes(range(256)) * (5 * 4096 // 256)
    c.pwrite(memoryview(data[:4096 * 5]), 4096 * 3)  # five blocks: one round of five lanes
    c.pwrite(memoryview(b"x" * 100), 4096 * 3 + 50)  # part of one: merged, still atomic
    expect = bytearray(data[:4096 * 5])
    expect[50:150] = b"x" * 100
    buf = bytearray(4096 * 5)
    c.pread(memoryview(buf), 4096 * 3)
    assert buf == expect
    assert b"".join(durable_block(t, info, lba) for lba in range(3, 8)) == expect
    movers = {name for name, _ in t.calls if name in ("atomic write", "cas")}
    assert movers == {mover}
    before = len(t.calls)
    c.flush()  # nothing left to persist
    assert [name for name, _ in t.calls[before:]] == []


class LosesAMoveReply(MemoryTransport):
    """Its first batch of map moves fails like a lost connection, after (``applied``) or
    before the target carried them out."""

    def __init__(self, applied: bool) -> None:
        super().__init__()
        self.applied, self.failed = applied, False

    def compare_swap_many(self, items: list[tuple[int, int, int]]) -> list[int]:
        if not self.failed:
            self.failed = True
            if self.applied:
                super().compare_swap_many(items)
            raise ConnectionLost("lost in the middle of moving the map")
        return super().compare_swap_many(items)


@pytest.mark.parametrize("applied", [True, False])
def test_a_lane_whose_move_was_cut_short_is_resolved_from_the_map(applied: bool) -> None:
    """The write fails; the next one resolves the lanes it held from the map (moved: the old
    block is free; not moved: the new one is) and every block stays mapped once or free once."""
    t = atomic_transport(shared=True, atomic_write=False, t=LosesAMoveReply(applied))
    c, info = atomic_client(t)
    with pytest.raises(TransportError):
        c.pwrite(memoryview(b"A" * 4096 * 3), 0)
    c.pwrite(memoryview(b"B" * 4096 * 4), 4096 * 2)  # takes the lanes again: resolved first
    buf = bytearray(4096 * 6)
    c.pread(memoryview(buf), 0)
    first = b"A" * 8192 if applied else bytes(8192)
    assert buf == first + b"B" * 4096 * 4
    mapped = [ab.entry_block(int.from_bytes(t.mem[info.map_at(i):info.map_at(i) + 8], "little"))
              for i in range(info.external_blocks)]
    assert c.blocks is not None
    frees = [lane.free for lane in c.blocks._free]
    assert len(frees) == 8 and sorted(mapped + frees) == list(range(info.internal_blocks))


class MovesUnderARead(MemoryTransport):
    """The first read of physical block ``victim`` happens just as another writer moves its
    logical block elsewhere and reuses the block for something else."""

    def __init__(self) -> None:
        super().__init__()
        self.victim: int | None = None
        self.move: tuple[int, bytes, int, bytes] | None = None  # map at, entry, block at, data

    def read(self, buf: memoryview, offset: int) -> None:
        if self.victim is not None and offset == self.victim and self.move is not None:
            map_at, entry, block_at, data = self.move
            self.mem[block_at:block_at + len(data)] = data  # the new block, whole
            self.mem[map_at:map_at + 8] = entry  # the logical block moved there
            self.mem[offset:offset + 4096] = b"?" * 4096  # and the old one reused
            self.victim = None
        super().read(buf, offset)


def test_a_read_rereads_a_block_that_moved_under_it() -> None:
    t = atomic_transport(shared=True, atomic_write=False, t=MovesUnderARead())
    c, info = atomic_client(t)
    c.pwrite(memoryview(b"o" * 4096), 4096 * 7)
    old = int.from_bytes(t.mem[info.map_at(7):info.map_at(7) + 8], "little")
    spare = info.external_blocks  # lane 0's free block (unused): where the other moved it
    t.victim = info.block_at(ab.entry_block(old))
    t.move = (info.map_at(7), ab.next_entry(old, spare).to_bytes(8, "little"),
              info.block_at(spare), b"n" * 4096)
    buf = bytearray(4096)
    c.pread(memoryview(buf), 4096 * 7)
    assert buf == b"n" * 4096  # the new data, whole: never the reused block's


def test_a_lane_whose_cut_move_was_overtaken_is_retired_not_guessed() -> None:
    """The move failed before it happened, and another writer moved the block since: the map
    holds neither entry the lane knows, so which block is free cannot be told. The lane is
    retired (until the target recovers it) and the writes go on through the others."""
    t = atomic_transport(shared=True, atomic_write=False, t=LosesAMoveReply(applied=False))
    c, info = atomic_client(t)
    with pytest.raises(TransportError):
        c.pwrite(memoryview(b"A" * 4096), 0)
    at = info.map_at(0)
    old = int.from_bytes(t.mem[at:at + 8], "little")
    t.mem[at:at + 8] = ab.next_entry(old, ab.entry_block(old)).to_bytes(8, "little")  # moved
    c.pwrite(memoryview(b"B" * 4096 * 2), 4096)
    assert c.blocks is not None and c.blocks._usable == 7
    buf = bytearray(4096 * 3)
    c.pread(memoryview(buf), 0)
    assert buf == bytes(4096) + b"B" * 8192


class AnotherWriterFirst(MemoryTransport):
    """Just before this client's first map move, another writer moves the same block
    (to ``spare``, holding ``theirs``): the move loses and must go round again."""

    def __init__(self) -> None:
        super().__init__()
        self.spare: tuple[int, int, int, bytes] | None = None  # map at, block at, block, data

    def compare_swap_many(self, items: list[tuple[int, int, int]]) -> list[int]:
        if self.spare is not None:
            map_at, block_at, block, data = self.spare
            self.spare = None
            old = int.from_bytes(self.mem[map_at:map_at + 8], "little")
            self.mem[block_at:block_at + len(data)] = data
            self.mem[map_at:map_at + 8] = ab.next_entry(old, block).to_bytes(8, "little")
        return super().compare_swap_many(items)


@pytest.mark.parametrize("part", [False, True])
def test_a_move_that_loses_the_race_goes_round_again(part: bool) -> None:
    """The write is not lost: it lands on top of the other writer's, a part of a block merged
    into theirs."""
    t = atomic_transport(shared=True, atomic_write=False, t=AnotherWriterFirst())
    c, info = atomic_client(t)
    theirs = info.external_blocks  # lane 0's free block: the other writer's, here
    t.spare = (info.map_at(5), info.block_at(theirs), theirs, b"Z" * 4096)
    ours = b"o" * (100 if part else 4096)
    c.pwrite(memoryview(ours), 4096 * 5 + (50 if part else 0))
    buf = bytearray(4096)
    c.pread(memoryview(buf), 4096 * 5)
    assert buf == (b"Z" * 50 + ours + b"Z" * (4096 - 150) if part else ours)
    cas = [args for name, args in t.calls if name == "cas"]
    assert len(cas) == 2  # lost, then won
