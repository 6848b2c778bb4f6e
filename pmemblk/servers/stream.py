"""The target's stream side: TCP or a Unix socket, the same messages as frames.

Until it is admitted, each connection is a non-blocking socket on the target's reactor, where
the limits against unauthenticated peers live (handshake cap and deadline, accept back-off).
Frames are parsed incrementally: the 8-byte preamble gives the fixed header size, the validated
header gives the frame size, and only then is the body awaited, so no length is trusted before
it is checked. Any invalid frame, a client silent past the handshake deadline, or one that
leaves mid-frame is logged and disconnected; the others are not affected.

With ``--tls on|require`` a connection's first byte is looked at without taking it: a TLS
ClientHello (0x16) gets the TLS handshake, on the reactor too (non-blocking, under the same
handshake deadline), and the pmemblk handshake then runs inside TLS; a plaintext HELLO is
served (``on``) or refused with the reason (``require``). ``off`` refuses a ClientHello
(docs/protocol.md, "TLS").

Once admitted (WELCOME), the connection is handed to a ``DataChannel`` (``servers/channel.py``),
a thread that serves its requests straight between the socket and the region, concurrently
with every other channel. Requests on a channel are answered in order; several may be in
flight (they are tagged).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING

from ..address import Address
from ..errors import ConfigError, PmemblkError, ProtocolError, TransportError
from ..protocol import (
    MSG_AUTH,
    MSG_HELLO,
    PREAMBLE,
    Reject,
    message_type,
    parse_request_header,
    request_header_size,
)
from ..reactor import Reactor
from ..tls import TLS_HANDSHAKE_BYTE, server_context
from ..unixsock import listen_unix, unlink_if_ours
from .channel import DataChannel

if TYPE_CHECKING:
    from ..session import Admission, Greeting
    from ..target import Export

log = logging.getLogger(__name__)

#: The handshake's frames are small: a client that sends more before it is admitted is read
#: this much at a time (what is left is passed on to its channel).
RECV_SIZE = 64 << 10
#: Connections accepted per readiness event of the listener.
ACCEPT_BATCH = 64
#: After accept() fails (out of descriptors), the listener is ignored this long.
ACCEPT_PAUSE = 0.25
#: Refusals and accept failures are logged at most once per this many seconds.
ACCEPT_LOG_INTERVAL = 10.0
KEEPALIVE_PROBES = 3
#: Where a connection is before its pmemblk handshake: its first byte not yet seen, in the TLS
#: handshake, or speaking plaintext or TLS.
FIRST, TLS_HANDSHAKE, PLAIN, TLS = "first", "tls-handshake", "plain", "tls"
#: A non-blocking ssl socket's "try again when ready", like BlockingIOError for a plain one.
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Conn:
    def __init__(self, server: StreamServer, sock: socket.socket, number: int, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.number = number
        self.peer = peer
        self.rbuf = bytearray()
        self.wq: collections.deque[memoryview] = collections.deque()
        self.greeting: Greeting | None = None
        self.admission: Admission | None = None  # admitted: handed to a DataChannel
        self.welcome = b""  # the WELCOME of an admission, sent by its channel's thread
        self.closed = False
        self.close_after_send = False
        self.timer: int | None = None
        #: Counted by the export's handshake cap until admitted, refused or gone.
        self.handshaking = True
        self.stage = FIRST

    # -- TLS -------------------------------------------------------------------------------

    def _first_byte(self) -> bool:
        """Look at the first byte (without taking it): TLS or not, and whether this target
        serves that; True to go on reading."""
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.drop(f"connection error: {exc.strerror}", warn=False)
            return False
        if not first:
            self.drop("disconnected", warn=False)
            return False
        mode = self.server.tls_mode
        if first[0] == TLS_HANDSHAKE_BYTE:
            if mode == "off":
                self._refuse_first(Reject(errno.EPROTO, "this target does not use TLS (it "
                                                        "serves with --tls off): connect "
                                                        "with tls=off"))
                return False
            assert self.server.tls_context is not None
            try:
                self.sock = self.server.tls_context.wrap_socket(
                    self.sock, server_side=True, do_handshake_on_connect=False)
            except OSError as exc:  # it reset since the peek (ENOTCONN from getpeername)
                self.drop(f"connection error: {exc.strerror or exc}", warn=False)
                return False
            self.stage = TLS_HANDSHAKE
            return True
        if mode == "require":
            self._refuse_first(Reject(errno.EACCES, "this target requires TLS (it serves with "
                                                    "--tls require): connect with tls=require "
                                                    "and tls-certificates=DIR"))
            return False
        self.stage = PLAIN
        return True

    def _refuse_first(self, reject: Reject) -> None:
        """Refuse before the first frame: what the peer sent is read first, so that closing
        with it unread does not reset the connection before the REJECT is read."""
        with contextlib.suppress(OSError):
            self.sock.recv(RECV_SIZE)
        self._refuse(reject)
        self._update_interest()

    def _tls_handshake(self) -> None:
        """One step of the server's TLS handshake; then the HELLO inside it."""
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.server.reactor.modify(self.fd, self.on_readable, None)
            return
        except ssl.SSLWantWriteError:
            self.server.reactor.modify(self.fd, self.on_readable, self.on_writable)
            return
        except OSError as exc:  # ssl.SSLError included: a bad certificate, not TLS 1.3, ...
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else exc
            # What came after (a TLS 1.3 client's HELLO) is taken off the socket, so that the
            # close does not reset the connection and discard the alert just sent.
            with contextlib.suppress(OSError):
                socket.socket.recv(self.sock, RECV_SIZE)
            self.drop(f"failed the TLS handshake ({str(reason).lower().replace('_', ' ')})")
            return
        self.stage = TLS
        log.debug("client %d (%s): TLS handshake done (%s, %s)", self.number, self.peer,
                  self.sock.version(), self.sock.cipher())
        self.server.reactor.modify(self.fd, self.on_readable, None)
        self._receive()  # the HELLO may have come with the handshake's last message

    # -- reading ---------------------------------------------------------------------------

    def on_readable(self) -> None:
        if self.stage == FIRST and not self._first_byte():
            return
        if self.stage == TLS_HANDSHAKE:
            self._tls_handshake()
            return
        self._receive()

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except _WOULD_BLOCK:
                return
            except OSError as exc:
                self.drop(f"connection error: {exc.strerror or exc}", warn=False)
                return
            if not data:
                if self.rbuf:
                    self.drop(f"left in the middle of a frame ({len(self.rbuf)} bytes of it "
                              "read)")
                else:
                    self.drop("disconnected", warn=False)
                return
            self.rbuf += data
            self._process()
            # TLS: what was decrypted but not yet taken makes the socket no more readable.
            if (self.closed or self.close_after_send or self.stage != TLS
                    or not isinstance(self.sock, ssl.SSLSocket) or not self.sock.pending()):
                return

    def _process(self) -> None:
        """Handle the handshake's complete frames; once admitted, hand the connection over."""
        try:
            while (not self.closed and not self.close_after_send and self.admission is None
                   and self._next_frame()):
                pass
        except PmemblkError as exc:
            self.drop(f"sent an invalid frame: {exc}")
            return
        except Exception:  # a bug: drop this client, keep serving the others
            log.exception("client %d: internal error", self.number)
            self.drop("hit an internal error")
            return
        if self.admission is not None and not self.closed:
            self._hand_over(self.admission)
            return
        self._update_interest()

    def _next_frame(self) -> bool:
        buf = self.rbuf
        if len(buf) < PREAMBLE.size:
            return False
        preamble = bytes(buf[:PREAMBLE.size])
        mtype = message_type(preamble)
        # Checked before any length, which would depend on the export.
        expected = MSG_HELLO if self.greeting is None else MSG_AUTH
        if mtype != expected:
            raise ProtocolError(f"expected {'HELLO' if expected == MSG_HELLO else 'AUTH'} "
                                "first: the handshake is HELLO, then AUTH")
        hsize = request_header_size(preamble)
        if len(buf) < hsize:
            return False
        export = self.server.export
        assert export is not None
        total, _ = parse_request_header(bytes(buf[:hsize]), export.size)
        if len(buf) < total:
            return False
        frame = bytes(buf[:total])
        del buf[:total]
        if self.greeting is None:
            self._hello(frame, export)
        else:
            self._auth(frame, export, self.greeting)
        return True

    def _hello(self, raw: bytes, export: Export) -> None:
        greeting = export.greet(raw)
        if isinstance(greeting, Reject):
            self._refuse(greeting)
            return
        self.greeting = greeting
        self.send(greeting.challenge.encode())

    def _auth(self, raw: bytes, export: Export, greeting: Greeting) -> None:
        if self.timer is not None:
            self.server.reactor.cancel(self.timer)
            self.timer = None
        self._end_handshake()
        served = self.server.served()
        if served >= export.config.max_threads:
            self._refuse(Reject(errno.EAGAIN, f"the target serves {served} connections over "
                                              "TCP, its limit (serve --max-threads): try again "
                                              "later"), quiet=True)
            return
        admission = export.admit(greeting, raw, "tcp", self.peer)
        if isinstance(admission, Reject):
            self._refuse(admission)
            return
        self.welcome = export.welcome(admission).encode()
        self.admission = admission

    def _hand_over(self, admission: Admission) -> None:
        """The reactor is done with this connection: its channel's thread serves it now, and
        sends the WELCOME; if no thread can be made for it, it is refused instead."""
        export = self.server.export
        assert export is not None
        self.server.reactor.remove(self.fd)
        unsent = b"".join(bytes(v) for v in self.wq) + self.welcome
        why = self.server.start_channel(DataChannel(
            export, self.sock, self.number, self.peer, admission, unsent, bytes(self.rbuf),
            self.server.channel_ended))
        if why is not None:  # a tasks limit (TasksMax=, pids.max, ulimit -u) was reached
            export.client_left(admission)
            self.admission = None
            self.server.reactor.add(self.fd, self.on_readable)
            self._refuse(Reject(errno.EAGAIN, f"the target cannot start a thread for this "
                                              f"connection ({why}): try again later"),
                         quiet=True)
            self._update_interest()
            return
        self.closed = True
        self.server.conns.pop(self.number, None)
        self.wq.clear()
        log.info("client %d connected from %s (%s%s, session %d, %d clients)", self.number,
                 self.peer, "read-only" if admission.readonly else "read-write",
                 ", TLS" if self.stage == TLS else "", admission.session.number,
                 export.clients)

    def _refuse(self, reject: Reject, quiet: bool = False) -> None:
        """Send ``reject`` and close. ``quiet``: a refusal a flood repeats, logged at most
        once per ACCEPT_LOG_INTERVAL."""
        message = f"refusing client {self.number} ({self.peer}): {reject.reason}"
        if quiet:
            self.server.refusals.warn(message)
        else:
            log.warning("%s", message)
        self.send(reject.encode())
        self.close_after_send = True

    def _end_handshake(self) -> None:
        if self.handshaking:
            self.handshaking = False
            if self.server.export is not None:
                self.server.export.end_handshake()

    def handshake_expired(self) -> None:
        self.timer = None
        if self.admission is None and not self.closed:
            self.drop(f"did not complete the handshake within "
                      f"{self.server.handshake_timeout:g}s")

    # -- writing ---------------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        if data:
            self.wq.append(memoryview(data))

    def _flush(self) -> bool:
        """Send what the socket takes now; False if the connection failed (and was dropped)."""
        try:
            while self.wq:
                head = self.wq[0]
                n = self.sock.send(head)
                if n < len(head):
                    self.wq[0] = head[n:]
                    break
                self.wq.popleft()
        except _WOULD_BLOCK:
            pass
        except OSError as exc:
            self.drop(f"connection error: {exc.strerror}", warn=False)
            return False
        return True

    def on_writable(self) -> None:
        if self.stage == TLS_HANDSHAKE:
            self._tls_handshake()
            return
        if self._flush():
            self._update_interest()

    def _update_interest(self) -> None:
        if self.closed or not self._flush():
            return
        if not self.wq and self.close_after_send:
            self.drop("refused", warn=False)
            return
        reading = not self.close_after_send
        if self.stage == TLS_HANDSHAKE:  # its own wants (_tls_handshake)
            return
        self.server.reactor.modify(self.fd, self.on_readable if reading else None,
                                   self.on_writable if self.wq else None)

    # -- teardown --------------------------------------------------------------------------

    def drop(self, why: str, warn: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        (log.warning if warn else log.info)(
            "client %d (%s) %s in its handshake%s", self.number, self.peer, why,
            ": disconnecting it" if warn else "")
        if self.timer is not None:
            self.server.reactor.cancel(self.timer)
        self._end_handshake()
        self.server.reactor.remove(self.fd)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.wq.clear()
        self.server.conns.pop(self.number, None)
        if self.admission is not None and self.server.export is not None:
            self.server.export.client_left(self.admission)


class StreamServer:

    def __init__(self, reactor: Reactor, listen: Address, handshake_timeout: float) -> None:
        self.reactor = reactor
        #: off, on (a client may use TLS or not) or require, from the export's ServeConfig;
        #: and the context for TLS (start).
        self.tls_mode = "off"
        self.tls_context: ssl.SSLContext | None = None
        self.listen = listen
        self.address: str | tuple[str, int]
        self.family, self.address = listen.socket_address()
        self.handshake_timeout = handshake_timeout
        self.export: Export | None = None
        self.sock: socket.socket | None = None
        self.conns: dict[int, _Conn] = {}
        #: Admitted connections, each served by its own thread (they remove themselves).
        self.channels: dict[int, DataChannel] = {}
        self._channels_lock = threading.Lock()
        self._number = 0
        self._closed = False
        #: (st_dev, st_ino) of the Unix socket this server made: only that one is removed.
        self._socket_id: tuple[int, int] | None = None
        self._accept_paused = False
        self._complaints = RateLimitedLog(ACCEPT_LOG_INTERVAL)
        self.refusals = RateLimitedLog(ACCEPT_LOG_INTERVAL)

    def start(self, export: Export) -> None:
        self.export = export
        config = export.config
        if config.tls != "off":  # checked before the region was opened (cli.check_tls)
            self.tls_context = server_tls(config.tls, config.tls_certificates,
                                          config.tls_verify_peer)
            self.tls_mode = config.tls
        export.on_revoke(self.revoke)
        if self.family == socket.AF_UNIX:
            assert isinstance(self.address, str)
            sock, self._socket_id = listen_unix(self.address, f"--listen {self.listen}",
                                                backlog=64)
        else:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(self.address)
                sock.listen(64)
            except OSError as exc:
                sock.close()
                raise TransportError(f"cannot listen on {self.listen}: "
                                     f"{exc.strerror or exc}") from None
        sock.setblocking(False)
        self.sock = sock
        self.reactor.add(sock.fileno(), self._on_accept)
        region = export.region
        log.info(
            "serving %s (%d bytes, block size %d, uuid %s, is_pmem=%d, persistence by %s%s) "
            "on %s over TCP%s", region.path, export.size, export.header.block_size,
            export.header.uuid, int(region.is_pmem), region.persist_method,
            ", read-only" if export.readonly else "", self.listen,
            f" (TLS {self.tls_mode})" if self.tls_mode != "off" else "")

    def _on_accept(self) -> None:
        assert self.sock is not None and self.export is not None
        for _ in range(ACCEPT_BATCH):  # then let the other clients have a turn
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors (EMFILE, ENFILE) or memory: the listener stays readable,
                # so stop watching it for a moment instead of spinning.
                self._pause_accepting(exc)
                return
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and addr else "unix socket"
            busy = self.export.start_handshake()
            if busy is not None:
                self._complaints.warn(f"refusing connections: {busy.reason}")
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(busy.encode())  # a REJECT the client reports (and retries)
                sock.close()
                continue
            sock.setblocking(False)
            if self.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                set_keepalive(sock, self.export.config.keepalive)
            self._number += 1
            conn = _Conn(self, sock, self._number, peer)
            self.conns[conn.number] = conn
            conn.timer = self.reactor.call_later(self.handshake_timeout, conn.handshake_expired)
            self.reactor.add(conn.fd, conn.on_readable)

    def _pause_accepting(self, exc: OSError) -> None:
        assert self.sock is not None
        self._complaints.warn(f"accept failed: {exc.strerror or exc}; not accepting for "
                              f"{ACCEPT_PAUSE:g}s at a time (connections: {len(self.conns)})")
        if not self._accept_paused:
            self._accept_paused = True
            self.reactor.remove(self.sock.fileno())
            self.reactor.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if not self._closed and self.sock is not None:
            self.reactor.add(self.sock.fileno(), self._on_accept)

    def served(self) -> int:
        """Admitted connections whose threads serve them now."""
        with self._channels_lock:
            return len(self.channels)

    def start_channel(self, channel: DataChannel) -> str | None:
        """Start ``channel``'s thread; why it could not be started, or None."""
        with self._channels_lock:
            self.channels[channel.number] = channel
        try:
            channel.start()
        except RuntimeError as exc:  # "can't start new thread": EAGAIN from clone()
            with self._channels_lock:
                self.channels.pop(channel.number, None)
            return str(exc)
        return None

    def revoke(self) -> None:
        """Drop the admitted connections the export's identities no longer allow (a reload):
        their threads end, and their sessions with them."""
        assert self.export is not None
        with self._channels_lock:
            channels = list(self.channels.values())
        for channel in channels:
            why = self.export.revoked(channel.admission)
            if why is not None:
                log.warning("client %d (%s): %s: disconnecting it", channel.number,
                            channel.peer, why)
                channel.stop(f"disconnected: {why}")

    def channel_ended(self, channel: DataChannel) -> None:
        """Called by a channel's thread as it ends."""
        with self._channels_lock:
            self.channels.pop(channel.number, None)

    def close(self) -> None:
        """Disconnect every client: the reactor's, then every channel, whose threads are
        waited for (the region is unmapped after this returns)."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self.conns.values()):
            conn.drop("disconnected: the target is stopping", warn=False)
        with self._channels_lock:
            channels = list(self.channels.values())
        for channel in channels:
            channel.stop()
        for channel in channels:
            channel.join()
        if self.sock is not None:
            self.reactor.remove(self.sock.fileno())
            self.sock.close()
        if self._socket_id is not None:
            assert isinstance(self.address, str)
            unlink_if_ours(self.address, self._socket_id)


def server_tls(mode: str, folder: str | None, verify_peer: bool) -> ssl.SSLContext:
    """The target's TLS context for ``--tls mode`` (on or require); ConfigError, one line,
    for a missing or unusable certificates folder."""
    if folder is None:
        raise ConfigError(f"--tls {mode} needs --tls-certificates DIR (with server-cert.pem "
                          "and server-key.pem; make them with pmemblk tls-certificates DIR "
                          "--server NAME)")
    return server_context(folder, verify_peer)


def set_keepalive(sock: socket.socket, idle: float) -> None:
    """Drop a client whose host vanished without closing the connection: after ``idle``
    seconds of silence, KEEPALIVE_PROBES probes ``idle / 3`` apart; and unacknowledged data
    times out after the same total (TCP_USER_TIMEOUT)."""
    interval = max(1, round(idle / 3))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(idle)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                    int((idle + KEEPALIVE_PROBES * interval) * 1000))


class RateLimitedLog:
    """A warning at most once per ``interval`` seconds, with how many were held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -interval
        self.held = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        more = f" (and {self.held} more like it in the last {self.interval:g}s)" if self.held \
            else ""
        log.warning("%s%s", message, more)
        self.last, self.held = now, 0
