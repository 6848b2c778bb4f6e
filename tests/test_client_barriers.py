"""Barriers that fail, and what a flush covers, on a fake ordered (RC-like) target (issue 23).

Over a stream a write's reply proves placement, so no host integration test ever needs a
barrier, and no barrier ever fails on the host. Here the fake RC target of
``tests/test_client.py`` (a completed WRITE is placed only when a later operation on the *same*
channel orders it) gets a fault hook that makes a barrier fail; and a write that completes while
a flush is under way is checked not to be counted as covered by it.
"""

from __future__ import annotations

import dataclasses
import errno
import threading
from typing import Any

import pytest

from pmemblk.client import Client
from pmemblk.errors import ConnectionLost, GaveUp, TransportError
from pmemblk.transport import Persist

from .test_client import RcChannel, RcTarget

#: How long a test waits for a thread or an event before it calls the run a failure.
DEADLINE = 10.0


class FaultyRcTarget(RcTarget):
    """An RcTarget whose barriers can be made to fail, in the order they are posted.

    ``fail_at`` = (stage, n): the n-th barrier of that stage ("start": posting, "finish":
    waiting; counted from 0 over every channel) fails, and so do the next ``times - 1`` barrier
    operations on that channel (the client's retry of it included). A failed barrier places
    nothing: whatever it would have ordered stays unplaced."""

    def __init__(self, gate: int = 0) -> None:
        super().__init__(gate)
        self.fail_at: tuple[str, int] | None = None
        self.times = 0
        self.counts = {"start": 0, "finish": 0}
        self.failing: FaultyRcChannel | None = None
        self.failures = 0
        #: Channels made before this loss epoch are gone (the target lost power since).
        self.epoch = 0
        #: The injected fault breaks its channel for good, as a failed work request puts a
        #: queue pair in the error state; the target lives on, and so the writes its NIC
        #: acknowledged are placed.
        self.breaks = False


class FaultyRcChannel(RcChannel):
    target: FaultyRcTarget

    def __init__(self, target: FaultyRcTarget) -> None:
        super().__init__(target)
        self.epoch = target.epoch
        self.broken = False
        self.info = dataclasses.replace(target.info, loss_epoch=target.epoch)
        #: Hooks a test sets: called when a read (a write) starts on this channel.
        self.on_read: Any = None
        self.on_write: Any = None
        #: A FUA write's persistence step fails (the write itself is done, not placed).
        self.fail_fua = False
        #: The next this many COMMITs (or native FLUSHes) fail before they order anything.
        self.fail_commit = 0

    def _alive(self) -> None:
        if self.epoch != self.target.epoch:
            raise ConnectionLost("the target lost power")
        if self.broken:
            raise ConnectionLost("the connection is in the error state")

    def _fault(self, stage: str) -> None:
        t = self.target
        if t.failing is None and t.fail_at is not None and stage in t.counts:
            want, n = t.fail_at
            if stage == want and t.counts[stage] == n:
                t.failing = self
            t.counts[stage] += 1
        if t.failing is self and t.times > 0:
            t.times -= 1
            t.failures += 1
            if t.breaks:
                self._place()
                self.broken = True
            raise ConnectionLost(f"injected: the barrier's {stage} failed")

    def read(self, buf: memoryview, offset: int) -> None:
        self._alive()
        if self.on_read is not None:
            self.on_read()
        super().read(buf, offset)

    def write(self, data: memoryview, offset: int, persist: Persist | None = None) -> None:
        self._alive()
        if self.on_write is not None:
            self.on_write()
        if persist is not None and self.fail_fua:
            super().write(data, offset, None)
            raise ConnectionLost("injected: the FUA step failed")
        super().write(data, offset, persist)

    def read_barrier(self, offset: int) -> None:
        self._alive()
        self._fault("read")
        super().read_barrier(offset)

    def start_barrier(self, offset: int) -> None:
        self._alive()
        self._fault("start")
        self._started = True

    def finish_barrier(self) -> None:
        self._alive()
        assert self._started, "finish_barrier without start_barrier"
        self._started = False
        self._fault("finish")
        super().finish_barrier()

    def commit(self, ranges: list[tuple[int, int]]) -> None:
        self._alive()
        if self.fail_commit:
            self.fail_commit -= 1
            raise ConnectionLost("injected: the COMMIT failed")
        super().commit(ranges)


