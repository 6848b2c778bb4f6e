"""The target's RDMA side: RDMA CM listener, one external QP per client, messages over SEND/RECV.

The handshake (docs/security.md): HELLO arrives as the connect private data, the CHALLENGE goes
back as the accept private data, AUTH arrives as the first SEND. Only then, for an admitted
client, is the data area registered: one MR per client (shared by that client's channels:
every connection whose HELLO carries its client id), with remote write only for a read-write
client, and its rkey sent in the WELCOME. Clients then READ and WRITE the region
one-sidedly; this server only handles connection events and COMMIT messages, through
``Export``. When a client leaves or is dropped, its QP is destroyed; with the client's last
channel its MR is deregistered, and its rkey stops working at once.

pyverbs' ``CMEvent`` does not say which CM id an event belongs to, so on any event that may end
a connection the server asks the CM for each connection's RTS attributes: the kernel refuses
that (EINVAL) for a connection that has left the established state, and exactly those are torn
down (docs/design.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import durability, rdma
from ..address import Address, TCPAddress
from ..endpoint import Endpoint, wc_failure
from ..errors import ConfigError, PmemblkError, PmemError, TransportError
from ..pmem import is_devdax
from ..protocol import COMMIT_DEPTH, MAX_MESSAGE_SIZE, Commit, Reject
from ..rdma import Device, EventChannel, RegisteredBuffer, event_name
from ..reactor import Reactor

if TYPE_CHECKING:
    from ..session import Admission, Greeting
    from ..target import Export

log = logging.getLogger(__name__)

_RECV_BASE = 1 << 32
_SEND_BASE = 2 << 32


class _Connection:
    """One client: its CM id, queue pair, message buffers and (once admitted) its MR."""

    def __init__(self, number: int, cmid: Any, ep: Endpoint, bufs: RegisteredBuffer,
                 greeting: Greeting) -> None:
        self.number = number
        self.greeting = greeting
        self.handshaking = True  # counted by the export's handshake cap until AUTH or gone
        self.admission: Admission | None = None  # AUTH checked, counted by the export
        self.refused = False  # a REJECT is being sent; disconnect once it is
        self.cmid = cmid
        self.ep = ep
        self.bufs = bufs
        self.mr: _SharedMR | None = None
        self.timer: int | None = None
        self.commits = 0
        self.closed = False

    def close(self, disconnect: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if disconnect:
            with contextlib.suppress(rdma.PyverbsError):
                self.cmid.disconnect()
        self.ep.close()
        if self.mr is not None:  # revokes the rkey with the last QP that used it
            self.mr.release()
            self.mr = None
        self.bufs.close()
        with rdma.FD_TABLE, contextlib.suppress(rdma.PyverbsError):
            self.cmid.close()


class _SharedMR:
    """A client's registration of the data area, shared by its channels' queue pairs (one
    PD): deregistered when the last one releases it, after its QP is destroyed."""

    def __init__(self, mr: Any, key: tuple[int, bool], owner: dict[tuple[int, bool], _SharedMR]
                 ) -> None:
        self.mr = mr
        self.rkey = int(mr.rkey)
        self.refs = 1
        self._key = key
        self._owner = owner
        owner[key] = self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            del self._owner[self._key]
            with contextlib.suppress(rdma.PyverbsError):
                self.mr.close()


class VerbsServer:

    def __init__(self, reactor: Reactor, listen: Address, handshake_timeout: float = 10.0
                 ) -> None:
        rdma.require_pyverbs()
        if not isinstance(listen, TCPAddress):
            raise ConfigError(f"--listen {listen}: RDMA needs HOST:PORT, not a Unix socket")
        self.port = listen.port
        self.ip = listen.rdma_ip("--listen")
        self.depth = COMMIT_DEPTH
        self.handshake_timeout = handshake_timeout
        self.reactor = reactor
        self.export: Export | None = None
        self.events: EventChannel | None = None
        self.listener: Any = None
        self.device: Device | None = None
        self.conns: dict[int, _Connection] = {}
        #: Each client's MR, by (session number, read-only).
        self.mrs: dict[tuple[int, bool], _SharedMR] = {}
        #: The FLUSH access flags every writable MR (and every QP) gets (_probe_native).
        self.flush_access = 0
        self._number = 0
        self._closed = False

    # -- start-up --------------------------------------------------------------------------

    def start(self, export: Export) -> None:
        self.export = export
        export.on_revoke(self.revoke)
        self.events = EventChannel()
        self.listener = rdma.new_cmid(self.events)
        try:
            ai = rdma.AddrInfo(src=self.ip, src_service=str(self.port),
                               port_space=rdma.ce.RDMA_PS_TCP, flags=rdma.ce.RAI_PASSIVE)
            self.listener.bind_addr(ai)
        except rdma.PyverbsError as exc:
            raise rdma.rdma_error(
                f"cannot listen on {self.ip}:{self.port} over RDMA (is an RDMA device bound to "
                "the interface that has this address?)", exc) from None
        self.device = Device(self.listener.dev_name)
        self._probe_native(export)
        started = time.monotonic()
        with contextlib.closing(self._register_region(export, readonly=export.readonly)) as mr:
            log.info("registering the %d-byte data area takes %.1f ms (rkey 0x%x); it is done "
                     "for each client", export.size, (time.monotonic() - started) * 1000,
                     mr.rkey)
        try:
            self.listener.listen(16)
        except rdma.PyverbsError as exc:
            raise rdma.rdma_error(f"listen on {self.ip}:{self.port} failed", exc) from None
        self.reactor.add(self.events.fd, self._on_cm_events)
        region = export.region
        log.info(
            "serving %s (%d bytes, block size %d, uuid %s, is_pmem=%d, persistence by %s%s) "
            "on %s:%d via RDMA device %s", region.path, export.size, export.header.block_size,
            export.header.uuid, int(region.is_pmem), region.persist_method,
            ", read-only" if export.readonly else "", self.ip, self.port, self.device.name)

    def _probe_native(self, export: Export) -> None:
        """Which native verbs (FLUSH, ATOMIC WRITE) this device and region allow clients."""
        assert self.device is not None
        device = self.device
        native = device.native
        page = min(export.size, 4096)  # the kind of memory decides, not the size
        offer = durability.native_offer(
            native.flush_global, native.flush_persistent, native.atomic_write,
            device.native_why, export.readonly,
            lambda persistent: rdma.flush_access(device.pd, export.data_addr, page, persistent))
        self.flush_access = rdma.flush_flags(offer.flush)
        export.offer_native(offer)
        log.info("%s on %s", offer.describe(), self.device.name)

    def _register_region(self, export: Export, readonly: bool) -> Any:
        """An MR over the data area: remote read, plus remote write (and the FLUSH access the
        probe found) unless ``readonly``."""
        assert self.device is not None
        e = rdma.e
        access = e.IBV_ACCESS_REMOTE_READ
        if not readonly:
            access |= e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | self.flush_access
            if export.atomic is not None:  # its map entries move by compare-and-swap
                access |= e.IBV_ACCESS_REMOTE_ATOMIC
        try:
            return rdma.MR(self.device.pd, export.size, access, address=export.data_addr)
        except rdma.PyverbsError as exc:
            region = export.region
            if region.is_pmem and not is_devdax(region.path):
                raise PmemError(
                    f"{region.path} is a file on a DAX filesystem (fsdax), and the kernel "
                    "refuses to pin fsdax pages for RDMA (ibv_reg_mr: "
                    f"{rdma.rdma_error('', exc).args[0].lstrip(': ')}). Use a devdax namespace "
                    "(ndctl create-namespace -m devdax) or a file on a non-DAX filesystem."
                ) from None
            raise rdma.rdma_error(
                f"registering the {export.size}-byte data area of {region.path} for RDMA "
                "failed", exc) from None

    # -- CM events -------------------------------------------------------------------------

    def _on_cm_events(self) -> None:
        assert self.events is not None
        ce = rdma.ce
        probe = False
        for etype, data, event in rdma.iter_cm_events(self.events):
            if etype == ce.RDMA_CM_EVENT_CONNECT_REQUEST:
                try:
                    with rdma.FD_TABLE:
                        child = rdma.CMID(creator=event, listen_id=self.listener)
                finally:
                    event.ack_cm_event()
                self._on_connect_request(child, data)
                continue
            event.ack_cm_event()
            log.debug("CM event %s", event_name(etype))
            if etype == ce.RDMA_CM_EVENT_DEVICE_REMOVAL:
                log.error("the RDMA device was removed: stopping")
                self.reactor.stop()
            elif etype != ce.RDMA_CM_EVENT_ESTABLISHED:
                probe = True
        if probe:
            self._reap_disconnected()

    def _reap_disconnected(self) -> None:
        for conn in list(self.conns.values()):
            try:
                conn.cmid.init_qp_attr(rdma.e.IBV_QPS_RTS)
            except rdma.PyverbsError:
                log.info("client %d disconnected after %d commits", conn.number, conn.commits)
                self._drop(conn, disconnect=False)

    def _reject(self, child: Any, reject: Reject) -> None:
        log.warning("refusing a client: %s", reject.reason)
        with contextlib.suppress(rdma.PyverbsError):
            child.reject(reject.encode())
        with rdma.FD_TABLE, contextlib.suppress(rdma.PyverbsError):
            child.close()

    def _on_connect_request(self, child: Any, data: bytes) -> None:
        assert self.device is not None and self.export is not None
        greeting = self.export.greet(data)
        if isinstance(greeting, Reject):
            self._reject(child, greeting)
            return
        busy = self.export.start_handshake()
        if busy is not None:
            self._reject(child, busy)
            return
        conn = self._accept(child, greeting)
        if conn is None:
            self.export.end_handshake()
            return
        self.conns[conn.number] = conn
        self.reactor.add(conn.ep.fd, lambda: self._on_completions(conn))
        conn.timer = self.reactor.call_later(self.handshake_timeout,
                                             lambda: self._handshake_expired(conn))

    def _accept(self, child: Any, greeting: Greeting) -> _Connection | None:
        """A queue pair and buffers for a new client, and the CM accept with the CHALLENGE."""
        assert self.device is not None
        self._number += 1
        try:
            ep = Endpoint(self.device.ctx, self.device.pd, send_depth=self.depth,
                          recv_depth=self.depth)
        except TransportError as exc:
            self._reject(child, Reject(errno.ENOMEM, f"cannot create a queue pair: {exc}"))
            return None
        try:
            bufs = RegisteredBuffer(self.device.pd, 2 * self.depth * MAX_MESSAGE_SIZE)
        except TransportError as exc:
            ep.close()
            self._reject(child, Reject(errno.ENOMEM, f"cannot register buffers: {exc}"))
            return None
        conn = _Connection(self._number, child, ep, bufs, greeting)
        challenge = greeting.challenge.encode()
        try:
            # FLUSH and atomics are checked against the QP's access flags too, and the CM
            # never sets them (the MR decides what each client may do).
            atomic = self.export is not None and self.export.atomic is not None
            atomics = rdma.e.IBV_ACCESS_REMOTE_ATOMIC if atomic else 0
            ep.connect_qp(child, access=self.flush_access | atomics)
            for slot in range(self.depth):
                self._post_recv(conn, slot)
            rd = self.device.rd_atom
            param = rdma.ConnParam(resources=rd, depth=rd, retry=7, rnr_retry=7,
                                   qp_num=ep.qp_num, data_len=len(challenge))
            param.set_private_data(challenge)
            child.accept(param)
        except (TransportError, rdma.PyverbsError) as exc:
            log.warning("accepting client %d failed: %s", conn.number, exc)
            conn.close(disconnect=False)
            return None
        return conn

    def _handshake_expired(self, conn: _Connection) -> None:
        conn.timer = None
        if conn.admission is None and not conn.closed:
            log.warning("client %d did not complete the handshake within %gs: disconnecting "
                        "it", conn.number, self.handshake_timeout)
            self._drop(conn, disconnect=True)

    def _on_auth(self, conn: _Connection, slot: int, raw: bytes) -> None:
        """The client's AUTH: answer WELCOME (with its own MR's rkey) or REJECT."""
        assert self.export is not None
        if conn.timer is not None:
            self.reactor.cancel(conn.timer)
            conn.timer = None
        self._end_handshake(conn)
        admission = self.export.admit(conn.greeting, raw, "verbs",
                                      f"{conn.cmid.dev_name} (RDMA, client {conn.number})")
        if isinstance(admission, Reject):
            log.warning("refusing client %d: %s", conn.number, admission.reason)
            conn.refused = True
            self._send(conn, slot, admission.encode())
            return
        conn.admission = admission
        started = time.monotonic()
        key = (admission.session.number, admission.readonly)
        shared = self.mrs.get(key)
        if shared is not None:  # another channel of the same client: its registration
            shared.refs += 1
            how = f"sharing its client's MR, {shared.refs} channels"
        else:
            try:
                shared = _SharedMR(self._register_region(self.export,
                                                         readonly=admission.readonly),
                                   key, self.mrs)
            except PmemblkError as exc:
                log.error("client %d: %s", conn.number, exc)
                conn.refused = True
                self._send(conn, slot,
                           Reject(errno.ENOMEM, "cannot register the region").encode())
                return
            how = f"MR registered in {(time.monotonic() - started) * 1000:.1f} ms"
        conn.mr = shared
        welcome = self.export.welcome(admission, rkey=shared.rkey,
                                      remote_addr=self.export.data_addr, native=True)
        self._send(conn, slot, welcome.encode())
        log.info("client %d connected over RDMA (%s, session %d, %d clients; %s)",
                 conn.number, "read-only" if admission.readonly else "read-write",
                 admission.session.number, self.export.clients, how)

    def _drop(self, conn: _Connection, disconnect: bool) -> None:
        if self.conns.pop(conn.number, None) is not None:
            self.reactor.remove(conn.ep.fd)
            if conn.timer is not None:
                self.reactor.cancel(conn.timer)
                conn.timer = None
            # Its queue pair and registration go first: once it has left (and atomic blocks
            # are recovered, if it was the last writer) nothing of it may still land.
            conn.close(disconnect)
            if conn.admission is not None and self.export is not None:
                self.export.client_left(conn.admission)
            self._end_handshake(conn)
        conn.close(disconnect)

    def revoke(self) -> None:
        """Drop the connections the export's identities no longer allow (a reload): each one's
        QP is destroyed, and with its client's last one on that MR the MR is deregistered, so
        its rkey dies at once."""
        assert self.export is not None
        for conn in list(self.conns.values()):
            why = None if conn.admission is None else self.export.revoked(conn.admission)
            if why is not None:
                log.warning("client %d: %s: disconnecting it and revoking its rkey",
                            conn.number, why)
                self._drop(conn, disconnect=True)

    def _end_handshake(self, conn: _Connection) -> None:
        if conn.handshaking and self.export is not None:
            conn.handshaking = False
            self.export.end_handshake()

    # -- completions -----------------------------------------------------------------------

    def _post_recv(self, conn: _Connection, slot: int) -> None:
        conn.ep.post_recv(_RECV_BASE + slot, conn.bufs.addr + slot * MAX_MESSAGE_SIZE,
                          MAX_MESSAGE_SIZE, conn.bufs.lkey)

    def _on_completions(self, conn: _Connection) -> None:
        try:
            conn.ep.consume_events()
            while not conn.closed:
                wcs = conn.ep.poll()
                if not wcs:
                    break
                for wc in wcs:
                    self._on_completion(conn, wc)
                    if conn.closed:
                        break
        except PmemblkError as exc:
            log.warning("client %d: %s: disconnecting it", conn.number, exc)
            self._drop(conn, disconnect=True)

    def _on_completion(self, conn: _Connection, wc: Any) -> None:
        e = rdma.e
        assert self.export is not None
        if wc.status != e.IBV_WC_SUCCESS:
            if wc.status == e.IBV_WC_WR_FLUSH_ERR:
                log.info("client %d: queue pair flushed: the client left", conn.number)
            else:
                log.error("client %d: %s: disconnecting it", conn.number,
                          wc_failure(wc, "message"))
            self._drop(conn, disconnect=True)
            return
        if _SEND_BASE <= wc.wr_id < _SEND_BASE + self.depth:
            if conn.refused:  # the REJECT has gone out
                log.info("client %d refused: disconnecting it", conn.number)
                self._drop(conn, disconnect=True)
                return
            self._post_recv(conn, wc.wr_id - _SEND_BASE)  # reply sent: buffer free again
            return
        if not _RECV_BASE <= wc.wr_id < _RECV_BASE + self.depth:
            raise TransportError(f"completion for unknown work request {wc.wr_id}")
        slot = wc.wr_id - _RECV_BASE
        start = slot * MAX_MESSAGE_SIZE
        raw = bytes(conn.bufs.view[start:start + min(wc.byte_len, MAX_MESSAGE_SIZE)])
        if conn.refused:
            return
        if conn.admission is None:
            self._on_auth(conn, slot, raw)
            return
        commit = Commit.decode(raw, self.export.size)  # ProtocolError drops the client
        conn.commits += 1
        reply = self.export.commit(commit, conn.admission.session)
        if self.export.lose_reply("commit"):
            log.warning("client %d: losing its COMMIT reply (testing)", conn.number)
            self._drop(conn, disconnect=True)
            return
        self._send(conn, slot, reply.encode())

    def _send(self, conn: _Connection, slot: int, msg: bytes) -> None:
        """Send the answer to the message received in ``slot``, from that slot's send buffer."""
        out = (self.depth + slot) * MAX_MESSAGE_SIZE
        conn.bufs.view[out:out + len(msg)] = msg
        conn.ep.post(_SEND_BASE + slot, rdma.e.IBV_WR_SEND, conn.bufs.addr + out, len(msg),
                     conn.bufs.lkey)

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in list(self.conns.values()):
            self._drop(conn, disconnect=True)
        if self.events is not None:
            self.reactor.remove(self.events.fd)
        if self.device is not None:
            self.device.close()
        if self.listener is not None:
            with rdma.FD_TABLE, contextlib.suppress(rdma.PyverbsError):
                self.listener.close()
        if self.events is not None:
            self.events.close()
