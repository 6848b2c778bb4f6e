"""Fault injection for the persistence path, for tests only (``serve --testing-fail-persist``,
``serve --testing-lose-reply``). Like the power-cut emulation, nothing enables it but an option
whose name says TESTING, and the target logs a warning when it is on.

``--testing-fail-persist SPEC`` makes ``PmemRegion.persist`` fail as a full or broken device
would, before anything is persisted. SPEC is comma-separated ``key=value``:

    errno=EIO|ENOSPC   the error (default EIO)
    after=N            let the first N persist calls that match succeed (default 0)
    times=N            then fail N of them and succeed again (default: fail for ever)
    range=OFF:LEN      only persist calls that overlap these bytes of the *data area* match
                       (default: every call, the header's included)

``--testing-lose-reply KIND:N`` (stream transport; COMMIT also over RDMA): the N-th reply of
KIND (``commit``, ``read``: over RDMA the apm barrier is a READ, or ``write``: over TCP a
WRITE's reply is apm's proof) is never sent, as if lost with its connection, which the target
then drops. The request itself was carried out. ``KIND:N+``
loses the N-th and every later one.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from .errors import ConfigError, PmemError

log = logging.getLogger(__name__)

_ERRNOS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
REPLY_KINDS = ("commit", "read", "write")


@dataclass
class PersistFault:
    """Decides, per persist call, whether to fail it; ``check`` raises the injected error."""

    errno_value: int = errno.EIO
    after: int = 0
    times: int | None = None
    start: int = 0  # region offsets, set by ``bind`` from the data-area range
    end: int | None = None
    matched: int = 0
    failed: int = 0

    @classmethod
    def parse(cls, spec: str) -> tuple[PersistFault, tuple[int, int] | None]:
        fault, data_range = cls(), None
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            try:
                if not sep:
                    raise ValueError
                if key == "errno" and value in _ERRNOS:
                    fault.errno_value = _ERRNOS[value]
                elif key in ("after", "times") and int(value) >= 0:
                    setattr(fault, key, int(value))
                elif key == "range":
                    off, _, length = value.partition(":")
                    data_range = (int(off, 0), int(length, 0))
                    if data_range[0] < 0 or data_range[1] <= 0:
                        raise ValueError
                else:
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    f"--testing-fail-persist: {item!r} is not errno=EIO|ENOSPC, after=N, "
                    "times=N or range=OFFSET:LENGTH") from None
        return fault, data_range

    def bind(self, data_offset: int, data_range: tuple[int, int] | None) -> None:
        if data_range is not None:
            self.start = data_offset + data_range[0]
            self.end = self.start + data_range[1]

    def check(self, offset: int, length: int) -> None:
        if self.end is not None and not (offset < self.end and self.start < offset + length):
            return
        self.matched += 1
        if self.matched <= self.after:
            return
        if self.times is not None and self.failed >= self.times:
            return
        self.failed += 1
        name = errno.errorcode.get(self.errno_value, str(self.errno_value))
        log.warning("TESTING ONLY: failing persist of %d bytes at offset %d with %s", length,
                    offset, name)
        raise PmemError(f"persist of {length} bytes at offset {offset} failed: injected {name}",
                        self.errno_value)


@dataclass
class LostReply:
    """Which reply the stream target must lose (``--testing-lose-reply KIND:N``)."""

    kind: str
    nth: int
    and_later: bool = False
    seen: int = 0

    @classmethod
    def parse(cls, spec: str) -> LostReply:
        kind, _, n = spec.partition(":")
        later = n.endswith("+")
        n = n.removesuffix("+")
        if kind not in REPLY_KINDS or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--testing-lose-reply {spec!r}: expected commit:N, read:N or "
                              "write:N, or KIND:N+ for the N-th and every later one (N from 1)")
        return cls(kind, int(n), later)

    def lose(self, kind: str) -> bool:
        """Count a reply of ``kind``; True if it is the one to lose."""
        if kind != self.kind:
            return False
        self.seen += 1
        if self.seen < self.nth or (self.seen > self.nth and not self.and_later):
            return False
        log.warning("TESTING ONLY: losing %s reply %d", kind, self.nth)
        return True
