"""An admitted stream client's channel, served by a thread of its own.

The reactor (``servers/stream.py``) accepts connections and runs their handshakes, where the
limits against unauthenticated peers live. Once a connection is admitted it is handed to a
``DataChannel``: a thread that blocks in ``recv_into``/``sendmsg`` (which release the GIL) and
moves data straight between the socket and the region's mapping, with no copy in between:
a WRITE's payload is received into the mapping itself, a READ's reply is sent from it. Channels
run concurrently, and a COMMIT persists on its own channel's thread while the others keep
moving data (docs/design.md).

Requests on one channel are handled in order, so replies come back in order. Memory per
channel is a header buffer and one COMMIT: a client that sends requests and never reads the
replies blocks its thread in ``sendmsg`` once the kernel's socket buffers are full, and nothing
more of it is read. A frame is validated before its body is read, as in the handshake.

Over TLS the socket is an ``ssl`` socket, which has no ``sendmsg``: a reply and its payload
are then sent with ``sendall`` (joined into one record when small), chosen once per channel;
the plain path keeps its one ``sendmsg`` from the mapping.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import PmemblkError, ProtocolError
from ..protocol import (
    AUTH,
    CAS,
    CAS_WORD,
    COMMIT,
    HELLO,
    IO,
    MSG_CAS,
    MSG_COMMIT,
    MSG_HELLO,
    MSG_READ,
    MSG_WRITE,
    PREAMBLE,
    RANGE,
    Commit,
    Reply,
    message_type,
    parse_request_header,
    request_header_size,
)

if TYPE_CHECKING:
    from ..session import Admission
    from ..target import Export

log = logging.getLogger(__name__)

#: A read-only client's WRITE payload is read and dropped this many bytes at a time.
DISCARD_SIZE = 64 << 10
#: How long a stopping target waits for a channel's thread (it is in a persist at most).
JOIN_TIMEOUT = 30.0
#: Over TLS, a reply and a payload up to this size are sent as one record (one copy).
TLS_JOIN = 64 << 10
#: What is read first of every request: the smallest frame a client may send once admitted.
FIRST_READ = IO.size
assert min(COMMIT.size + RANGE.size, HELLO.size, AUTH.size) >= FIRST_READ


class _Gone(Exception):
    """The client closed the connection (``midframe``: with part of a frame sent)."""

    def __init__(self, midframe: int) -> None:
        super().__init__(midframe)
        self.midframe = midframe


def _region_gone(exc: OSError) -> None:
    """The kernel could not copy to or from the mapping: the region file was truncated under
    the target (docs/security.md). Every later request would fail the same way, so the target
    dies as it would had Python touched the page itself: SIGBUS, which faulthandler logs."""
    log.critical("the region's memory is no longer there (%s): was the region file truncated "
                 "while served? Stopping", exc.strerror)
    signal.raise_signal(signal.SIGBUS)
    os._exit(1)  # not reached: SIGBUS's default action ends the process


class _Lost(Exception):
    """TESTING ONLY: a reply the fault injection says to lose; the client is dropped."""


class DataChannel:
    """One admitted connection: its socket, its thread, its session in the export."""

    def __init__(self, export: Export, sock: socket.socket, number: int, peer: str,
                 admission: Admission, unsent: bytes, received: bytes,
                 on_exit: Callable[[DataChannel], None]) -> None:
        self.export = export
        self.sock = sock
        self.number = number
        self.peer = peer
        self.admission = admission
        self.readonly = admission.readonly
        self.requests = 0
        self._unsent = unsent  # the WELCOME, if the reactor had not sent all of it
        self._received = memoryview(received)  # bytes the client sent after its AUTH
        self._on_exit = on_exit
        self._header = bytearray(max(IO.size, COMMIT.size, HELLO.size, AUTH.size))
        self._stopping = False
        self._send = self._send_tls if isinstance(sock, ssl.SSLSocket) else self._send_plain
        self._stop_why = ""
        self.thread = threading.Thread(target=self._run, name=f"pmemblk-channel-{number}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, why: str = "disconnected: the target is stopping") -> None:
        """End the thread: its blocked recv or send returns (called from another thread)."""
        self._stop_why = why
        self._stopping = True
        with contextlib.suppress(OSError):
            # The socket's own shutdown, also under TLS: SSLSocket.shutdown would drop its
            # TLS state under the thread that is reading.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def join(self) -> None:
        if self.thread.ident is None:  # never started (its thread could not be made)
            return
        self.thread.join(JOIN_TIMEOUT)
        if self.thread.is_alive():
            log.error("client %d: its thread did not end within %gs", self.number,
                      JOIN_TIMEOUT)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        why, warn = "disconnected", False
        try:
            self.sock.setblocking(True)
            if self._unsent:
                self.sock.sendall(self._unsent)
            while self._serve_one():
                self.requests += 1
        except _Gone as gone:
            if gone.midframe:
                why, warn = f"left in the middle of a frame ({gone.midframe} bytes of it read)", \
                    True
        except PmemblkError as exc:
            why, warn = f"sent an invalid frame: {exc}", True
        except _Lost as lost:
            why, warn = str(lost), True
        except OSError as exc:
            if exc.errno == errno.EFAULT:
                _region_gone(exc)
            why = f"connection error: {exc.strerror or exc}"
        except Exception:  # a bug: drop this client, keep serving the others
            log.exception("client %d: internal error", self.number)
            why, warn = "hit an internal error", True
        if self._stopping:
            why, warn = self._stop_why, False
        (log.warning if warn else log.info)(
            "client %d (%s) %s after %d requests%s", self.number, self.peer, why, self.requests,
            ": disconnecting it" if warn else "")
        # The slot goes first, then the socket: a client that waits for the close (an orderly
        # one, StreamTransport.close) can take the writer slot again at once.
        self.export.client_left(self.admission)
        with contextlib.suppress(OSError):
            self.sock.close()
        self._on_exit(self)

    def _read(self, view: memoryview, frame_start: bool = False, got: int = 0,
              at_least: int | None = None) -> int:
        """Fill ``view`` (or at least its first ``at_least`` bytes) from what the reactor passed
        on, then from the socket; how many bytes came. ``got``: bytes of this frame already
        read (for the message when the client leaves)."""
        pos = 0
        need = len(view) if at_least is None else at_least
        if self._received:
            n = min(len(view), len(self._received))
            view[:n] = self._received[:n]
            self._received = self._received[n:]
            pos = n
        while pos < need:
            n = self.sock.recv_into(view[pos:])
            if n == 0:
                raise _Gone(0 if frame_start and pos == 0 else got + pos)
            pos += n
        return pos

    def _send_tls(self, head: bytes, body: memoryview | None = None) -> None:
        """``_send`` over TLS."""
        if body is None or len(body) <= TLS_JOIN:
            self.sock.sendall(head if body is None else b"".join((head, body)))
        else:
            self.sock.sendall(head)
            self.sock.sendall(body)

    def _send_plain(self, head: bytes, body: memoryview | None = None) -> None:
        """A reply, and its payload straight from the mapping, in one system call when the
        socket takes it all."""
        parts: list[bytes | memoryview] = [head] if body is None else [head, body]
        total = sum(len(p) for p in parts)
        sent = self.sock.sendmsg(parts)
        if sent < len(head):
            self.sock.sendall(head[sent:])
            sent = len(head)
        if body is not None and sent < total:
            self.sock.sendall(body[sent - len(head):])

    def _serve_one(self) -> bool:
        """Handle one request; False when the client closed the connection between frames."""
        export = self.export
        header = memoryview(self._header)
        # Every frame after the handshake is at least FIRST_READ bytes (a READ, WRITE or ZERO
        # header is exactly that; a COMMIT with its one range, a HELLO or AUTH more), so one
        # receive of up to that much never takes a byte of the next frame, and usually gets a
        # request's whole header. Only what the type's header needs is then waited for, so an
        # invalid header is refused as soon as it is there.
        try:
            have = self._read(header[:FIRST_READ], frame_start=True, at_least=PREAMBLE.size)
        except _Gone as gone:
            if gone.midframe == 0:
                return False
            raise
        mtype = message_type(bytes(header[:PREAMBLE.size]))
        hsize = request_header_size(bytes(header[:PREAMBLE.size]))
        if have < hsize:
            have += self._read(header[have:hsize], got=have)
        total, req = parse_request_header(bytes(header[:hsize]), export.size)
        session = self.admission.session
        if mtype == MSG_COMMIT:
            frame = bytearray(total)
            frame[:have] = header[:have]
            self._read(memoryview(frame)[have:], got=have)
            reply = export.commit(Commit.decode(bytes(frame), export.size), session)
            if export.lose_reply("commit"):
                raise _Lost("lost its COMMIT reply (testing)")
            self._send(reply.encode())
        elif req is None:
            raise ProtocolError(f"{'HELLO' if mtype == MSG_HELLO else 'AUTH'} after the handshake")
        elif mtype == MSG_READ:
            if export.lose_reply("read"):
                raise _Lost("lost its READ reply (testing)")
            # Sent from the mapping itself: the view stays valid because the region is
            # unmapped only after every channel's thread has ended (Target.shutdown).
            self._send(Reply(req.tag, 0, req.length).encode(), export.view(req.offset,
                                                                           req.length))
            export.count(session, "read", req.length)
        elif self.readonly:  # the export, or this client's own read-only mode
            if mtype in (MSG_WRITE, MSG_CAS):
                self._discard(req.length, hsize)
            self._send(Reply(req.tag, errno.EPERM, 0).encode())
        elif mtype == MSG_CAS:
            payload = bytearray(CAS.size)
            self._read(memoryview(payload), got=hsize)
            expected, new = CAS.unpack(payload)
            found = export.compare_store(req.offset, expected, new)
            self._send(Reply(req.tag, 0, CAS_WORD).encode() + found.to_bytes(8, "little"))
        else:
            if mtype == MSG_WRITE:
                # Received into the region itself: a client that leaves mid-payload leaves
                # that range partly written, which an unacknowledged write may be.
                self._read(export.view(req.offset, req.length), got=hsize)
                export.count(session, "write", req.length)
                if export.lose_reply("write"):
                    raise _Lost("lost its WRITE reply (testing)")
            else:
                export.zero(req.offset, req.length)
                export.count(session, "zero", req.length)
            self._send(Reply(req.tag, 0, 0).encode())
        return True

    def _discard(self, length: int, got: int) -> None:
        scratch = memoryview(bytearray(min(DISCARD_SIZE, length)))
        done = 0
        while done < length:
            n = min(len(scratch), length - done)
            self._read(scratch[:n], got=got + done)
            done += n
