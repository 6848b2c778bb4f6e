"""The target's RDMA side: RDMA CM listener, one external QP per client, COMMIT over SEND/RECV.

The data area is registered once as one MR; clients READ and WRITE it one-sidedly. This server
only handles connection events and COMMIT messages, through ``Export``.

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

from ..errors import PmemblkError, PmemError, TransportError
from ..pmem import is_devdax
from ..protocol import MAX_MESSAGE_SIZE, Commit, Reject
from ..reactor import Reactor
from . import rdma
from .rdma import Device, Endpoint, EventChannel, RegisteredBuffer, event_name
from .verbs import resolve_ip

if TYPE_CHECKING:
    from ..target import Export

log = logging.getLogger(__name__)

_RECV_BASE = 1 << 32
_SEND_BASE = 2 << 32


class _Connection:
    """One client: its CM id, queue pair and message buffers."""

    def __init__(self, number: int, cmid: Any, ep: Endpoint, bufs: RegisteredBuffer,
                 writer: bool) -> None:
        self.number = number
        self.writer = writer
        self.cmid = cmid
        self.ep = ep
        self.bufs = bufs
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
        self.bufs.close()
        with contextlib.suppress(rdma.PyverbsError):
            self.cmid.close()


class VerbsServer:

    def __init__(self, reactor: Reactor, listen: str) -> None:
        from ..target import COMMIT_DEPTH, parse_listen

        rdma.require_pyverbs()
        host, self.port = parse_listen(listen)
        self.ip = resolve_ip(host, "--listen")
        self.depth = COMMIT_DEPTH
        self.reactor = reactor
        self.export: Export | None = None
        self.events: EventChannel | None = None
        self.listener: Any = None
        self.device: Device | None = None
        self.mr: Any = None
        self.conns: dict[int, _Connection] = {}
        self._number = 0
        self._closed = False

    # -- start-up --------------------------------------------------------------------------

    def start(self, export: Export) -> None:
        self.export = export
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
        self._register_region(self.device, export)
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

    def _register_region(self, device: Device, export: Export) -> None:
        e = rdma.e
        access = e.IBV_ACCESS_REMOTE_READ
        if not export.readonly:
            access |= e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        started = time.monotonic()
        try:
            self.mr = rdma.MR(device.pd, export.size, access, address=export.data_addr)
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
        log.info("registered %d bytes in %.0f ms (rkey 0x%x)", export.size,
                 (time.monotonic() - started) * 1000, self.mr.rkey)

    # -- CM events -------------------------------------------------------------------------

    def _on_cm_events(self) -> None:
        assert self.events is not None
        ce = rdma.ce
        probe = False
        for etype, data, event in rdma.iter_cm_events(self.events):
            if etype == ce.RDMA_CM_EVENT_CONNECT_REQUEST:
                try:
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
        with contextlib.suppress(rdma.PyverbsError):
            child.close()

    def _on_connect_request(self, child: Any, data: bytes) -> None:
        assert self.device is not None and self.export is not None
        admission = self.export.answer_hello(data, rkey=int(self.mr.rkey),
                                             remote_addr=self.export.data_addr)
        answer = admission.answer
        if isinstance(answer, Reject):
            self._reject(child, answer)
            return
        writer = admission.writer
        self._number += 1
        try:
            ep = Endpoint(self.device.ctx, self.device.pd, send_depth=self.depth,
                          recv_depth=self.depth)
        except TransportError as exc:
            self.export.client_left(writer)
            self._reject(child, Reject(errno.ENOMEM, f"cannot create a queue pair: {exc}"))
            return
        try:
            bufs = RegisteredBuffer(self.device.pd, 2 * self.depth * MAX_MESSAGE_SIZE)
        except TransportError as exc:
            ep.close()
            self.export.client_left(writer)
            self._reject(child, Reject(errno.ENOMEM, f"cannot register buffers: {exc}"))
            return
        conn = _Connection(self._number, child, ep, bufs, writer)
        welcome = answer.encode()
        try:
            ep.connect_qp(child)
            for slot in range(self.depth):
                self._post_recv(conn, slot)
            rd = self.device.rd_atom
            param = rdma.ConnParam(resources=rd, depth=rd, retry=7, rnr_retry=7,
                                   qp_num=ep.qp_num, data_len=len(welcome))
            param.set_private_data(welcome)
            child.accept(param)
        except (TransportError, rdma.PyverbsError) as exc:
            log.warning("accepting client %d failed: %s", conn.number, exc)
            self.export.client_left(writer)
            conn.close(disconnect=False)
            return
        self.conns[conn.number] = conn
        self.reactor.add(ep.fd, lambda: self._on_completions(conn))
        log.info("client %d connected over RDMA (%s, %d clients)", conn.number,
                 "read-write" if writer else "read-only", self.export.clients)

    def _drop(self, conn: _Connection, disconnect: bool) -> None:
        if self.conns.pop(conn.number, None) is not None:
            self.reactor.remove(conn.ep.fd)
            if self.export is not None:
                self.export.client_left(conn.writer)
        conn.close(disconnect)

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
                rdma.wc_failure(wc, f"client {conn.number}: message")
            self._drop(conn, disconnect=True)
            return
        if _SEND_BASE <= wc.wr_id < _SEND_BASE + self.depth:
            self._post_recv(conn, wc.wr_id - _SEND_BASE)  # reply sent: buffer free again
            return
        if not _RECV_BASE <= wc.wr_id < _RECV_BASE + self.depth:
            raise TransportError(f"completion for unknown work request {wc.wr_id}")
        slot = wc.wr_id - _RECV_BASE
        start = slot * MAX_MESSAGE_SIZE
        raw = bytes(conn.bufs.view[start:start + min(wc.byte_len, MAX_MESSAGE_SIZE)])
        commit = Commit.decode(raw, self.export.size)  # ProtocolError drops the client
        reply = self.export.commit(commit).encode()
        conn.commits += 1
        out = (self.depth + slot) * MAX_MESSAGE_SIZE
        conn.bufs.view[out:out + len(reply)] = reply
        conn.ep.post(_SEND_BASE + slot, e.IBV_WR_SEND, conn.bufs.addr + out, len(reply),
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
        if self.mr is not None:
            with contextlib.suppress(rdma.PyverbsError):
                self.mr.close()
        if self.device is not None:
            self.device.close()
        if self.listener is not None:
            with contextlib.suppress(rdma.PyverbsError):
                self.listener.close()
        if self.events is not None:
            self.events.close()
