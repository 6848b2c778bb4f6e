"""The target: owns a region, registers its data area once, and stays passive.

Event handling (docs/design.md has the reasoning): one thread, one ``select()`` over

- the RDMA CM event channel (connect requests, disconnects),
- one completion channel per client (COMMIT messages and our replies),
- a self-pipe that SIGTERM/SIGINT write to.

No pyverbs call here ever blocks. pyverbs does not say which connection a CM event belongs to,
so on any event that ends a connection (DISCONNECTED, CONNECT_ERROR, ...) the target asks the
CM for each connection's RTS attributes: the kernel refuses that (EINVAL) for a connection that
has left the established state, and exactly those connections are torn down.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass
from typing import Any

from . import layout
from .errors import ConfigError, PmemblkError, PmemError, ProtocolError, TransportError
from .pmem import PmemRegion, is_devdax
from .protocol import (
    FLUSH_APM,
    FLUSH_GPSPM,
    MAX_MESSAGE_SIZE,
    REGION_IS_PMEM,
    REGION_READONLY,
    Commit,
    CommitReply,
    Hello,
    Reject,
    Welcome,
)
from .transport import rdma
from .transport.rdma import Device, Endpoint, EventChannel, RegisteredBuffer, event_name
from .transport.verbs import resolve_ip

log = logging.getLogger(__name__)

#: COMMIT messages one client may have outstanding (receive buffers posted per connection).
COMMIT_DEPTH = 8
_RECV_BASE = 1 << 32
_SEND_BASE = 2 << 32


@dataclass(frozen=True)
class ServeConfig:
    path: str
    host: str
    port: int
    readonly: bool = False
    max_clients: int = 64
    pid_file: str | None = None


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 192.0.2.1:7000")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"--listen {value!r}: port {port_s!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"--listen {value!r}: port {port} is outside 1..65535")
    return host, port


class Connection:
    """One client: its CM id, queue pair and message buffers."""

    def __init__(self, number: int, cmid: Any, ep: Endpoint, bufs: RegisteredBuffer) -> None:
        self.number = number
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


class Target:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.region: PmemRegion | None = None
        self.header: layout.Header | None = None
        self.events: EventChannel | None = None
        self.listener: Any = None
        self.device: Device | None = None
        self.mr: Any = None
        self.conns: dict[int, Connection] = {}
        self._by_fd: dict[int, Connection] = {}
        self._number = 0
        self._ip = ""
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- start-up --------------------------------------------------------------------------

    def open_region(self) -> None:
        cfg = self.config
        region = PmemRegion.open(cfg.path)
        self.region = region
        try:
            self.header = layout.read_header(region)
        except PmemblkError as exc:
            raise PmemblkError(
                f"{cfg.path} holds no valid pmemblk region: {exc}. Create one with: "
                f"pmemblk create {cfg.path} --size SIZE (this erases what the file holds)"
            ) from None
        state = layout.read_state(region)
        if not state.clean:
            log.warning(
                "%s was not shut down cleanly (the target crashed or was killed): data the "
                "clients flushed is intact; writes they never flushed may be lost", cfg.path)
        if not cfg.readonly:
            layout.write_state(region, layout.State(clean=False,
                                                    times_served=state.times_served + 1))

    def _register_region(self, device: Device) -> None:
        assert self.region is not None and self.header is not None
        e = rdma.e
        access = e.IBV_ACCESS_REMOTE_READ
        if not self.config.readonly:
            access |= e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        addr = self.region.addr + self.header.data_offset
        started = time.monotonic()
        try:
            self.mr = rdma.MR(device.pd, self.header.data_size, access, address=addr)
        except rdma.PyverbsError as exc:
            if self.region.is_pmem and not is_devdax(self.region.path):
                raise PmemError(
                    f"{self.region.path} is a file on a DAX filesystem (fsdax), and the kernel "
                    "refuses to pin fsdax pages for RDMA (ibv_reg_mr: "
                    f"{rdma.rdma_error('', exc).args[0].lstrip(': ')}). Use a devdax namespace "
                    "(ndctl create-namespace -m devdax) or a file on a non-DAX filesystem."
                ) from None
            raise rdma.rdma_error(
                f"registering the {self.header.data_size}-byte data area of "
                f"{self.region.path} for RDMA failed", exc) from None
        log.info("registered %d bytes in %.0f ms (rkey 0x%x)", self.header.data_size,
                 (time.monotonic() - started) * 1000, self.mr.rkey)

    def listen(self) -> None:
        cfg = self.config
        ip = self._ip
        self.events = EventChannel()
        self.listener = rdma.new_cmid(self.events)
        try:
            ai = rdma.AddrInfo(src=ip, src_service=str(cfg.port),
                               port_space=rdma.ce.RDMA_PS_TCP, flags=rdma.ce.RAI_PASSIVE)
            self.listener.bind_addr(ai)
        except rdma.PyverbsError as exc:
            raise rdma.rdma_error(
                f"cannot listen on {ip}:{cfg.port} (is an RDMA device bound to the interface "
                "that has this address?)", exc) from None
        self.device = Device(self.listener.dev_name)
        self._register_region(self.device)
        try:
            self.listener.listen(16)
        except rdma.PyverbsError as exc:
            raise rdma.rdma_error(f"listen on {ip}:{cfg.port} failed", exc) from None
        assert self.region is not None and self.header is not None
        log.info(
            "serving %s (%d bytes, block size %d, uuid %s, is_pmem=%d, persistence by %s%s) "
            "on %s:%d via %s", cfg.path, self.header.data_size, self.header.block_size,
            self.header.uuid, int(self.region.is_pmem), self.region.persist_method,
            ", read-only" if cfg.readonly else "", ip, cfg.port, self.device.name)

    # -- the loop --------------------------------------------------------------------------

    def request_stop(self, signum: int = 0) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; then persist everything and mark the region clean."""
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, lambda signum, frame: self.request_stop(signum))
        try:
            self._ip = resolve_ip(self.config.host, "--listen")
            self.open_region()
            self.listen()
            if self.config.pid_file:
                with open(self.config.pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
            assert self.events is not None
            self._sel.register(self.events.fd, selectors.EVENT_READ, "cm")
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stop:
                for key, _ in self._sel.select(timeout=None):
                    if key.data == "cm":
                        self._on_cm_events()
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 64)
                    else:
                        conn = self._by_fd.get(key.fd)
                        if conn is not None:
                            self._on_completions(conn)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            self.shutdown()

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
                self._stop = True
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

    def _reject(self, child: Any, err: int, reason: str) -> None:
        log.warning("refusing a client: %s", reason)
        with contextlib.suppress(rdma.PyverbsError):
            child.reject(Reject(err, reason).encode())
        with contextlib.suppress(rdma.PyverbsError):
            child.close()

    def _on_connect_request(self, child: Any, data: bytes) -> None:
        assert self.device is not None and self.header is not None and self.region is not None
        try:
            hello = Hello.decode(data)
        except ProtocolError as exc:
            self._reject(child, errno.EPROTO, f"bad HELLO: {exc}")
            return
        if len(self.conns) >= self.config.max_clients:
            self._reject(child, errno.EBUSY,
                         f"the target already serves {self.config.max_clients} clients")
            return
        self._number += 1
        try:
            ep = Endpoint(self.device.ctx, self.device.pd, send_depth=COMMIT_DEPTH,
                          recv_depth=COMMIT_DEPTH)
        except TransportError as exc:
            self._reject(child, errno.ENOMEM, f"cannot create a queue pair: {exc}")
            return
        try:
            bufs = RegisteredBuffer(self.device.pd, 2 * COMMIT_DEPTH * MAX_MESSAGE_SIZE)
        except TransportError as exc:
            ep.close()
            self._reject(child, errno.ENOMEM, f"cannot register message buffers: {exc}")
            return
        conn = Connection(self._number, child, ep, bufs)
        flags = (REGION_IS_PMEM if self.region.is_pmem else 0) | (
            REGION_READONLY if self.config.readonly else 0)
        welcome = Welcome(
            export_size=self.header.data_size, block_size=self.header.block_size,
            region_flags=flags, flush_methods=FLUSH_APM | FLUSH_GPSPM, rkey=int(self.mr.rkey),
            remote_addr=self.region.addr + self.header.data_offset,
            region_uuid=self.header.uuid, max_message_size=MAX_MESSAGE_SIZE,
            commit_depth=COMMIT_DEPTH,
        ).encode()
        try:
            ep.connect_qp(child)
            for slot in range(COMMIT_DEPTH):
                ep.post_recv(_RECV_BASE + slot, bufs.addr + slot * MAX_MESSAGE_SIZE,
                             MAX_MESSAGE_SIZE, bufs.lkey)
            rd = self.device.rd_atom
            param = rdma.ConnParam(resources=rd, depth=rd, retry=7, rnr_retry=7,
                                   qp_num=ep.qp_num, data_len=len(welcome))
            param.set_private_data(welcome)
            child.accept(param)
        except (TransportError, rdma.PyverbsError) as exc:
            log.warning("accepting client %d failed: %s", conn.number, exc)
            conn.close(disconnect=False)
            return
        self.conns[conn.number] = conn
        self._by_fd[ep.fd] = conn
        self._sel.register(ep.fd, selectors.EVENT_READ, "conn")
        log.info("client %d connected (%s, %d clients)", conn.number,
                 "read-only" if hello.readonly or self.config.readonly else "read-write",
                 len(self.conns))

    def _drop(self, conn: Connection, disconnect: bool) -> None:
        self.conns.pop(conn.number, None)
        if self._by_fd.pop(conn.ep.fd, None) is not None:
            self._sel.unregister(conn.ep.fd)
        conn.close(disconnect)

    def _on_completions(self, conn: Connection) -> None:
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

    def _on_completion(self, conn: Connection, wc: Any) -> None:
        e = rdma.e
        if wc.status != e.IBV_WC_SUCCESS:
            if wc.status == e.IBV_WC_WR_FLUSH_ERR:
                log.info("client %d: queue pair flushed: the client left", conn.number)
            else:
                rdma.wc_failure(wc, f"client {conn.number}: message")
            self._drop(conn, disconnect=True)
            return
        if _SEND_BASE <= wc.wr_id < _SEND_BASE + COMMIT_DEPTH:
            slot = wc.wr_id - _SEND_BASE  # reply sent: its receive buffer may take the next one
            conn.ep.post_recv(_RECV_BASE + slot, conn.bufs.addr + slot * MAX_MESSAGE_SIZE,
                              MAX_MESSAGE_SIZE, conn.bufs.lkey)
            return
        if not _RECV_BASE <= wc.wr_id < _RECV_BASE + COMMIT_DEPTH:
            raise TransportError(f"completion for unknown work request {wc.wr_id}")
        slot = wc.wr_id - _RECV_BASE
        start = slot * MAX_MESSAGE_SIZE
        raw = bytes(conn.bufs.view[start:start + min(wc.byte_len, MAX_MESSAGE_SIZE)])
        assert self.header is not None
        commit = Commit.decode(raw, self.header.data_size)  # ProtocolError drops the client
        status = self._persist(commit)
        conn.commits += 1
        reply = CommitReply(commit.request_id, status).encode()
        out = (COMMIT_DEPTH + slot) * MAX_MESSAGE_SIZE
        conn.bufs.view[out:out + len(reply)] = reply
        conn.ep.post(_SEND_BASE + slot, e.IBV_WR_SEND, conn.bufs.addr + out, len(reply),
                     conn.bufs.lkey)

    def _persist(self, commit: Commit) -> int:
        assert self.region is not None and self.header is not None
        if self.config.readonly:
            return 0  # nothing can have been written
        try:
            for off, length in commit.ranges:
                self.region.persist(self.header.data_offset + off, length)
        except PmemError as exc:
            log.error("persisting for a COMMIT failed: %s", exc)
            return errno.EIO
        return 0

    # -- shutdown --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Disconnect everyone, persist the whole data area, mark the region clean."""
        for conn in list(self.conns.values()):
            self._drop(conn, disconnect=True)
        if self.mr is not None:
            with contextlib.suppress(rdma.PyverbsError):
                self.mr.close()
            self.mr = None
        if self.device is not None:
            self.device.close()
            self.device = None
        if self.listener is not None:
            with contextlib.suppress(rdma.PyverbsError):
                self.listener.close()
            self.listener = None
        if self.events is not None:
            self.events.close()
            self.events = None
        if self.region is not None:
            region, header = self.region, self.header
            self.region = None
            try:
                if header is not None and not self.config.readonly:
                    region.persist(header.data_offset, header.data_size)
                    state = layout.read_state(region)
                    layout.write_state(region, layout.State(True, state.times_served))
                    log.info("persisted %d bytes and marked %s clean", header.data_size,
                             region.path)
            finally:
                region.close()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.config.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(self.config.pid_file)


def serve(config: ServeConfig) -> None:
    Target(config).run()
