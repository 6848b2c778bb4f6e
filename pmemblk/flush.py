"""The flush policy: how a client makes its writes persistent, chosen once per client.

``Apm`` (appliance persistency method) proves placement with a small READ after the writes, on
every channel that wrote; ``Gpspm`` (general-purpose server persistency method) orders the
other channels' writes the same way and then asks the target to persist every range written
since the last flush (COMMIT), on the flushing channel. ``Native`` is Gpspm with the IBTA FLUSH
verb in place of the COMMIT: the target's RDMA device persists the ranges, not its CPU. Each
owns what it must remember between a write and the flush that covers it, and keeps it when
persisting fails, so that the next flush tries again (docs/persistence.md). The client core
calls one object through this interface instead of branching on the method's name on every
request.

Which channels need a barrier is the client's business (``pmemblk.client``): it knows them,
and over a stream, where a write's reply already proves placement, none does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from .errors import TransportError
from .ranges import RangeSet
from .transport import PersistStep, Transport

#: Orders every write completed on any channel (``True``: the flushing channel's own too)
#: before what follows on the flushing channel.
Barriers = Callable[[bool], None]
#: Persists these ranges on the flushing channel (a COMMIT, or the FLUSH verb: ``persist_now``).
Commit = Callable[[list[tuple[int, int]]], None]


class FlushPolicy(Protocol):
    name: str

    def fua_step(self, t: Transport) -> PersistStep:
        """FUA: the step ``t`` posts with the write itself (one wait for both), one of those
        the transport made when it connected."""

    def wrote(self, offset: int, length: int) -> None:
        """A write of ``[offset, offset+length)`` completed; the next flush must cover it.
        Also called for a FUA write whose persistence step failed. Thread-safe."""

    def take(self) -> list[tuple[int, int]]:
        """What the flush starting now covers: the ranges written since the last one, handed
        to ``flush`` (and meanwhile forgotten). The client takes them at the moment it decides
        which channels that flush orders, so that it never covers a write whose channel it does
        not order (a write completed after that moment is the next flush's)."""

    def flush(self, ranges: list[tuple[int, int]], barriers: Barriers, commit: Commit) -> None:
        """Make the writes ``take`` gave persistent. If that fails, nothing is forgotten."""

    def persist_now(self, t: Transport, ranges: list[tuple[int, int]]) -> None:
        """Make these ranges, just written on ``t``, persistent before anything follows on
        it (an atomic-blocks write's data and flog record, before its map entry moves)."""


class Apm:
    name = "apm"

    def fua_step(self, t: Transport) -> PersistStep:
        return t.barrier_step

    def wrote(self, offset: int, length: int) -> None:
        pass  # the barriers are all: the client knows which channels wrote

    def take(self) -> list[tuple[int, int]]:
        return []

    def flush(self, ranges: list[tuple[int, int]], barriers: Barriers, commit: Commit) -> None:
        barriers(True)

    def persist_now(self, t: Transport, ranges: list[tuple[int, int]]) -> None:
        t.read_barrier(ranges[0][0])


class Gpspm:
    name = "gpspm"

    def fua_step(self, t: Transport) -> PersistStep:
        return t.commit_step

    def __init__(self) -> None:
        self._dirty = RangeSet()
        self._lock = threading.Lock()

    def wrote(self, offset: int, length: int) -> None:
        with self._lock:
            self._dirty.add(offset, length)

    def take(self) -> list[tuple[int, int]]:
        with self._lock:
            return self._dirty.take()

    def flush(self, ranges: list[tuple[int, int]], barriers: Barriers, commit: Commit) -> None:
        if not ranges:
            return
        try:
            barriers(False)  # the COMMIT itself orders the flushing channel's writes
            commit(ranges)
        except BaseException:
            with self._lock:
                for off, n in ranges:  # not persisted: a later flush must try them again
                    self._dirty.add(off, n)
            raise

    def persist_now(self, t: Transport, ranges: list[tuple[int, int]]) -> None:
        t.commit(ranges)


class Native(Gpspm):
    """The ranges written since the last flush, each FLUSHed by the RDMA device (after a
    barrier on every other channel that wrote: a FLUSH orders only its own queue pair's
    writes, and it persists what is placed in the range, whoever wrote it)."""

    name = "native"

    def fua_step(self, t: Transport) -> PersistStep:
        if t.flush_step is None:  # chosen only where the WELCOME offers it: over RDMA
            raise TransportError("flush=native needs an RDMA connection with the FLUSH verb")
        return t.flush_step

    def persist_now(self, t: Transport, ranges: list[tuple[int, int]]) -> None:
        t.native_flush(ranges)


def make_policy(method: str) -> FlushPolicy:
    policies: dict[str, type[Apm] | type[Gpspm]] = {"apm": Apm, "gpspm": Gpspm,
                                                     "native": Native}
    return policies[method]()
