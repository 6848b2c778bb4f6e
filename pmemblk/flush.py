"""The flush policy: how a client makes its writes persistent, chosen once per connection.

``Apm`` (appliance persistency method) proves placement with a small READ on the same channel
after the writes; ``Gpspm`` (general-purpose server persistency method) asks the target to
persist the ranges written since the last flush (COMMIT). Each owns what it must remember
between a write and the flush that covers it, and keeps it when persisting fails, so that the
next flush tries again (docs/persistence.md). The client core calls one object through this
interface instead of branching on the method's name on every request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .ranges import RangeSet
from .transport import Persist, Transport

#: Runs one transport operation (with the client's reconnect rules).
Io = Callable[[Callable[[Transport], None]], None]


class FlushPolicy(Protocol):
    name: str
    #: FUA: the step the transport posts with the write itself (one wait for both).
    fua_step: Persist

    def wrote(self, offset: int, length: int) -> None:
        """A write of ``[offset, offset+length)`` completed; the next flush must cover it.
        Also called for a FUA write whose persistence step failed."""

    def flush(self, io: Io) -> None:
        """Make every completed write persistent. If that fails, nothing is forgotten."""


class Apm:
    name = "apm"
    fua_step: Persist = "barrier"

    def __init__(self) -> None:
        self._unflushed_at: int | None = None  # where a write since the last barrier was

    def wrote(self, offset: int, length: int) -> None:
        self._unflushed_at = offset

    def flush(self, io: Io) -> None:
        if self._unflushed_at is not None:
            at = self._unflushed_at
            io(lambda t: t.read_barrier(at))
            self._unflushed_at = None


class Gpspm:
    name = "gpspm"
    fua_step: Persist = "commit"

    def __init__(self) -> None:
        self._dirty = RangeSet()

    def wrote(self, offset: int, length: int) -> None:
        self._dirty.add(offset, length)

    def flush(self, io: Io) -> None:
        if not self._dirty:
            return
        ranges = self._dirty.take()
        try:
            io(lambda t: t.commit(ranges))
        except BaseException:
            for off, n in ranges:  # not persisted: a later flush must try them again
                self._dirty.add(off, n)
            raise


def make_policy(method: str) -> FlushPolicy:
    return Apm() if method == "apm" else Gpspm()
