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

Reconnect: when the connection is lost (disconnect event, QP in error, TCP reset, no answer
before the deadline), the request in progress is held, the client reconnects with backoff,
checks that the target serves the same region (UUID and size), and issues the request again
(READ, WRITE and ZERO of the same range are idempotent, and so is a COMMIT). After
``reconnect_timeout`` seconds without success the request fails with EIO. If the target's loss
epoch changed while writes were unflushed (it restarted after a reboot or power cut, so those
writes may be gone), every later FLUSH fails with EIO: acknowledging it would be a lie
(docs/security.md).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import durability
from .errors import ConfigError, PmemblkError, RemoteError, RequestError, TransportError
from .flush import make_policy
from .protocol import FLUSH_METHODS
from .resource import Closeable
from .stats import IoStats
from .transport import Persist, Transport

log = logging.getLogger(__name__)

#: The operations counted in statistics (a FUA write counts as a write).
OPS = ("read", "write", "zero", "flush")


class Client(Closeable):
    """Block I/O against one target through one transport connection. A context manager."""

    def __init__(self, transport: Transport, flush: str = "auto", readonly: bool = False,
                 allow_visibility_only: bool = False,
                 reconnect: Callable[[], Transport] | None = None,
                 reconnect_timeout: float = 0.0, stats: IoStats | None = None) -> None:
        if flush != "auto" and flush not in FLUSH_METHODS:
            raise ConfigError(f"unknown flush method {flush!r}: use auto, apm or gpspm")
        info = transport.info
        try:
            method, persistent = durability.choose(info.flush_methods, info.durable_methods,
                                                   flush, allow_visibility_only)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.transport = transport
        self.flush_method = method
        #: Chosen once: what the writes since the last flush are, and how to persist them.
        self.policy = make_policy(method)
        #: Whether an acknowledged FLUSH/FUA survives a power cut (else: the target's memory).
        self.persistent = persistent
        self.size = info.export_size
        self.block_size = info.block_size
        self.readonly = info.readonly or readonly
        self._unflushed = False  # any write since the last successful FLUSH
        self._reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        #: Shared with the plugin instance's other connections (None: not counted).
        self.stats = stats
        #: Why every FLUSH now fails (unflushed writes may have been lost), or None.
        self.lost: str | None = None
        #: Why every request now fails (the target serves something else), or None.
        self.broken: str | None = None
        if not persistent:
            log.warning(
                "flush=%s gives visibility only on this target (accepted with "
                "allow-visibility-only): an acknowledged FLUSH proves the data reached the "
                "target's memory; it survives the target process, not a power cut", method)
        else:
            log.info("flush=%s: persistent", method)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RequestError(
                f"request [{offset}, {offset + length}) is outside the {self.size}-byte export"
            )

    def _check_writable(self) -> None:
        if self.readonly:
            raise RequestError("the export is read-only", errno.EPERM)

    # -- reconnect -------------------------------------------------------------------------

    def _io(self, op: Callable[[Transport], None]) -> None:
        """Run ``op`` on the transport; on a lost connection, reconnect and run it again."""
        if self.broken is not None:
            raise RemoteError(self.broken, errno.EIO)
        deadline: float | None = None
        delay = 0.0
        while True:
            try:
                op(self.transport)
                return
            except TransportError as exc:
                if self._reconnect is None or self.reconnect_timeout <= 0:
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                    log.warning("lost the connection to the target (%s): reconnecting for up to "
                                "%gs", exc, self.reconnect_timeout)
                elif now >= deadline:
                    # The target is there, but this request keeps losing the connection: give
                    # up like a target that never came back, never loop for ever.
                    self.broken = (f"the request kept failing for {self.reconnect_timeout:g}s "
                                   f"(reconnect-timeout), on {self.reconnects} new connections: "
                                   f"{exc}")
                    log.error("%s: failing every request on this connection", self.broken)
                    raise TransportError(self.broken) from None
                else:  # failed again on a fresh connection: back off before the next try
                    delay = min(max(delay * 2, 0.05), 2.0)
                    time.sleep(min(delay, deadline - now))
                self._recover(exc, deadline)

    def _recover(self, cause: TransportError, deadline: float) -> None:
        assert self._reconnect is not None
        self.transport.close()
        delay = 0.05
        last: Exception = cause
        while True:
            try:
                transport = self._reconnect()
            except TransportError as exc:  # not reachable (yet)
                last = exc
            except PmemblkError as exc:
                # EBUSY: the target has not yet noticed our old connection. Anything else (a
                # refusal, a new secret, another protocol version) will not change by waiting.
                if not (isinstance(exc, RemoteError) and exc.errno == errno.EBUSY):
                    self.broken = f"reconnecting failed: {exc}"
                    raise RemoteError(self.broken, errno.EIO) from None
                last = exc
            else:
                self._adopt(transport)
                return
            if time.monotonic() + delay > deadline:
                # Like NVMe-oF's ctrl_loss_tmo: the device is dead from now on, and every
                # request fails at once instead of waiting out the timeout again.
                self.broken = (f"the target did not come back within "
                               f"{self.reconnect_timeout:g}s (reconnect-timeout): {last}")
                log.error("%s: failing every request on this connection", self.broken)
                raise TransportError(self.broken)
            log.debug("reconnect failed (%s): next try in %.2fs", last, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _adopt(self, transport: Transport) -> None:
        """Check that a new connection reaches the same region, then use it."""
        old, new = self.transport.info, transport.info
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
            raise RemoteError(self.broken, errno.EIO)
        if new.loss_epoch != old.loss_epoch and self._unflushed and self.lost is None:
            self.lost = (
                f"the target restarted after a reboot or power cut (loss epoch "
                f"{old.loss_epoch} → {new.loss_epoch}) while writes were not yet flushed: "
                "they may be lost, so no later FLUSH on this connection can succeed")
            log.error("%s", self.lost)
        self.transport = transport
        self.reconnects += 1
        if self.stats is not None:
            self.stats.reconnected()
        log.warning("reconnected to the target (region %s, loss epoch %d)", new.region_uuid,
                    new.loss_epoch)

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

    def pread(self, buf: memoryview, offset: int) -> None:
        with self._counted("read", len(buf)):
            self._check(offset, len(buf))
            if len(buf):
                self._io(lambda t: t.read(buf, offset))

    def pwrite(self, data: memoryview, offset: int, fua: bool = False) -> None:
        with self._counted("write", len(data)):
            self._check_writable()
            self._check(offset, len(data))
            if len(data):
                self._write(lambda t, step: t.write(data, offset, step), offset, len(data),
                            fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        with self._counted("zero", length):
            self._check_writable()
            self._check(offset, length)
            if length:
                self._write(lambda t, step: t.write_zeroes(offset, length, step), offset,
                            length, fua)

    def _write(self, op: Callable[[Transport, Persist | None], None], offset: int, length: int,
               fua: bool) -> None:
        """A write, and with FUA its persistence step posted with it (one wait, not two).
        Once acknowledged the write is at risk until a flush: if the target loses power first,
        it may be lost. (A write whose connection broke is sent again in full, with its step,
        so it is only at risk from then on.)"""
        step = self.policy.fua_step if fua else None
        try:
            self._io(lambda t: op(t, step))
        except BaseException:
            if fua:  # maybe written, not persisted: the next flush covers it
                self._unflushed = True
                self.policy.wrote(offset, length)
            raise
        self._unflushed = True
        if not fua:
            self.policy.wrote(offset, length)
        elif self.lost is not None:  # persisted on a target that may have lost earlier writes
            raise RemoteError(self.lost, errno.EIO)

    def flush(self) -> None:
        """Make every write completed on this connection persistent (per the flush method)."""
        with self._counted("flush", 0):
            self._flush()

    def _flush(self) -> None:
        if self.broken is not None:
            raise RemoteError(self.broken, errno.EIO)
        if self.lost is not None:
            raise RemoteError(self.lost, errno.EIO)
        self.policy.flush(self._io)
        if self.lost is not None:  # found out while reconnecting during this flush
            raise RemoteError(self.lost, errno.EIO)
        self._unflushed = False

    def close(self) -> None:
        self.transport.close()
