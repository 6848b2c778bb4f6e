"""Transports: how the client moves bytes to and from the target's region.

A transport gives the client core (``pmemblk.client``) five primitives; the flush policy, range
tracking and request validation live in the core so that every transport shares them.
``ConnectOptions`` is what every one connects with; ``transport.registry`` maps each
``transport=`` name to its module's ``connect``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Protocol

from ..address import Address
from ..errors import ConnectionLost, ProtocolError, RemoteError, TransportError
from ..protocol import Commit, CommitReply, Reject, Welcome, commit_batches
from ..resource import Closeable
from ..tls import ClientTls


class PersistStep:
    """A FUA write's persistence step, posted with the write itself so that both take one
    wait. Each transport makes its own when it connects (``barrier_step``: a small READ behind
    the writes, for apm; ``commit_step``: a COMMIT of the range, gpspm; ``flush_step``: the
    FLUSH verb on it, native, where the connection has it) and reads only those it made; the
    flush policy picks one (``FlushPolicy.fua_step``). A new flush method is a new step in
    each transport, not a new name compared in all of them."""

    def __init__(self, name: str) -> None:
        self.name = name  # for logs

    def __repr__(self) -> str:
        return f"<{self.name} step>"


#: A FUA write's step, as a transport's write methods take it.
Persist = PersistStep


class Transport(Protocol):
    #: What the target said about the export in its WELCOME.
    info: Welcome
    #: Its name in ``transport.registry`` (``transport=``), for status and logs.
    kind: str
    #: Whether the connection is encrypted (TLS over TCP; RDMA never is).
    tls: bool
    #: The FUA persistence steps this connection posts behind a write (``PersistStep``);
    #: ``flush_step`` is None where it has no FLUSH verb.
    barrier_step: PersistStep
    commit_step: PersistStep
    flush_step: PersistStep | None

    def read(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from export offset ``offset``."""

    def write(self, data: memoryview, offset: int, persist: Persist | None = None) -> None:
        """Write ``data`` at export offset ``offset``; returns when the transport completed it
        (for RDMA: the remote NIC acknowledged it, not that it is persistent), or with
        ``persist``, once that step has made it persistent too (one wait, not two)."""

    def write_zeroes(self, offset: int, length: int, persist: Persist | None = None) -> None:
        """Write ``length`` zero bytes at ``offset`` (``persist``: as for ``write``)."""

    #: Whether a write's completion already proves it was placed in the target's memory (a
    #: stream target copies before it replies), so that no barrier is ever needed.
    placed_on_reply: bool

    def read_barrier(self, offset: int) -> None:
        """APM: a small read on the same channel after writes, which cannot complete before
        every earlier write has been placed in the target's memory. (Where a write's reply
        already proves placement, as over TCP, there is nothing left to prove.)"""

    def start_barrier(self, offset: int) -> None:
        """``read_barrier`` in two halves, so that barriers on several channels are posted
        together and then waited for: post it ..."""

    def finish_barrier(self) -> None:
        """... and wait for it."""

    def commit(self, ranges: list[tuple[int, int]]) -> None:
        """GPSPM: ask the target to persist these ranges and wait for its reply."""

    def native_flush(self, ranges: list[tuple[int, int]]) -> None:
        """native: the FLUSH verb on each range (on this channel, so after its own writes),
        all posted, then waited for. Only where the WELCOME offers flush method native."""

    def atomic_write(self, offset: int, value: bytes) -> None:
        """The 8-byte ATOMIC WRITE verb at export ``offset`` (8-aligned), where the WELCOME
        offers it (``info.atomic_write``), waited for."""

    def compare_swap(self, offset: int, expected: int, new: int) -> int:
        """Store ``new`` in the aligned 8-byte word at export ``offset`` if it holds
        ``expected``, atomically (RDMA compare-and-swap, or the target's own over a stream);
        the value it held. Ordered after this channel's earlier writes."""

    def compare_swap_many(self, items: list[tuple[int, int, int]]) -> list[int]:
        """``compare_swap`` of each (offset, expected, new), all in flight at once where the
        transport can; the values found, in order."""

    def atomic_write_many(self, items: list[tuple[int, int]]) -> None:
        """``atomic_write`` of each (offset, value as a little-endian integer)."""

    def write_many(self, items: list[tuple[int, memoryview]],
                   persist: Persist | None = None) -> None:
        """``write`` of each (offset, data), all in flight at once where the transport can,
        with ``persist`` the step covering them all, posted behind them (one wait)."""

    def close(self) -> None:
        """Disconnect and free every resource; safe to call twice."""