def three_channels_wrote(method: str, reconnect_timeout: float = 0
                         ) -> tuple[FaultyRcTarget, Client, dict[int, bytes]]:
    """Three threads write at once, so on three channels; nothing is placed yet."""
    target = FaultyRcTarget(gate=3)
    c = Client(FaultyRcChannel(target), method, reconnect=lambda: FaultyRcChannel(target),
               reconnect_timeout=reconnect_timeout)
    blobs = {i * 8192: bytes([i + 1]) * 5000 for i in range(3)}
    threads = [threading.Thread(target=c.pwrite, args=(memoryview(blob), off))
               for off, blob in blobs.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join(DEADLINE)
        assert not th.is_alive(), "a write did not finish"
    assert c.channels == 3 and not any(target.mem)
    target.gate = None
    return target, c, blobs


def own_is_channel_1(c: Client) -> None:
    """The idle pool in channel order, so that the next FLUSH takes channel 1 as its own (for
    gpspm and native, the one its COMMIT or FLUSH orders, never a barrier's)."""
    idle = [c._idle.get_nowait() for _ in range(c.channels)]
    for ch in sorted(idle, key=lambda ch: ch.number):
        c._idle.put(ch)


def seen(target: RcTarget, method: str) -> bytearray:
    """What an acknowledged FLUSH promises: placement for apm, the durable copy otherwise."""
    return target.mem if method == "apm" else target.durable


# apm orders all three channels; gpspm and native order the two that are not the flush's own
# (its COMMIT or FLUSH orders that one): the barrier that fails is each of them in turn.
ORDERS = [(m, stage, n) for m, barriers in (("apm", 3), ("gpspm", 2), ("native", 2))
          for stage in ("start", "finish") for n in range(barriers)]


@pytest.mark.parametrize(("method", "stage", "n"), ORDERS)
def test_a_failed_barrier_fails_the_flush_and_the_next_flush_orders_it_again(
        method: str, stage: str, n: int) -> None:
    """The n-th barrier fails when posted (start) or when waited for (finish), and so does the
    client's retry of it: the FLUSH fails, the channel's write is not claimed, and that
    channel still needs its barrier, so every later FLUSH fails until it is ordered; once the
    fault is gone the next FLUSH orders it and every write is covered."""
    target, c, blobs = three_channels_wrote(method)
    target.fail_at, target.times = (stage, n), 4
    for _ in range(2):  # each FLUSH: its barrier and the retry of it fail
        own_is_channel_1(c)
        with pytest.raises(TransportError, match="injected"):
            c.flush()
    assert target.failures == 4 and target.failing is not None
    failed = target.failing
    assert failed.pending, "the failed barrier's channel had nothing to order"
    off, blob = failed.pending[0]
    assert seen(target, method)[off:off + len(blob)] != blob  # not claimed
    assert not any(target.durable)  # no COMMIT went out behind a failed barrier
    own_is_channel_1(c)
    c.flush()  # the fault is spent
    assert not failed.pending, "the next flush did not order the channel whose barrier failed"
    for off, blob in blobs.items():
        assert seen(target, method)[off:off + len(blob)] == blob, f"the write at {off} is lost"


@pytest.mark.parametrize(("method", "stage", "n"), ORDERS)
def test_a_barrier_whose_connection_breaks_is_ordered_again_on_a_new_one(
        method: str, stage: str, n: int) -> None:
    """The barrier's failure breaks its connection (the target lives on): the flush gives that
    channel a new connection and orders it there, and the FLUSH succeeds with every write."""
    target, c, blobs = three_channels_wrote(method, reconnect_timeout=30)
    target.fail_at, target.times, target.breaks = (stage, n), 1, True
    own_is_channel_1(c)
    c.flush()
    assert target.failures == 1 and target.failing is not None and target.failing.broken
    assert c.reconnects == 1 and c.lost is None and target.channels == 4
    for off, blob in blobs.items():
        assert seen(target, method)[off:off + len(blob)] == blob, f"the write at {off} is lost"


@pytest.mark.parametrize("method", ["apm", "gpspm", "native"])
def test_barriers_that_fail_because_the_target_lost_power_fail_the_flush(method: str) -> None:
    """Every channel's barrier fails: the target lost power. The flush reconnects each channel
    to order it again, and the target answers in a new loss epoch: the unplaced writes are
    gone, so this FLUSH fails (EIO), although every barrier then succeeds on its new
    connection, and so does every later one."""
    target, c, _ = three_channels_wrote(method, reconnect_timeout=30)
    target.epoch += 1
    for _ in range(2):
        with pytest.raises(GaveUp, match="loss epoch 0 → 1") as exc:
            c.flush()
        assert exc.value.errno == errno.EIO
    assert not any(target.durable)


@pytest.mark.parametrize("method", ["gpspm", "native"])
def test_a_failed_commit_leaves_its_channel_needing_a_barrier(method: str) -> None:
    """The COMMIT (native: the FLUSH) would have ordered the flushing channel's own writes; it
    failed, so when the next FLUSH runs on another channel, that one must get its barrier."""
    target, c, blobs = three_channels_wrote(method)
    own_is_channel_1(c)
    first = c.transport
    assert isinstance(first, FaultyRcChannel) and first.pending
    first.fail_commit = 1
    with pytest.raises(TransportError, match="injected"):
        c.flush()
    assert not any(target.durable)
    c._idle.put(c._idle.get_nowait())  # channel 1 to the back: the next FLUSH runs on 2
    c.flush()
    for off, blob in blobs.items():
        assert target.durable[off:off + len(blob)] == blob, f"the write at {off} is lost"


@pytest.mark.parametrize("method", ["apm", "gpspm", "native"])
def test_a_failed_fua_barrier_is_ordered_by_the_next_flush(method: str) -> None:
    """A FUA write whose persistence step failed is not acknowledged, and the next FLUSH must
    still order and persist it (it may have been written)."""
    target = FaultyRcTarget()
    c = Client(FaultyRcChannel(target), method)
    ch = c.transport
    assert isinstance(ch, FaultyRcChannel)
    ch.fail_fua = True
    with pytest.raises(TransportError, match="injected"):
        c.pwrite(memoryview(b"f" * 3000), 4096, fua=True)
    ch.fail_fua = False
    assert ch.pending  # written, not placed
    c.flush()
    assert seen(target, method)[4096:7096] == b"f" * 3000


class SignallingLock:
    """A channel's lock that says when the flushing thread starts to wait for it."""

    def __init__(self, flusher: str, waiting: threading.Event) -> None:
        self._lock = threading.Lock()
        self._flusher = flusher
        self._waiting = waiting

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if threading.current_thread().name == self._flusher:
            self._waiting.set()
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def wait(event: threading.Event, what: str) -> None:
    assert event.wait(DEADLINE), f"timed out waiting until {what}"


def join(th: threading.Thread) -> None:
    th.join(DEADLINE)
    assert not th.is_alive(), f"{th.name} did not finish"


def write_during_flush(method: str) -> tuple[FaultyRcTarget, Client]:
    """Channel 1 wrote A and is busy with a read; a FLUSH starts, finds channel 1 to order and
    waits for it; meanwhile write B completes on channel 2, which that FLUSH did not find (it
    had not written yet when the FLUSH looked). Returns once all three are done."""
    target = FaultyRcTarget()
    c = Client(FaultyRcChannel(target), method, reconnect=lambda: FaultyRcChannel(target),
               reconnect_timeout=30)
    c.pwrite(memoryview(A), 0)  # on channel 1
    first = c.transport
    assert isinstance(first, FaultyRcChannel)
    waiting = threading.Event()
    c._first.lock = SignallingLock("flusher", waiting)  # type: ignore[assignment]
    reading, end_read = threading.Event(), threading.Event()
    writing, end_write = threading.Event(), threading.Event()

    def on_read() -> None:
        reading.set()
        wait(end_read, "the read may end")

    def on_write() -> None:
        writing.set()
        wait(end_write, "write B may complete")

    def second_channel() -> FaultyRcChannel:
        ch = FaultyRcChannel(target)
        ch.on_write = on_write
        return ch

    first.on_read = on_read
    reader = threading.Thread(target=c.pread, args=(memoryview(bytearray(10)), 0),
                              name="reader")
    reader.start()
    wait(reading, "the read holds channel 1")
    c._reconnect = second_channel
    writer = threading.Thread(target=c.pwrite, args=(memoryview(B), AT_B), name="writer")
    writer.start()
    wait(writing, "write B is under way on channel 2")
    c._reconnect = lambda: FaultyRcChannel(target)
    flusher = threading.Thread(target=c.flush, name="flusher")
    flusher.start()
    wait(waiting, "the flush waits for channel 1")
    end_write.set()
    join(writer)  # B is acknowledged while the flush is under way
    first.on_read = None
    end_read.set()
    join(reader)
    join(flusher)
    assert c.channels == 3  # channel 3 is the flush's own
    return target, c


A, B, AT_B = b"A" * 5000, b"B" * 5000, 16384


@pytest.mark.parametrize("method", ["gpspm", "native", "apm"])
def test_a_write_that_completes_during_a_flush_is_persisted_by_the_next(method: str) -> None:
    """That FLUSH must not take B as covered (it did not order channel 2): the next FLUSH
    orders and persists B. (Taking B's range with A's, then committing it on a channel that
    never ordered B, persisted what was there before B, and the next FLUSH had nothing left.)"""
    target, c = write_during_flush(method)
    assert seen(target, method)[:len(A)] == A
    c.flush()
    assert seen(target, method)[AT_B:AT_B + len(B)] == B, "B was lost by the next flush"


@pytest.mark.parametrize("method", ["gpspm", "apm"])
def test_a_write_that_completes_during_a_flush_is_still_unflushed(method: str) -> None:
    """When the target comes back in a new loss epoch (a power cut) before B's own flush, the
    next FLUSH fails: B may be lost, and the FLUSH during which it completed did not cover it."""
    target, c = write_during_flush(method)
    target.epoch += 1  # the power cut: every channel's connection is gone
    c.pread(memoryview(bytearray(10)), 0)  # reconnects, sees the new loss epoch
    with pytest.raises(GaveUp, match="loss epoch") as exc:
        c.flush()
    assert exc.value.errno == errno.EIO
