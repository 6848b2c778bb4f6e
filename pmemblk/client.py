"""The client core: block requests on top of a transport, with the flush policy.

Flush methods (what an acknowledged FLUSH or FUA means is in docs/persistence.md):

- ``apm`` (appliance persistency method): after the writes, one small RDMA READ on the same
  queue pair. The READ cannot complete before every earlier WRITE on that QP has been placed in
  the target's memory. The target's CPU is not involved.
- ``gpspm`` (general-purpose server persistency method): a COMMIT message listing the ranges
  written since the last flush; the target persists them (``pmem_persist`` on real pmem,
  ``pmem_msync`` otherwise) and replies.

FUA is the write with the same persistence step for just that range, posted together so that
both take one wait. Each is a policy object (``pmemblk/flush.py``), chosen when the client
connects.

Channels: a client is one plugin instance's link to one target, shared by its NBD connections
and their nbdkit worker threads. A request takes an idle channel (a transport connection: a
queue pair, or a socket) from the client's pool, opened on demand up to ``max_channels``, uses
it alone and gives it back, so that requests run concurrently with no hand-off between threads
and no more threads than channels are in a request at once. Every channel carries the
client's id in its HELLO, so the target counts them as one client with one writer slot. A
FLUSH on any thread
covers every write completed on any channel: over RDMA a barrier READ is posted on each channel
that wrote since its last barrier (together, then waited for), because a queue pair orders
only its own operations; over a stream a write's reply already proves placement.

Reconnect: when a channel's connection is lost (disconnect event, QP in error, TCP reset, no
answer before the deadline), the request in progress is held; one thread reconnects with
backoff (the others that lost theirs meanwhile wait for it, then reconnect once each),
checks that the target serves the same region (UUID and size), and issues the request again
(READ, WRITE and ZERO of the same range are idempotent, and so is a COMMIT). After
``reconnect_timeout`` seconds without success the request fails with EIO. If the target's loss
epoch changed while writes were unflushed on any channel (it restarted after a reboot or power
cut, so those writes may be gone), every later FLUSH fails with EIO: acknowledging it would be
a lie (docs/security.md).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import durability
from .blockmap import BlockMap
from .errors import (
    ConfigError,
    GaveUp,
    PmemblkError,
    RemoteError,
    RequestError,
    TransportError,
)
from .flush import make_policy
from .protocol import FLUSH_METHODS, Welcome
from .resource import Closeable
from .stats import IoStats
from .transport import Persist, Transport

log = logging.getLogger(__name__)

#: The operations counted in statistics (a FUA write counts as a write).
OPS = ("read", "write", "zero", "flush")
#: Channels one client opens at most (plugin key channels=): more threads than this in
#: Python at once only wait for each other's GIL (docs/benchmarks.md).
DEFAULT_CHANNELS = 8


class _Channel:
    """One connection to the target, the lock held by whoever uses it (the thread that took
    it from the pool, or a flush ordering it), and what a flush must order on it."""

    def __init__(self, number: int, transport: Transport | None, generation: int) -> None:
        self.number = number
        self.transport = transport
        #: The client's reconnect generation this connection was made in.
        self.generation = generation
        self.lock = threading.Lock()
        #: Where it wrote since its last barrier, where completion does not prove placement.
        self.wrote_at: int | None = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Client(Closeable):
    """Block I/O against one target through a pool of channels. A context manager.

    A request takes an idle channel from the pool, uses it alone and gives it back; while
    fewer than ``max_channels`` are open and none is idle, a new one is opened. So no thread
    ever waits for another's completion, and at most ``max_channels`` threads are in a request
    at once (the others sleep in the pool's queue, away from the GIL). ``transport`` is the
    first channel's connection; ``reconnect`` opens another (a new channel, or one replacing a
    lost connection). Without it, the first channel is the only one.
    """

    def __init__(self, transport: Transport, flush: str = "auto", readonly: bool = False,
                 allow_visibility_only: bool = False,
                 reconnect: Callable[[], Transport] | None = None,
                 reconnect_timeout: float = 0.0, stats: IoStats | None = None,
                 max_channels: int = DEFAULT_CHANNELS) -> None:
        if flush != "auto" and flush not in FLUSH_METHODS:
            raise ConfigError(f"unknown flush method {flush!r}: use auto, native, apm or gpspm")
        info = transport.info
        try:
            method, persistent = durability.choose(info.flush_methods, info.durable_methods,
                                                   flush, allow_visibility_only)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        #: What the first connection's WELCOME said: every later connection must agree.
        self.info: Welcome = info
        #: Chosen once: what the writes since the last flush are, and how to persist them.
        self.policy = make_policy(method)
        #: Whether an acknowledged FLUSH/FUA survives a power cut (else: the target's memory).
        self.persistent = persistent
        #: Atomic blocks: reads and writes go through the region's block map.
        self.blocks = BlockMap.load(transport) if info.atomic_blocks else None
        self.size = info.export_size if self.blocks is None else self.blocks.info.export_size
        self.block_size = info.block_size
        self.readonly = info.readonly or readonly
        self._reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        #: Shared with the plugin instance's other clients (None: not counted).
        self.stats = stats
        #: Why every FLUSH now fails (unflushed writes may have been lost), or None.
        self.lost: str | None = None
        #: Why every request now fails (the target serves something else), or None.
        self.broken: str | None = None
        self._first = _Channel(1, transport, 0)
        self._all = [self._first]  # every channel, open or being opened
        self._idle: queue.SimpleQueue[_Channel] = queue.SimpleQueue()  # the pool
        self._idle.put(self._first)
        self._max_channels = max_channels if reconnect is not None else 1
        self._numbers = itertools.count(2)  # channel numbers: the flush locks in their order
        self._lock = threading.Lock()  # the channel list, write counts, the loss epoch
        self._recover_lock = threading.Lock()  # one thread finds the target again
        self._flush_lock = threading.Lock()  # one flush at a time
        self._generation = 0  # reconnects that found the target again
        self._epoch = info.loss_epoch
        self._instance = info.instance  # the start of the target last seen
        self._writes = 0  # writes completed
        self._flushed = 0  # ... of which the last successful FLUSH covered this many
        if not persistent:
            log.warning(
                "flush=%s gives visibility only on this target (accepted with "
                "allow-visibility-only): an acknowledged FLUSH proves the data reached the "
                "target's memory; it survives the target process, not a power cut", method)
        else:
            log.info("flush=%s: persistent", method)

    @property
    def flush_method(self) -> str:
        return self.policy.name

    @property
    def transport(self) -> Transport:
        """The first channel's connection (what the client was made with, or its successor)."""
        assert self._first.transport is not None
        return self._first.transport

    @property
    def channels(self) -> int:
        with self._lock:
            return len(self._all)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RequestError(
                f"request [{offset}, {offset + length}) is outside the {self.size}-byte export"
            )

    def _check_writable(self) -> None:
        if self.readonly:
            raise RequestError("the export is read-only", errno.EPERM)

    # -- channels ------------------------------------------------------------------------

    def _take(self) -> _Channel:
        """An idle channel: from the pool, or a new one while fewer than the most are open, or
        (blocking, the GIL released) the next one given back."""
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            grow = len(self._all) < self._max_channels
            if grow:
                ch = _Channel(next(self._numbers), None, self._generation)
                self._all.append(ch)
        if grow and self._open_channel(ch):
            return ch
        return self._idle.get()

    def _open_channel(self, ch: _Channel) -> bool:
        """Connect a new channel (listed already); False if the target refused another one."""
        assert self._reconnect is not None
        try:
            self._adopt(ch, self._reconnect())
        except RemoteError as exc:
            self._unlist(ch)
            if exc.errno != errno.EBUSY or self.broken is not None:
                raise
            # The target's limit on one client's connections (serve --max-channels): the
            # channels open now are all this client will have.
            with self._lock:
                self._max_channels = len(self._all)
            log.warning("the target refused another channel (%s): using the %d open",
                        exc, self._max_channels)
            return False
        except TransportError as exc:
            if self.reconnect_timeout <= 0:
                self._unlist(ch)
                raise
            try:
                self._recover(ch, exc, time.monotonic() + self.reconnect_timeout, fresh=True)
            except BaseException:
                self._unlist(ch)
                raise
        except BaseException:
            self._unlist(ch)
            raise
        log.debug("channel %d opened", ch.number)
        return True

    def _unlist(self, ch: _Channel) -> None:
        with self._lock:
            if ch in self._all:
                self._all.remove(ch)

    # -- reconnect -------------------------------------------------------------------------

    def _run(self, ch: _Channel, op: Callable[[Transport], None]) -> None:
        """Run ``op`` on the channel (whose lock the caller holds); on a lost connection,
        reconnect and run it again."""
        if self.broken is not None:
            raise GaveUp(self.broken)
        deadline: float | None = None
        delay = 0.0
        while True:
            try:
                assert ch.transport is not None
                op(ch.transport)
                return
            except TransportError as exc:
                if self._reconnect is None or self.reconnect_timeout <= 0:
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                elif now >= deadline:
                    # The target is there, but this request keeps losing the connection: give
                    # up like a target that never came back, never loop for ever.
                    self.broken = (f"the request kept failing for {self.reconnect_timeout:g}s "
                                   f"(reconnect-timeout), on {self.reconnects} new connections: "
                                   f"{exc}")
                    log.error("%s: failing every request", self.broken)
                    raise GaveUp(self.broken) from None
                else:  # failed again on a fresh connection: back off before the next try
                    delay = min(max(delay * 2, 0.05), 2.0)
                    time.sleep(min(delay, deadline - now))
                self._recover(ch, exc, deadline)

    def _recover(self, ch: _Channel, cause: TransportError, deadline: float,
                 fresh: bool = False) -> None:
        """Give the channel a new connection. The first thread to lose the target looks for
        it; threads that lost theirs meanwhile wait, then reconnect once each. ``fresh``: the
        channel never had a connection (opening it failed), so nothing was lost: it only
        counts as a reconnect if it finds a restarted target."""
        seen = None if fresh else ch.generation
        if ch.transport is not None:
            ch.transport.close()
            ch.transport = None
        with self._recover_lock:
            if self.broken is not None:
                raise GaveUp(self.broken)
            # Found again since this connection was made: this channel only reconnects (and
            # keeps trying quietly if the target is busy with the others' connects).
            self._find_target(ch, cause, deadline, seen)

    def _connect_again(self) -> Transport:
        assert self._reconnect is not None
        try:
            return self._reconnect()
        except PmemblkError as exc:
            # EBUSY: the target has not yet noticed an old connection. Anything else (a
            # refusal, a new secret, another protocol version) will not change by waiting.
            if isinstance(exc, TransportError) or (isinstance(exc, RemoteError)
                                                   and exc.errno == errno.EBUSY):
                raise TransportError(str(exc)) from None
            self.broken = f"reconnecting failed: {exc}"
            raise GaveUp(self.broken) from None

    def _find_target(self, ch: _Channel, cause: TransportError, deadline: float,
                     seen: int | None) -> None:
        """Connect ``ch`` again, with backoff, until ``deadline``. ``seen``: the generation
        its lost connection was made in (None: it had none); if nothing has been found since,
        this thread is the first to find the target gone (it says so, and its success is a
        reconnect)."""
        first = self._generation == seen
        if first:
            log.warning("lost the connection to the target (%s): reconnecting for up to %gs",
                        cause, self.reconnect_timeout)
        elif seen is None:
            log.warning("opening another channel to the target failed (%s): trying again for "
                        "up to %gs", cause, self.reconnect_timeout)
        delay = 0.05
        last: Exception = cause
        while True:
            try:
                transport = self._connect_again()
            except TransportError as exc:  # not reachable (yet)
                last = exc
            else:
                self._adopt(ch, transport, lost_in=seen if first else None)
                return
            if time.monotonic() + delay > deadline:
                # Like NVMe-oF's ctrl_loss_tmo: the device is dead from now on, and every
                # request fails at once instead of waiting out the timeout again.
                self.broken = (f"the target did not come back within "
                               f"{self.reconnect_timeout:g}s (reconnect-timeout): {last}")
                log.error("%s: failing every request", self.broken)
                raise GaveUp(self.broken)
            log.debug("reconnect failed (%s): next try in %.2fs", last, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _adopt(self, ch: _Channel, transport: Transport, lost_in: int | None = None) -> None:
        """Check that a new connection reaches the same region, then give it to ``ch``.
        A connection to another start of the target than the last one seen is finding it
        again, counted once, by whichever channel gets there first (one opened afresh may).
        ``lost_in``: the connection replaced one lost in that generation; if nothing has been
        found since, that too is finding it again (the same start: the connection broke)."""
        old, new = self.info, transport.info
        why = None
        if new.region_uuid != old.region_uuid:
            why = f"it now serves region {new.region_uuid}, not {old.region_uuid}"
        elif new.export_size != old.export_size or new.block_size != old.block_size:
            why = (f"the export is now {new.export_size} bytes (block size {new.block_size}), "
                   f"not {old.export_size} ({old.block_size})")
        elif new.readonly and not self.readonly:
            why = "the export is now read-only"
        elif not new.flush_methods & FLUSH_METHODS[self.flush_method] or (
                self.persistent and not new.durable_methods & FLUSH_METHODS[self.flush_method]):
            why = f"flush={self.flush_method} is no longer persistent there"
        if why is not None:
            transport.close()
            self.broken = f"reconnected to the target, but {why}: failing every request"
            log.error("%s", self.broken)
            raise GaveUp(self.broken)
        with self._lock:
            if new.instance != self._instance or lost_in == self._generation:
                self._instance = new.instance
                self._generation += 1
                self.reconnects += 1
                if self.stats is not None:
                    self.stats.reconnected()
                log.warning("reconnected to the target (region %s, loss epoch %d)",
                            new.region_uuid, new.loss_epoch)
            if new.loss_epoch != self._epoch:
                if self._writes > self._flushed and self.lost is None:
                    self.lost = (
                        f"the target restarted after a reboot or power cut (loss epoch "
                        f"{self._epoch} → {new.loss_epoch}) while writes were not yet "
                        "flushed: they may be lost, so no later FLUSH can succeed")
                    log.error("%s", self.lost)
                self._epoch = new.loss_epoch
            ch.transport = transport
            ch.generation = self._generation

    # -- requests --------------------------------------------------------------------------

    @contextmanager
    def _counted(self, op: str, nbytes: int) -> Iterator[None]:
        """Count the request in the statistics, with its latency and whether it failed."""
        if self.stats is None or not self.stats.enabled:
            yield
            return
        started = time.perf_counter_ns()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.stats.record(op, nbytes, started, ok)

    def _io(self, op: Callable[[Transport], None]) -> None:
        ch = self._take()
        try:
            with ch.lock:
                self._run(ch, op)
        finally:
            self._idle.put(ch)

    def pread(self, buf: memoryview, offset: int) -> None:
        with self._counted("read", len(buf)):
            self._check(offset, len(buf))
            if len(buf):
                blocks = self.blocks
                if blocks is not None:
                    self._io(lambda t: blocks.read(t, buf, offset))
                else:
                    self._io(lambda t: t.read(buf, offset))

    def pwrite(self, data: memoryview, offset: int, fua: bool = False) -> None:
        with self._counted("write", len(data)):
            self._check_writable()
            self._check(offset, len(data))
            if len(data):
                blocks = self.blocks
                if blocks is not None:
                    self._write(lambda t, step: blocks.write(t, data, offset, len(data),
                                                             self.policy.persist_now,
                                                             self.policy.fua_step(t)),
                                offset, len(data), fua)
                else:
                    self._write(lambda t, step: t.write(data, offset, step), offset,
                                len(data), fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        with self._counted("zero", length):
            self._check_writable()
            self._check(offset, length)
            if length:
                blocks = self.blocks
                if blocks is not None:
                    self._write(lambda t, step: blocks.write(t, None, offset, length,
                                                             self.policy.persist_now,
                                                             self.policy.fua_step(t)),
                                offset, length, fua)
                else:
                    self._write(lambda t, step: t.write_zeroes(offset, length, step), offset,
                                length, fua)

    def _write(self, op: Callable[[Transport, Persist | None], None], offset: int, length: int,
               fua: bool) -> None:
        """A write, and with FUA its persistence step posted with it (one wait, not two).
        With atomic blocks every block moved is persistent once the write returns: the next
        flush has nothing of it to do.
        Once acknowledged the write is at risk until a flush: if the target loses power first,
        it may be lost. (A write whose connection broke is sent again in full, with its step,
        so it is only at risk from then on.)"""
        persisted = fua or self.blocks is not None
        policy = self.policy
        ch = self._take()
        try:
            with ch.lock:
                try:
                    self._run(ch, lambda t: op(t, policy.fua_step(t) if fua else None))
                except BaseException:
                    if fua and self.blocks is None:  # maybe written, not persisted: the next
                        self._wrote(ch, offset, length, True, proven=False)  # flush covers it
                    raise
                self._wrote(ch, offset, length, not persisted)
        finally:
            self._idle.put(ch)
        if fua and self.lost is not None:  # persisted on a target that may have lost others
            raise GaveUp(self.lost)

    def _wrote(self, ch: _Channel, offset: int, length: int, unpersisted: bool,
               proven: bool = True) -> None:
        """A write completed on ``ch`` (whose lock is held); ``unpersisted``: no FUA step made
        it persistent, so the next flush must. ``proven=False``: its reply never came, so
        even where a reply proves placement the next flush needs the channel's barrier."""
        if unpersisted:
            # The channel first: a flush that takes this write's range must order it.
            if not proven or (ch.transport is not None and not ch.transport.placed_on_reply):
                ch.wrote_at = offset
            self.policy.wrote(offset, length)
        with self._lock:  # counted last: a flush counts only writes it covers
            self._writes += 1

    def flush(self) -> None:
        """Make every write completed on any channel persistent (per the flush method)."""
        with self._counted("flush", 0):
            self._flush()

    def _flush(self) -> None:
        if self.broken is not None:
            raise GaveUp(self.broken)
        if self.lost is not None:
            raise GaveUp(self.lost)
        # The flush lock first, then a channel: a thread never holds a channel while it waits
        # for the flush lock, so the flush below never waits for a channel held that way.
        with self._flush_lock:
            own = self._take()
            try:
                with self._lock:
                    # What this flush covers, all at one moment: the writes counted, the
                    # channels to order and the ranges to persist. A write marks its channel,
                    # then records its range, then is counted (under its channel's lock, before
                    # it is acknowledged), so every range taken here is on a channel found
                    # here; a write that completes later, while this flush waits for a
                    # channel's lock, is the next flush's (it was taken with the others once,
                    # and committed on a channel that never ordered it: lost).
                    covered = self._writes
                    chans = [c for c in self._all if c.wrote_at is not None or c is own]
                    ranges = self.policy.take()
                with contextlib.ExitStack() as held:  # in one order: no ring of waiters
                    for ch in sorted(chans, key=lambda c: c.number):
                        held.enter_context(ch.lock)
                    self.policy.flush(ranges,
                                      lambda with_own: self._barriers(chans, own, with_own),
                                      lambda todo: self._commit(own, todo))
            finally:
                self._idle.put(own)
        if self.lost is not None:  # found out while reconnecting during this flush
            raise GaveUp(self.lost)
        with self._lock:
            self._flushed = max(self._flushed, covered)

    def _commit(self, own: _Channel, ranges: list[tuple[int, int]]) -> None:
        self._run(own, lambda t: self.policy.persist_now(t, ranges))
        own.wrote_at = None  # the COMMIT (FLUSH) came after its writes on the same channel

    def _barriers(self, chans: list[_Channel], own: _Channel, with_own: bool) -> None:
        """A barrier on every channel that wrote since its last one: all posted, then each
        waited for (so the whole takes about one round trip). A channel whose connection
        fails gets a new one, and its barrier runs there."""
        todo = [c for c in chans if c.wrote_at is not None and (with_own or c is not own)]
        posted = []
        for ch in todo:
            with contextlib.suppress(TransportError):
                assert ch.transport is not None and ch.wrote_at is not None
                ch.transport.start_barrier(ch.wrote_at)
                posted.append(ch)
        for ch in posted:
            with contextlib.suppress(TransportError):
                assert ch.transport is not None
                ch.transport.finish_barrier()
                ch.wrote_at = None
        for ch in todo:
            at = ch.wrote_at
            if at is not None:  # its connection failed: order it on a new one
                self._run(ch, lambda t: t.read_barrier(at))  # noqa: B023 (run at once)
                ch.wrote_at = None

    def close(self) -> None:
        with self._lock:
            channels, self._all = self._all, []
        for ch in channels:
            ch.close()