class TransportBase(Closeable):
    """What both client transports share: a connection that fails once and then stays failed,
    and the COMMIT loop (batches, request ids, the reply check). A transport supplies
    ``_request_id`` and ``_commit_exchange``."""

    peer: str
    info: Welcome
    _broken: str | None = None

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise ConnectionLost(f"the connection to {self.peer} is unusable: {self._broken}")

    def _fail(self, exc: TransportError | ProtocolError) -> TransportError:
        """Mark the connection broken by ``exc``; the error to raise."""
        err = exc if isinstance(exc, TransportError) else TransportError(str(exc))
        self._broken = str(err)
        return err

    def _request_id(self) -> int:
        raise NotImplementedError

    def _commit_exchange(self, message: bytes) -> bytes:
        """Send a COMMIT message; the message the target answers with."""
        raise NotImplementedError

    def native_flush(self, ranges: list[tuple[int, int]]) -> None:
        raise TransportError("flush=native needs an RDMA connection with the FLUSH verb")

    def atomic_write(self, offset: int, value: bytes) -> None:
        raise TransportError("ATOMIC WRITE needs an RDMA connection with that verb")

    # The batched forms one request at a time, for a transport with nothing better (a stream:
    # its target applies frames in order, so what follows is ordered after them anyway).

    def write(self, data: memoryview, offset: int, persist: Persist | None = None) -> None:
        raise NotImplementedError

    def compare_swap(self, offset: int, expected: int, new: int) -> int:
        raise NotImplementedError

    def read_barrier(self, offset: int) -> None:
        raise NotImplementedError

    def compare_swap_many(self, items: list[tuple[int, int, int]]) -> list[int]:
        return [self.compare_swap(*item) for item in items]

    def atomic_write_many(self, items: list[tuple[int, int]]) -> None:
        for offset, value in items:
            self.atomic_write(offset, value.to_bytes(8, "little"))

    def write_many(self, items: list[tuple[int, memoryview]],
                   persist: Persist | None = None) -> None:
        for offset, data in items:
            self.write(data, offset)
        if persist is not None:
            self._persist_after([(offset, len(data)) for offset, data in items], persist)

    def _persist_after(self, ranges: list[tuple[int, int]], step: PersistStep) -> None:
        """``step``, on its own, after writes of ``ranges`` completed (its transport's way)."""
        raise NotImplementedError

    def commit(self, ranges: list[tuple[int, int]]) -> None:
        """GPSPM: ask the target to persist these ranges and wait for its replies."""
        self._check_usable()
        # COMMITs as large as the target says it takes (its WELCOME's max message size).
        for batch in commit_batches(ranges, self.info.max_message_size):
            request_id = self._request_id()
            try:
                raw = self._commit_exchange(Commit(request_id, batch).encode())
                check_commit_reply(raw, request_id, len(batch))  # a bad status: RemoteError
            except (TransportError, ProtocolError) as exc:
                raise self._fail(exc) from None


# Shared by every transport, so that the handshake and flush answers mean the same everywhere.

def refused(peer: str, reject: Reject) -> RemoteError:
    """The error for a target's REJECT."""
    return RemoteError(f"target {peer} refused the connection: {reject.reason}", reject.errno)


def check_commit_reply(raw: bytes, request_id: int, ranges: int) -> None:
    """Raise unless ``raw`` is a COMMIT_REPLY saying that the COMMIT ``request_id`` of
    ``ranges`` ranges persisted.

    Anything but a well-formed COMMIT_REPLY is a ProtocolError; a reply to another request
    means the connection is out of step (TransportError). The caller marks the connection
    broken for both. A non-zero status is the target's answer (RemoteError).
    """
    reply = CommitReply.decode(raw)
    if reply.request_id != request_id:
        raise TransportError(
            f"COMMIT_REPLY answers request {reply.request_id}, expected {request_id}")
    if reply.status:
        # EIO whatever the target's reason (ENOSPC, ...): to the block layer a failed flush is
        # an I/O error; the reason is in the message.
        raise RemoteError(f"the target could not persist {ranges} ranges: "
                          f"{os.strerror(reply.status)}", errno.EIO)


# -- connecting (each transport module's ``connect``; transport.registry names them) -----------

@dataclass(frozen=True)
class ConnectOptions:
    """How to reach the target and what to ask of it, whatever the transport."""

    address: Address
    readonly: bool = False
    timeout: float = 30.0
    #: Requests in flight per channel; None: the transport's default.
    depth: int | None = None
    #: The largest piece a request is cut into; None: the transport's default (each bounds it).
    chunk_size: int | None = None
    secret: bytes | None = field(default=None, repr=False)
    client_id: bytes | None = None
    #: The identity to connect as (a line of the target's --clients file); "": anonymous.
    identity: str = ""
    #: TLS over TCP (tls=on|require); RDMA moves data one-sided and cannot use it.
    tls: ClientTls | None = field(default=None, repr=False)
