"""The client core: block requests on top of a transport, with the flush policy.

Flush methods (what an acknowledged FLUSH or FUA means is in docs/persistence.md):

- ``apm`` (appliance persistency method): after the writes, one small RDMA READ on the same
  queue pair. The READ cannot complete before every earlier WRITE on that QP has been placed in
  the target's memory. The target's CPU is not involved.
- ``gpspm`` (general-purpose server persistency method): a COMMIT message listing the ranges
  written since the last flush; the target persists them (``pmem_persist`` on real pmem,
  ``pmem_msync`` otherwise) and replies.

FUA is a write followed by the same persistence step for just that range.
"""

from __future__ import annotations

import errno
import logging
from types import TracebackType

from . import durability
from .errors import ConfigError, RequestError
from .protocol import FLUSH_METHODS
from .ranges import RangeSet
from .transport import Transport

log = logging.getLogger(__name__)


class Client:
    """Block I/O against one target through one transport connection. A context manager."""

    def __init__(self, transport: Transport, flush: str = "auto", readonly: bool = False,
                 allow_visibility_only: bool = False) -> None:
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
        #: Whether an acknowledged FLUSH/FUA survives a power cut (else: the target's memory).
        self.persistent = persistent
        self.size = info.export_size
        self.block_size = info.block_size
        self.readonly = info.readonly or readonly
        self._dirty = RangeSet()
        self._unflushed_at: int | None = None  # apm: offset of a write since the last flush
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

    def pread(self, buf: memoryview, offset: int) -> None:
        self._check(offset, len(buf))
        if len(buf):
            self.transport.read(buf, offset)

    def pwrite(self, data: memoryview, offset: int, fua: bool = False) -> None:
        self._check_writable()
        self._check(offset, len(data))
        if not len(data):
            return
        self.transport.write(data, offset)
        self._after_write(offset, len(data), fua)

    def zero(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        self._check(offset, length)
        if not length:
            return
        self.transport.write_zeroes(offset, length)
        self._after_write(offset, length, fua)

    def _after_write(self, offset: int, length: int, fua: bool) -> None:
        if self.flush_method == "apm":
            if fua:
                self.transport.read_barrier(offset)
            else:
                self._unflushed_at = offset
        elif fua:
            self.transport.commit([(offset, length)])
        else:
            self._dirty.add(offset, length)

    def flush(self) -> None:
        """Make every write completed on this connection persistent (per the flush method)."""
        if self.flush_method == "apm":
            if self._unflushed_at is not None:
                self.transport.read_barrier(self._unflushed_at)
                self._unflushed_at = None
            return
        if not self._dirty:
            return
        ranges = self._dirty.take()
        try:
            self.transport.commit(ranges)
        except BaseException:
            for off, n in ranges:  # not persisted: a later flush must try them again
                self._dirty.add(off, n)
            raise

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
