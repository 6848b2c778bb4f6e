"""The client's stream transport: TCP or a Unix socket, same semantics as verbs.

READ, WRITE and ZERO are tagged frames; a request larger than ``chunk_size`` is split and up to
``depth`` frames are in flight. READ payloads are received straight into the caller's buffer.
The target applies requests in order, so ``read_barrier`` (flush=apm) is a small READ after the
writes, exactly as over RDMA; COMMIT (flush=gpspm) is the same message as over RDMA.

With TLS (``tls``: docs/protocol.md, "TLS") the TLS handshake comes first and the pmemblk
handshake runs inside it. The scatter-gather calls (one ``sendmsg`` and one ``recvmsg_into`` per
request, READ data straight into the caller's buffer) are chosen at connect time for a plain
socket; an ``ssl`` socket has neither, and gets ``sendall`` and ``recv_into`` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence

from ..address import Address, TCPAddress, parse_address
from ..auth import ClientHandshake
from ..errors import ConnectionLost, ProtocolError, RemoteError, TransportError
from ..protocol import (
    CAS,
    CAS_WORD,
    CHALLENGE,
    COMMIT_REPLY,
    IO,
    MAGIC,
    MAX_IO,
    MSG_CAS,
    MSG_CHALLENGE,
    MSG_READ,
    MSG_REJECT,
    MSG_REPLY,
    MSG_WELCOME,
    MSG_WRITE,
    MSG_ZERO,
    PREAMBLE,
    PROTOCOL_VERSION,
    REJECT,
    REJECT_REASON_MAX,
    REPLY,
    WELCOME,
    Challenge,
    Commit,
    IORequest,
    Reject,
    Reply,
    Welcome,
    message_type,
)
from ..tls import ClientTls, answered_in_plaintext, ended, handshake_error
from . import ConnectOptions, Persist, PersistStep, TransportBase, check_commit_reply, refused

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 8
DEFAULT_CHUNK_SIZE = 1 << 20
#: At close, how long to wait for the target to close its side, and how much to read meanwhile.
CLOSE_WAIT = 2.0
#: How far behind its deadline a request may notice it (a timeout changed sooner would cost
#: a syscall on every socket call).
DEADLINE_SLACK = 0.25
CLOSE_DRAIN = 64 << 10
#: Over TLS, a frame and its payload up to this size go in one record (one copy, one call).
TLS_JOIN = 64 << 10


def connect(options: ConnectOptions) -> StreamTransport:
    """``REGISTRY``'s tcp: TCP or a Unix socket; a chunk is at most 4 MiB (a frame's body)."""
    return StreamTransport(options.address, readonly=options.readonly, timeout=options.timeout,
                           depth=options.depth or DEFAULT_DEPTH,
                           chunk_size=min(options.chunk_size or DEFAULT_CHUNK_SIZE, 4 << 20),
                           secret=options.secret, client_id=options.client_id,
                           tls=options.tls, identity=options.identity)


class _Step(PersistStep):
    """A stream's FUA step: a COMMIT frame right behind the write's frames, or nothing (a
    write's reply already proves placement: apm's barrier has nothing left to prove)."""

    def __init__(self, name: str, commit: bool) -> None:
        super().__init__(name)
        self.commit = commit


def _commits(step: PersistStep | None) -> bool:
    assert step is None or isinstance(step, _Step), f"{step!r} is not a stream's step"
    return step is not None and step.commit


class StreamTransport(TransportBase):
    """A connection to a pmemblk target over TCP or a Unix socket."""

    def __init__(self, address: Address | str, *, readonly: bool = False, timeout: float = 30.0,
                 depth: int = DEFAULT_DEPTH, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 secret: bytes | None = None, client_id: bytes | None = None,
                 tls: ClientTls | None = None, identity: str = "") -> None:
        if isinstance(address, str):
            address = parse_address(address, "target")
        family, addr = address.socket_address()
        self.peer = str(address)
        self.tls = False  # whether this connection speaks TLS
        #: One request's scatter-gather send and receive, chosen once (``_start_tls``).
        self._sendv: Callable[[Sequence[bytes | memoryview]], int] = self._sendv_plain
        self._recvv: Callable[[Sequence[memoryview]], int] = self._recvv_plain
        self.depth = depth
        self.chunk_size = min(chunk_size, MAX_IO)
        self._broken: str | None = None
        self._next_tag = 0
        self._closed = False
        self._reply = bytearray(REPLY.size)  # the one-frame path's reply header
        #: Each request (and the handshake) must be done within ``timeout`` seconds in all:
        #: a peer that sends a byte at a time gets no longer (``_left``).
        self._timeout = self._sock_timeout = timeout
        self._deadline = time.monotonic() + timeout
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._connect(family, addr)
            if tls is not None:
                self._start_tls(tls, address, family, addr)
            self.info = self._handshake(ClientHandshake(self.peer, secret, readonly, client_id,
                                                          identity))
        except BaseException:
            self.close()
            raise
        log.info("connected to %s over TCP%s: export %d bytes, block size %d, region %s, "
                 "is_pmem=%d, %s", self.peer, " with TLS" if self.tls else "",
                 self.info.export_size, self.info.block_size, self.info.region_uuid,
                 int(self.info.is_pmem), "read-only" if self.info.readonly else "read-write")

    def _connect(self, family: int, addr: str | tuple[str, int]) -> None:
        self.sock.settimeout(self._timeout)
        self._sock_timeout = self._timeout
        try:
            self._left()
            self.sock.connect(addr)
        except OSError as exc:
            raise TransportError(
                f"cannot connect to {self.peer}: {exc.strerror or exc}") from None
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _start_tls(self, tls: ClientTls, address: Address, family: int,
                   addr: str | tuple[str, int]) -> None:
        """The TLS handshake, within the connection's deadline. tls=on: a target that answers
        in plaintext (it serves --tls off) is connected to again, without TLS."""
        host = address.host if isinstance(address, TCPAddress) else None
        try:
            self._left()
            self.sock = tls.context.wrap_socket(self.sock, server_hostname=host)
        except TimeoutError as exc:
            raise self._lost(exc, "did not finish the TLS handshake") from None
        except OSError as exc:
            if tls.mode != "on" or not answered_in_plaintext(exc):
                raise handshake_error(self.peer, exc) from None
            log.warning("target %s does not offer TLS: connecting without it (tls=on; "
                        "tls=require would refuse)", self.peer)
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self._connect(family, addr)
            return
        self.tls = True
        self._sendv = self._sendv_tls
        self._recvv = self._recvv_tls

    # -- socket helpers --------------------------------------------------------------------

    def _sendv_plain(self, parts: Sequence[bytes | memoryview]) -> int:
        """Send ``parts`` in one call where the socket can: how many bytes went."""
        return self.sock.sendmsg(parts)

    def _recvv_plain(self, buffers: Sequence[memoryview]) -> int:
        """Receive into ``buffers`` in one call where the socket can: how many bytes came."""
        return self.sock.recvmsg_into(buffers)[0]

    def _sendv_tls(self, parts: Sequence[bytes | memoryview]) -> int:
        total = sum(len(p) for p in parts)
        if total <= TLS_JOIN:
            self.sock.sendall(b"".join(parts))
        else:
            for part in parts:
                self.sock.sendall(part)
        return total

    def _recvv_tls(self, buffers: Sequence[memoryview]) -> int:
        return self.sock.recv_into(buffers[0])

    def _lost(self, exc: OSError, timed_out: str = "did not answer") -> ConnectionLost:
        """A socket call's failure as the connection lost (a timeout is the deadline)."""
        if isinstance(exc, TimeoutError):
            return ConnectionLost(f"{self.peer} {timed_out} within {self._timeout:g}s")
        alert = ended(exc) if self.tls else None
        if alert is not None:
            return ConnectionLost(f"{self.peer} ended the TLS connection: {alert}")
        return ConnectionLost(f"connection to {self.peer} failed: {exc}")

    def _check_usable(self) -> None:
        """A request starts: it has the whole timeout from now."""
        super()._check_usable()
        self._deadline = time.monotonic() + self._timeout
        if self._sock_timeout != self._timeout:
            self.sock.settimeout(self._timeout)
            self._sock_timeout = self._timeout

    def _left(self) -> None:
        """Before a socket call: the socket's timeout is what is left of the request's (to
        within DEADLINE_SLACK, so that a call that comes at once costs no extra syscall)."""
        left = self._deadline - time.monotonic()
        if left < self._sock_timeout - DEADLINE_SLACK:
            if left <= 0:
                raise TimeoutError("timed out")
            self.sock.settimeout(left)
            self._sock_timeout = left

    def _recv_into(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            try:
                self._left()
                n = self.sock.recv_into(view[pos:])
            except OSError as exc:
                raise self._lost(exc) from None
            if n == 0:
                raise ConnectionLost(f"{self.peer} closed the connection")
            pos += n

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _send(self, *parts: bytes | memoryview) -> None:
        try:
            for part in parts:
                self._left()
                self.sock.sendall(part)
        except OSError as exc:
            raise self._lost(exc, "stopped taking data") from None

    def _answer(self, expected: int, size: int) -> bytes:
        """The target's next handshake message: ``expected`` (``size`` bytes), or its REJECT."""
        start = self._recv(PREAMBLE.size)
        mtype = message_type(start)
        if mtype == expected:
            return start + self._recv(size - PREAMBLE.size)
        if mtype == MSG_REJECT:
            head = start + self._recv(REJECT.size - PREAMBLE.size)
            length = REJECT.unpack_from(head)[4]
            rej = Reject.decode(head + self._recv(min(length, REJECT_REASON_MAX)))
            raise refused(self.peer, rej)
        raise ProtocolError(f"{self.peer} sent message type {mtype} during the handshake")

    def _handshake(self, hs: ClientHandshake) -> Welcome:
        self._send(hs.hello.encode())
        challenge = Challenge.decode(self._answer(MSG_CHALLENGE, CHALLENGE.size))
        self._send(hs.answer(challenge).encode())
        return hs.check(Welcome.decode(self._answer(MSG_WELCOME, WELCOME.size)))

    def _usable(self) -> None:
        self._check_usable()

    def _tag(self) -> int:
        self._next_tag += 1
        return self._next_tag

    # -- pipelined requests ----------------------------------------------------------------

    def _one_frame(self, kind: int, offset: int, length: int, src: memoryview | None,
                   dst: memoryview | None) -> None:
        """A request of one frame, the common case: one ``sendmsg`` for the frame and one
        ``recvmsg_into`` for the reply, its header and READ data scattered straight into
        ``dst``. Each socket call lets another nbdkit thread take the GIL, and then waits to
        get it back: fewer calls, fewer waits (docs/benchmarks.md). With one request in flight
        on the channel nothing but this reply can arrive."""
        self._next_tag += 1
        tag = self._next_tag
        head = IO.pack(MAGIC, PROTOCOL_VERSION, kind, tag, offset, length, 0)
        hdr = memoryview(self._reply)
        try:
            try:
                if src is None:
                    self.sock.sendall(head)
                else:
                    sent = self._sendv((head, src))
                    if sent < IO.size + length:
                        self.sock.sendall(head[sent:] if sent < IO.size else b"")
                        self.sock.sendall(src[max(0, sent - IO.size):])
                self._left()
                got = self._recvv((hdr, dst) if dst is not None else (hdr,))
            except OSError as exc:
                raise self._lost(exc) from None
            if got == 0:
                raise ConnectionLost(f"{self.peer} closed the connection")
            if got < REPLY.size:
                self._recv_into(hdr[got:])
                got = REPLY.size
            magic, version, mtype, rtag, status, rlen = REPLY.unpack_from(hdr)
            if magic != MAGIC or version != PROTOCOL_VERSION or mtype != MSG_REPLY:
                Reply.decode(bytes(hdr))  # raises, saying what is wrong
                raise ProtocolError(f"{self.peer} sent message type {mtype}, not a REPLY")
            if rtag != tag:
                raise ProtocolError(f"REPLY for unknown tag {rtag}")
            if status < 0 or (status and rlen):
                raise ProtocolError(f"REPLY status {status} with payload length {rlen}")
            if status == 0 and rlen != (length if dst is not None else 0):
                raise ProtocolError(f"reply of {rlen} bytes to a {length}-byte request")
            if dst is not None and status == 0 and got < REPLY.size + length:
                self._recv_into(dst[got - REPLY.size:])
        except (TransportError, ProtocolError) as exc:
            raise self._fail(exc) from None
        if status:
            raise RemoteError(f"the target failed a request: {os.strerror(status)}", status)

    def _pipeline(self, kind: int, offset: int, length: int, *, src: memoryview | None = None,
                  dst: memoryview | None = None, chunk: int | None = None,
                  commit: bool = False) -> None:
        self._usable()
        step = chunk or self.chunk_size
        if length <= step and not commit:
            self._one_frame(kind, offset, length, src, dst)
            return
        inflight: dict[int, tuple[int, int]] = {}
        pending = ((pos, min(step, length - pos)) for pos in range(0, length, step))
        failed = 0  # first errno the target answered; the rest in flight are still drained
        commit_id, commit_sent = 0, False
        try:
            more = True
            while more or inflight:
                while more and not failed and len(inflight) < self.depth:
                    nxt = next(pending, None)
                    if nxt is None:
                        more = False
                        if commit:  # behind the writes: the target handles frames in order
                            commit_id = self._tag()
                            self._send(Commit(commit_id, ((offset, length),)).encode())
                            commit_sent = True
                        break
                    pos, n = nxt
                    tag = self._tag()
                    head = IORequest(kind, tag, offset + pos, n).encode()
                    if src is not None:
                        self._send(head, src[pos:pos + n])
                    else:
                        self._send(head)
                    inflight[tag] = (pos, n)
                if inflight:
                    status = self._receive_reply(inflight, dst)
                    failed = failed or status
                if failed:
                    more = False
            if commit_sent:  # its reply comes after every write's (frames are handled in order)
                raw = self._recv(COMMIT_REPLY.size)
                if not failed:  # a failed write's range was not persisted, whatever this says
                    check_commit_reply(raw, commit_id, 1)
        except (TransportError, ProtocolError) as exc:
            raise self._fail(exc) from None
        if failed:
            raise RemoteError(f"the target failed a request: {os.strerror(failed)}", failed)

    def _receive_reply(self, inflight: dict[int, tuple[int, int]],
                       dst: memoryview | None) -> int:
        """Read one REPLY (and its payload); return its status."""
        reply = Reply.decode(self._recv(REPLY.size))
        item = inflight.pop(reply.tag, None)
        if item is None:
            raise ProtocolError(f"REPLY for unknown tag {reply.tag}")
        pos, n = item
        if reply.status:
            return reply.status
        if dst is not None:
            if reply.length != n:
                raise ProtocolError(f"READ reply of {reply.length} bytes, asked for {n}")
            self._recv_into(dst[pos:pos + n])
        elif reply.length:
            raise ProtocolError(f"unexpected {reply.length}-byte payload in a REPLY")
        return 0

    # -- Transport API ---------------------------------------------------------------------

    def read(self, buf: memoryview, offset: int) -> None:
        self._pipeline(MSG_READ, offset, len(buf), dst=buf)

    def write(self, data: memoryview, offset: int, persist: Persist | None = None) -> None:
        self._pipeline(MSG_WRITE, offset, len(data), src=data, commit=_commits(persist))

    def write_zeroes(self, offset: int, length: int, persist: Persist | None = None) -> None:
        self._pipeline(MSG_ZERO, offset, length, chunk=MAX_IO, commit=_commits(persist))

    def compare_swap(self, offset: int, expected: int, new: int) -> int:
        self._usable()
        tag = self._tag()
        try:
            self._send(IORequest(MSG_CAS, tag, offset, CAS.size).encode(),
                       CAS.pack(expected, new))
            reply = Reply.decode(self._recv(REPLY.size))
            if reply.tag != tag:
                raise ProtocolError(f"REPLY for unknown tag {reply.tag}")
            if not reply.status and reply.length != CAS_WORD:
                raise ProtocolError(f"CAS reply of {reply.length} bytes, not {CAS_WORD}")
            found = int.from_bytes(self._recv(CAS_WORD), "little") if not reply.status else 0
        except (TransportError, ProtocolError) as exc:
            raise self._fail(exc) from None
        if reply.status:
            raise RemoteError(f"the target failed a CAS: {os.strerror(reply.status)}",
                              reply.status)
        return found

    #: The target replies to a WRITE or ZERO only once the data is in the region's memory (it
    #: receives it there), so the reply is the proof a READ barrier would give. Placement,
    #: not persistence: that is gpspm's COMMIT.
    placed_on_reply = True
    kind = "tcp"
    barrier_step: PersistStep = _Step("barrier", commit=False)
    commit_step: PersistStep = _Step("commit", commit=True)
    flush_step: PersistStep | None = None  # no FLUSH verb over a stream

    def _persist_after(self, ranges: list[tuple[int, int]], step: PersistStep) -> None:
        if _commits(step):
            self.commit(ranges)
        else:
            self._usable()

    def read_barrier(self, offset: int) -> None:
        self._usable()  # nothing left to prove (placed_on_reply)

    def start_barrier(self, offset: int) -> None:
        self._usable()

    def finish_barrier(self) -> None:
        self._usable()

    def _request_id(self) -> int:
        return self._tag()

    def _commit_exchange(self, message: bytes) -> bytes:
        self._send(message)
        return self._recv(COMMIT_REPLY.size)

    def close(self) -> None:
        """An orderly close: the target sees the end of the stream, gives back this client's
        slot and then closes its side, which is waited for (briefly), so that the next
        connection finds the slot free."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            if self._broken is None and hasattr(self, "info"):
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.settimeout(CLOSE_WAIT)
                for _ in range(CLOSE_DRAIN // 4096):  # whatever a hostile target sends
                    if not self.sock.recv(4096):
                        break
        with contextlib.suppress(OSError):
            self.sock.close()

