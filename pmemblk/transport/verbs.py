"""The client's RDMA transport: one connection, one-sided READ/WRITE through a pre-registered pool.

Buffer layout (one registration per connection, made at connect time)::

    [ slot 0 | ... | slot depth-1 | zero chunk | send message | receive message | atomics ]

The atomics area holds one 8-byte word per compare-and-swap in flight (``depth`` of them).

Each data slot is ``chunk_size`` bytes. A request is split into chunks and pipelined with up to
``depth`` work requests in flight, each in its own slot; a slot is reused only after its
completion. The zero chunk is never written, so every in-flight zeroing WRITE may share it.
A connection is one thread's channel (``pmemblk.client``): requests on it never overlap, so the
pool is never shared between two requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any

from .. import rdma
from ..address import resolve_ip
from ..auth import ClientHandshake
from ..errors import ConnectionLost, ProtocolError, TransportError
from ..protocol import (
    FLUSH_NATIVE,
    MAX_MESSAGE_SIZE,
    MSG_REJECT,
    REGION_ATOMIC_WRITE,
    Challenge,
    Commit,
    Reject,
    Welcome,
    message_type,
)
from ..rdma import Device, Endpoint, EventChannel, RegisteredBuffer, event_name, require_pyverbs
from . import Persist, TransportBase, check_commit_reply, refused

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 8
#: (export offset, length, data to write or None, buffer to read into or None)
Segment = tuple[int, int, "memoryview | None", "memoryview | None"]
DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0

class VerbsTransport(TransportBase):
    """A connection to a pmemblk target over RDMA (RC QP, RDMA CM)."""

    def __init__(self, host: str, port: int, *, readonly: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, depth: int = DEFAULT_DEPTH,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, secret: bytes | None = None,
                 client_id: bytes | None = None, identity: str = "") -> None:
        require_pyverbs()
        self.peer = f"{host}:{port}"
        self.timeout = timeout
        self.depth = depth
        self.chunk_size = chunk_size
        self._broken: str | None = None
        self._next_id = 1
        self._closed = False
        self._barrier: tuple[int, int, int] | None = None  # posted, not yet waited for
        self.cmid: Any = None
        self.device: Device | None = None
        self.buffers: RegisteredBuffer | None = None
        self.ep: Endpoint | None = None
        self.events = EventChannel()
        try:
            self._connect(resolve_ip(host, "target"), port,
                          ClientHandshake(self.peer, secret, readonly, client_id, identity))
        except BaseException:
            self.close()
            raise

    # -- connection ------------------------------------------------------------------------

    def _connect(self, ip: str, port: int, hs: ClientHandshake) -> None:
        ce = rdma.ce
        deadline = time.monotonic() + CONNECT_TIMEOUT
        ms = int(CONNECT_TIMEOUT * 1000)
        self.cmid = rdma.new_cmid(self.events)
        try:
            ai = rdma.AddrInfo(dst=ip, dst_service=str(port), port_space=ce.RDMA_PS_TCP)
            self.cmid.resolve_addr(ai, ms)
        except rdma.PyverbsError as exc:
            raise rdma.rdma_error(f"resolving {self.peer} to an RDMA device failed", exc) from None
        etype, _ = self.events.wait_for(ce.RDMA_CM_EVENT_ADDR_RESOLVED, deadline, "address")
        if etype != ce.RDMA_CM_EVENT_ADDR_RESOLVED:
            raise TransportError(
                f"cannot reach {self.peer} through an RDMA device ({event_name(etype)}): is an "
                "RDMA device (e.g. rxe) bound to the interface that routes to it?"
            )
        try:
            self.cmid.resolve_route(ms)
        except rdma.PyverbsError as exc:
            raise rdma.rdma_error(f"resolving the route to {self.peer} failed", exc) from None
        etype, _ = self.events.wait_for(ce.RDMA_CM_EVENT_ROUTE_RESOLVED, deadline, "route")
        if etype != ce.RDMA_CM_EVENT_ROUTE_RESOLVED:
            raise TransportError(f"no RDMA route to {self.peer} ({event_name(etype)})")

        self.device = Device(self.cmid.dev_name)
        self._zero_off = self.depth * self.chunk_size
        self._send_off = self._zero_off + self.chunk_size
        self._recv_off = self._send_off + MAX_MESSAGE_SIZE
        self._atomic_off = self._recv_off + MAX_MESSAGE_SIZE
        self.buffers = RegisteredBuffer(self.device.pd, self._atomic_off + 8 * self.depth)
        self._send_depth = self.depth + 2  # the data slots, and a COMMIT or READ behind them
        self.ep = Endpoint(self.device.ctx, self.device.pd, send_depth=self._send_depth,
                           recv_depth=2, native=self.device.native)

        hello = hs.hello.encode()
        rd = self.device.rd_atom
        param = rdma.ConnParam(resources=rd, depth=rd, retry=7, rnr_retry=7,
                               qp_num=self.ep.qp_num, data_len=len(hello))
        param.set_private_data(hello)
        try:
            self.cmid.connect(param)
        except rdma.PyverbsError as exc:
            raise rdma.rdma_error(f"connecting to {self.peer} failed", exc) from None
        etype, data = self.events.wait_for(ce.RDMA_CM_EVENT_CONNECT_RESPONSE, deadline,
                                           "the target's answer")
        if etype == ce.RDMA_CM_EVENT_REJECTED:
            try:
                rej = Reject.decode(data)
            except ProtocolError:
                raise TransportError(
                    f"{self.peer} rejected the connection: no pmemblk target listens there"
                ) from None
            raise refused(self.peer, rej)
        if etype != ce.RDMA_CM_EVENT_CONNECT_RESPONSE:
            raise TransportError(f"connecting to {self.peer} failed: {event_name(etype)}")
        challenge = Challenge.decode(data)
        self.ep.connect_qp(self.cmid)
        try:
            self.cmid.establish()
        except rdma.PyverbsError as exc:
            raise rdma.rdma_error(f"establishing the connection to {self.peer} failed",
                                  exc) from None
        raw = self._exchange(hs.answer(challenge).encode(), "the handshake")
        if message_type(raw) == MSG_REJECT:
            raise refused(self.peer, Reject.decode(raw))
        self.info = self._usable_here(hs.check(Welcome.decode(raw)))
        if not self.info.remote_addr:
            raise ProtocolError(f"{self.peer} offered no RDMA region in its WELCOME")
        log.info(
            "connected to %s over %s: export %d bytes, block size %d, region %s, is_pmem=%d, "
            "%s", self.peer, self.device.name, self.info.export_size, self.info.block_size,
            self.info.region_uuid, int(self.info.is_pmem),
            "read-only" if self.info.readonly else "read-write",
        )

    def _usable_here(self, welcome: Welcome) -> Welcome:
        """The WELCOME less the native verbs this side's device cannot post: the client
        chooses among what both ends can do."""
        assert self.ep is not None and self.device is not None
        native = self.ep.native
        methods, durable, flags = (welcome.flush_methods, welcome.durable_methods,
                                   welcome.region_flags)
        if not (native.flush_global or native.flush_persistent):
            methods &= ~FLUSH_NATIVE
        if not native.flush_persistent:
            durable &= ~FLUSH_NATIVE
        durable &= methods
        if not native.atomic_write:
            flags &= ~REGION_ATOMIC_WRITE
        if (methods, durable, flags) != (welcome.flush_methods, welcome.durable_methods,
                                         welcome.region_flags):
            log.info("the target offers native verbs this side cannot post (%s: %s): not "
                     "using them", self.device.name, self.device.native_why)
        return dataclasses.replace(welcome, flush_methods=methods, durable_methods=durable,
                                   region_flags=flags)

    # -- helpers ---------------------------------------------------------------------------

    def _wr_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _usable(self) -> tuple[Endpoint, RegisteredBuffer]:
        self._check_usable()
        assert self.ep is not None and self.buffers is not None
        return self.ep, self.buffers

    def _on_cm_event(self) -> None:
        for etype, _, event in rdma.iter_cm_events(self.events):
            event.ack_cm_event()
            if etype in (rdma.ce.RDMA_CM_EVENT_DISCONNECTED,
                         rdma.ce.RDMA_CM_EVENT_DEVICE_REMOVAL,
                         rdma.ce.RDMA_CM_EVENT_TIMEWAIT_EXIT):
                raise ConnectionLost(f"the target {self.peer} disconnected "
                                     f"({event_name(etype)})")
            log.debug("ignoring CM event %s", event_name(etype))

    def _wait(self, ep: Endpoint) -> list[Any]:
        return ep.wait(time.monotonic() + self.timeout, self.events, self._on_cm_event)

    def _pipeline(self, opcode: int, offset: int, length: int, *, src: memoryview | None = None,
                  dst: memoryview | None = None, persist: Persist | None = None) -> None:
        """Move ``length`` bytes at export ``offset`` in chunks, ``depth`` in flight. With
        ``persist``, its step is posted right behind the last chunk, on the same queue pair
        (which orders it after the writes), and the whole is one wait: librpma's way."""
        self._transfer(opcode, [(offset, length, src, dst)], persist)

    def _transfer(self, opcode: int, segments: list[Segment],
                  persist: Persist | None = None) -> None:
        """``_pipeline`` over several segments (offset, length, source, destination), all
        posted before any is waited for, the persistence step covering every one of them."""
        ep, bufs = self._usable()
        chunk = self.chunk_size
        base, rkey = self.info.remote_addr, self.info.rkey
        free = list(range(self.depth))
        inflight: dict[int, tuple[int, int, int, memoryview | None]] = {}
        pieces = ((off + pos, min(chunk, n - pos), None if src is None else src[pos:],
                   None if dst is None else dst[pos:])
                  for off, n, src, dst in segments for pos in range(0, n, chunk))
        piece = next(pieces, None)
        name = rdma.OPCODE_NAMES.get(opcode, str(opcode))
        steps: dict[int, str] = {}  # the persistence step's work requests, until complete
        commit_id = 0
        answer: bytes | None = None
        ranges = [(off, n) for off, n, _, _ in segments]
        flushes: list[tuple[int, int]] = []  # FLUSHes to post as the send queue has room
        try:
            while piece is not None or inflight or steps or flushes:
                while piece is not None and free:
                    off, n, src, dst = piece
                    slot = free.pop()
                    if src is None and dst is None:
                        laddr = bufs.addr + self._zero_off
                    else:
                        laddr = bufs.addr + slot * chunk
                        if src is not None:
                            bufs.view[slot * chunk:slot * chunk + n] = src[:n]
                    wr_id = self._wr_id()
                    ep.post(wr_id, opcode, laddr, n, bufs.lkey, base + off, rkey)
                    inflight[wr_id] = (slot, off, n, dst)
                    piece = next(pieces, None)
                if persist is not None and piece is None and commit_id == 0:
                    # Behind the last chunk, before waiting: one wait for the whole.
                    if persist == "flush":  # one per range: as many as the queue takes
                        flushes, commit_id = list(ranges), -1
                    else:
                        commit_id = self._post_persist(ep, bufs, persist, ranges[0][0],
                                                       ranges, steps)
                while flushes and len(inflight) + len(steps) < self._send_depth:
                    off, n = flushes.pop()
                    wr_id = self._wr_id()  # the FLUSH verb: executed after this QP's writes
                    ep.post_flush(wr_id, base + off, n, rkey, self._flush_persistent)
                    steps[wr_id] = "native FLUSH (FUA)"
                for wc in self._wait(ep):
                    step = steps.pop(wc.wr_id, None)
                    if step is not None:
                        if wc.status != rdma.e.IBV_WC_SUCCESS:
                            raise rdma.wc_failure(wc, step, base + ranges[0][0], rkey)
                        if step == "COMMIT reply":
                            answer = bytes(bufs.view[self._recv_off:
                                                     self._recv_off + wc.byte_len])
                        continue
                    item = inflight.pop(wc.wr_id, None)
                    if item is None:
                        raise TransportError(f"completion for unknown work request {wc.wr_id}")
                    slot, off, n, dst = item
                    if wc.status != rdma.e.IBV_WC_SUCCESS:
                        raise rdma.wc_failure(wc, f"RDMA {name}", base + off, rkey, n)
                    if dst is not None:
                        dst[:n] = bufs.view[slot * chunk:slot * chunk + n]
                    free.append(slot)
            if persist == "commit":
                assert answer is not None
                check_commit_reply(answer, commit_id, len(ranges))  # a bad status: RemoteError
        except (TransportError, ProtocolError) as exc:
            raise self._fail(exc) from None

    def _post_persist(self, ep: Endpoint, bufs: RegisteredBuffer, persist: Persist,
                      offset: int, ranges: list[tuple[int, int]], steps: dict[int, str]) -> int:
        """Post a barrier READ (at ``offset``) or a COMMIT of ``ranges`` behind the writes;
        the COMMIT's request id (or -1)."""
        if persist == "barrier":  # a small READ: cannot complete before the writes are placed
            n = min(8, self.info.export_size - offset)
            wr_id = self._wr_id()
            ep.post(wr_id, rdma.e.IBV_WR_RDMA_READ, bufs.addr + self._recv_off, n, bufs.lkey,
                    self.info.remote_addr + offset, self.info.rkey)
            steps[wr_id] = "RDMA READ (FUA)"
            return -1
        request_id = self._wr_id()
        msg = Commit(request_id, tuple(ranges)).encode()
        recv_id, send_id = self._wr_id(), self._wr_id()
        ep.post_recv(recv_id, bufs.addr + self._recv_off, MAX_MESSAGE_SIZE, bufs.lkey)
        bufs.view[self._send_off:self._send_off + len(msg)] = msg
        ep.post(send_id, rdma.e.IBV_WR_SEND, bufs.addr + self._send_off, len(msg), bufs.lkey)
        steps[recv_id], steps[send_id] = "COMMIT reply", "COMMIT message"
        return request_id

    # -- Transport API ---------------------------------------------------------------------

    def read(self, buf: memoryview, offset: int) -> None:
        self._pipeline(rdma.e.IBV_WR_RDMA_READ, offset, len(buf), dst=buf)

    def write(self, data: memoryview, offset: int, persist: Persist | None = None) -> None:
        self._pipeline(rdma.e.IBV_WR_RDMA_WRITE, offset, len(data), src=data, persist=persist)

    def write_zeroes(self, offset: int, length: int, persist: Persist | None = None) -> None:
        self._pipeline(rdma.e.IBV_WR_RDMA_WRITE, offset, length, persist=persist)

    def write_many(self, items: list[tuple[int, memoryview]],
                   persist: Persist | None = None) -> None:
        self._transfer(rdma.e.IBV_WR_RDMA_WRITE,
                       [(off, len(data), data, None) for off, data in items], persist)

    #: An RDMA WRITE completes once the remote NIC acknowledged it, which does not order it
    #: before what arrives later on another queue pair: a barrier READ does.
    placed_on_reply = False

    def read_barrier(self, offset: int) -> None:
        self.start_barrier(offset)
        self.finish_barrier()

    def start_barrier(self, offset: int) -> None:
        ep, bufs = self._usable()
        n = min(8, self.info.export_size - offset)
        remote = self.info.remote_addr + offset
        wr_id = self._wr_id()
        try:
            ep.post(wr_id, rdma.e.IBV_WR_RDMA_READ, bufs.addr + self._recv_off, n, bufs.lkey,
                    remote, self.info.rkey)
        except TransportError as exc:
            raise self._fail(exc) from None
        self._barrier = (wr_id, remote, n)

    def finish_barrier(self) -> None:
        ep, _ = self._usable()
        assert self._barrier is not None, "finish_barrier without start_barrier"
        wr_id, remote, n = self._barrier
        self._barrier = None
        try:
            self._wait_for(ep, wr_id, "RDMA READ (flush)", remote, n)
        except TransportError as exc:
            raise self._fail(exc) from None

    @property
    def _flush_persistent(self) -> bool:
        """FLUSH_PERSISTENT where the target says native is durable, else FLUSH_GLOBAL (which
        the client uses only if the user accepted visibility only)."""
        return bool(self.info.durable_methods & FLUSH_NATIVE)

    def native_flush(self, ranges: list[tuple[int, int]]) -> None:
        """One FLUSH per range, up to ``depth`` in flight, then every one waited for."""
        ep, _ = self._usable()
        if not self.info.flush_methods & FLUSH_NATIVE:
            raise TransportError(f"{self.peer} offers no native FLUSH on this connection")
        persistent = self._flush_persistent
        todo = list(ranges)
        inflight: dict[int, tuple[int, int]] = {}
        try:
            while todo or inflight:
                while todo and len(inflight) < self.depth:
                    off, n = todo.pop()
                    wr_id = self._wr_id()
                    ep.post_flush(wr_id, self.info.remote_addr + off, n, self.info.rkey,
                                  persistent)
                    inflight[wr_id] = (off, n)
                for wc in self._wait(ep):
                    item = inflight.pop(wc.wr_id, None)
                    if item is None:
                        raise TransportError(f"completion for unknown work request {wc.wr_id}")
                    if wc.status != rdma.e.IBV_WC_SUCCESS:
                        raise rdma.wc_failure(wc, "native FLUSH", self.info.remote_addr + item[0],
                                              self.info.rkey, item[1])
        except TransportError as exc:
            raise self._fail(exc) from None

    def _wait_for(self, ep: Endpoint, wr_id: int, what: str, remote: int, length: int) -> None:
        """Wait for the one work request in flight, ``wr_id``: a failed or unknown
        completion is an error (the caller marks the connection broken)."""
        while True:
            for wc in self._wait(ep):
                if wc.status != rdma.e.IBV_WC_SUCCESS:
                    raise rdma.wc_failure(wc, what, remote, self.info.rkey, length)
                if wc.wr_id == wr_id:
                    return
                raise TransportError(f"completion for unknown work request {wc.wr_id}")

    def _check_word(self, offset: int, what: str) -> int:
        if offset % 8 or not 0 <= offset <= self.info.export_size - 8:
            raise TransportError(f"{what} is on an aligned 8-byte word inside the export, not "
                                 f"at {offset}")
        return self.info.remote_addr + offset

    def atomic_write(self, offset: int, value: bytes) -> None:
        """An 8-byte ATOMIC WRITE at export ``offset`` (8-aligned): a reader sees the old
        eight bytes or the new ones, never a mix. Where the WELCOME allows it."""
        if len(value) != 8:
            raise TransportError(f"an ATOMIC WRITE is 8 bytes, not {len(value)}")
        self.atomic_write_many([(offset, int.from_bytes(value, "little"))])

    def compare_swap(self, offset: int, expected: int, new: int) -> int:
        return self.compare_swap_many([(offset, expected, new)])[0]

    def compare_swap_many(self, items: list[tuple[int, int, int]]) -> list[int]:
        """Compare-and-swaps of (offset, expected, new), up to ``depth`` in flight; the values
        found, in order."""
        return self._atomics(items, store=False)

    def atomic_write_many(self, items: list[tuple[int, int]]) -> None:
        """ATOMIC WRITEs of (offset, 8-byte value as an integer), up to ``depth`` in flight."""
        if not self.info.atomic_write:
            raise TransportError(f"{self.peer} offers no ATOMIC WRITE on this connection")
        self._atomics([(offset, 0, value) for offset, value in items], store=True)

    def _atomics(self, items: list[tuple[int, int, int]], store: bool) -> list[int]:
        ep, bufs = self._usable()
        what = "ATOMIC WRITE" if store else "compare-and-swap"
        found = [0] * len(items)
        # (index, remote address, expected, new), each word checked before anything is posted
        todo = [(i, self._check_word(offset, f"an {what}"), expected, new)
                for i, (offset, expected, new) in enumerate(items)]
        inflight: dict[int, tuple[int, int, int]] = {}  # wr_id: item, slot, remote
        slots = list(range(self.depth))
        try:
            while todo or inflight:
                while todo and slots:
                    i, remote, expected, new = todo.pop()
                    slot = slots.pop()
                    wr_id = self._wr_id()
                    if store:
                        ep.post_atomic_write(wr_id, remote, self.info.rkey,
                                             new.to_bytes(8, "little"))
                    else:
                        ep.post_compare_swap(wr_id, bufs.addr + self._atomic_off + 8 * slot,
                                             bufs.lkey, remote, self.info.rkey, expected, new)
                    inflight[wr_id] = (i, slot, remote)
                for wc in self._wait(ep):
                    item = inflight.pop(wc.wr_id, None)
                    if item is None:
                        raise TransportError(f"completion for unknown work request {wc.wr_id}")
                    i, slot, remote = item
                    if wc.status != rdma.e.IBV_WC_SUCCESS:
                        raise rdma.wc_failure(wc, what, remote, self.info.rkey, 8)
                    at = self._atomic_off + 8 * slot
                    found[i] = int.from_bytes(bufs.view[at:at + 8], "little")
                    slots.append(slot)
        except TransportError as exc:
            raise self._fail(exc) from None
        return found

    def _exchange(self, msg: bytes, what: str) -> bytes:
        """SEND ``msg`` and return the message the target answers with."""
        ep, bufs = self._usable()
        recv_id, send_id = self._wr_id(), self._wr_id()
        answer: bytes | None = None
        ep.post_recv(recv_id, bufs.addr + self._recv_off, MAX_MESSAGE_SIZE, bufs.lkey)
        bufs.view[self._send_off:self._send_off + len(msg)] = msg
        ep.post(send_id, rdma.e.IBV_WR_SEND, bufs.addr + self._send_off, len(msg), bufs.lkey)
        sent = False
        while not (sent and answer is not None):
            for wc in self._wait(ep):
                if wc.status != rdma.e.IBV_WC_SUCCESS:
                    raise rdma.wc_failure(wc, what, length=len(msg))
                if wc.wr_id == send_id:
                    sent = True
                elif wc.wr_id == recv_id:
                    answer = bytes(bufs.view[self._recv_off:self._recv_off + wc.byte_len])
                else:
                    raise TransportError(f"completion for unknown work request {wc.wr_id}")
        return answer

    def _request_id(self) -> int:
        return self._wr_id()

    def _commit_exchange(self, message: bytes) -> bytes:
        return self._exchange(message, "COMMIT message")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.cmid is not None and self.ep is not None and self._broken is None:
            with contextlib.suppress(rdma.PyverbsError):
                self.cmid.disconnect()
        for res in (self.ep, self.buffers, self.device):
            if res is not None:
                res.close()
        if self.cmid is not None:
            with rdma.FD_TABLE, contextlib.suppress(rdma.PyverbsError):
                self.cmid.close()
        self.events.close()
