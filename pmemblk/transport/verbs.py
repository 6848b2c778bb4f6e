"""The client's RDMA transport: one connection, one-sided READ/WRITE through a pre-registered pool.

Buffer layout (one registration per connection, made at connect time)::

    [ slot 0 | ... | slot depth-1 | zero chunk | send message | receive message | atomics ]

The atomics area holds one 8-byte word per slot: a compare-and-swap in flight takes a slot and
its old value lands in that slot's word.

Each data slot is ``chunk_size`` bytes. A request is split into chunks and pipelined with up to
``depth`` work requests in flight, each in its own slot; a slot is reused only after its
completion. The zero chunk is never written, so every in-flight zeroing WRITE may share it.
A connection is one thread's channel (``pmemblk.client``): requests on it never overlap, so the
pool is never shared between two requests.

Every work request posted is recorded in one in-flight table and every completion is taken by
one drain (``VerbsTransport._drain``) that checks its status and its id; each verb is its
posting plus that one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from .. import rdma
from ..address import TCPAddress, resolve_ip
from ..auth import ClientHandshake
from ..endpoint import Endpoint, wc_failure
from ..errors import ConfigError, ConnectionLost, ProtocolError, TransportError
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
from ..rdma import Device, EventChannel, RegisteredBuffer, event_name, require_pyverbs
from . import ConnectOptions, Persist, PersistStep, TransportBase, check_commit_reply, refused

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 8
#: (export offset, length, data to write or None, buffer to read into or None)
Segment = tuple[int, int, "memoryview | None", "memoryview | None"]
DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0

# What a work request in flight is: the first field of its record in ``_inflight``, and the
# name a failure of it is reported under.
_WRITE, _READ, _BARRIER, _FLUSH, _SEND, _RECV, _CAS, _ATOMIC_WRITE = range(8)
_WHAT = ("RDMA WRITE", "RDMA READ", "barrier RDMA READ", "native FLUSH", "SEND", "RECV",
         "compare-and-swap", "ATOMIC WRITE")
#: A work request in flight: (what, remote address or 0, length, pool slot or -1, where a
#: READ's data goes or None).
_Request = tuple[int, int, int, int, "memoryview | None"]


def connect(options: ConnectOptions) -> VerbsTransport:
    """``REGISTRY``'s verbs: RDMA CM needs the target's IP address (``HOST:PORT``)."""
    if not isinstance(options.address, TCPAddress):
        raise ConfigError("RDMA needs target=HOST:PORT, not a unix: socket")
    return VerbsTransport(options.address.rdma_ip("target"), options.address.port,
                          readonly=options.readonly, timeout=options.timeout,
                          depth=options.depth or DEFAULT_DEPTH,
                          chunk_size=options.chunk_size or DEFAULT_CHUNK_SIZE,
                          secret=options.secret, client_id=options.client_id,
                          identity=options.identity)


class _Step(PersistStep):
    """A FUA step over RDMA: how it is posted behind the writes, on the same queue pair (which
    orders it after them), so that one drain waits for the whole; a COMMIT's request id, or 0."""

    def __init__(self, name: str,
                 post: Callable[[VerbsTransport, Endpoint, RegisteredBuffer,
                                 list[tuple[int, int]]], int]) -> None:
        super().__init__(name)
        self.post = post


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
        self._barrier = False  # posted, not yet waited for
        self._inflight: dict[int, _Request] = {}  # every work request posted, by wr_id
        self._free = list(range(depth))  # the pool's free slots (data, and atomics words)
        self._slot_item = [0] * depth  # the compare-and-swap each atomics word answers
        self._found: list[int] = []  # the values the compare-and-swaps found
        self._answer: bytes | None = None  # the message received
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
        raw = self._exchange(hs.answer(challenge).encode())
        if message_type(raw) == MSG_REJECT:
            raise refused(self.peer, Reject.decode(raw))
        self.info = self._usable_here(hs.check(Welcome.decode(raw)))
        #: The FLUSH verb, where both ends can post it on this connection (flush=native).
        self.flush_step = (_Step("flush", VerbsTransport._flush_step)
                           if self.info.flush_methods & FLUSH_NATIVE else None)
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

    # -- the post-and-wait engine ----------------------------------------------------------
    #
    # Every work request posted is recorded in one table, ``_inflight`` (wr_id: what it is,
    # remote address, length, pool slot or -1, buffer a READ lands in), and every completion
    # goes through one drain, ``_drain``, which checks its status and its id, once, and does
    # what the completion of that kind of request does (copy a READ out, free its slot, keep
    # a compare-and-swap's old value or a received message). A verb is its posting plus one
    # ``_drain``; the table and the pool are the connection's, allocated at connect time.

    def _wr_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _usable(self) -> tuple[Endpoint, RegisteredBuffer]:
        self._check_usable()
        if self._inflight:  # a request was interrupted (not by an error, which breaks it)
            raise self._fail(TransportError(
                f"{len(self._inflight)} work requests of an interrupted request are still in "
                "flight: the connection is out of step"))
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

    def _drain(self, ep: Endpoint, keep: int = 0) -> None:
        """Take completions until at most ``keep`` work requests are in flight, each wait
        bounded by the timeout (and ended by the target's leaving). A completion that failed
        or that answers no work request in flight is an error, raised, not logged: whoever
        decides what it means (reconnect, fail the request) says so, once. The caller marks
        the connection broken."""
        inflight, free = self._inflight, self._free
        assert self.buffers is not None
        view, chunk = self.buffers.view, self.chunk_size
        while len(inflight) > keep:
            for wc in ep.wait(time.monotonic() + self.timeout, self.events, self._on_cm_event):
                wr = inflight.pop(wc.wr_id, None)
                if wr is None:
                    raise TransportError(f"completion for unknown work request {wc.wr_id}")
                kind, remote, length, slot, dst = wr
                if wc.status != rdma.e.IBV_WC_SUCCESS:
                    raise wc_failure(wc, _WHAT[kind], remote,
                                          self.info.rkey if remote else 0, length)
                if dst is not None:  # an RDMA READ's data, out of its slot
                    dst[:] = view[slot * chunk:slot * chunk + length]
                elif kind == _CAS:
                    at = self._atomic_off + 8 * slot
                    self._found[self._slot_item[slot]] = int.from_bytes(view[at:at + 8],
                                                                        "little")
                elif kind == _RECV:
                    self._answer = bytes(view[self._recv_off:self._recv_off + wc.byte_len])
                if slot >= 0:
                    free.append(slot)

    def _slot(self, ep: Endpoint) -> int:
        """A free slot of the pool, once a completion has freed one if need be."""
        while not self._free:
            self._drain(ep, len(self._inflight) - 1)
        return self._free.pop()

    def _post_barrier(self, ep: Endpoint, bufs: RegisteredBuffer, offset: int) -> None:
        """A small READ at ``offset``: it cannot complete before this queue pair's earlier
        writes are placed."""
        n = min(8, self.info.export_size - offset)
        remote = self.info.remote_addr + offset
        wr_id = self._wr_id()
        ep.post(wr_id, rdma.e.IBV_WR_RDMA_READ, bufs.addr + self._recv_off, n, bufs.lkey,
                remote, self.info.rkey)
        self._inflight[wr_id] = (_BARRIER, remote, n, -1, None)

    def _post_flushes(self, ep: Endpoint, ranges: list[tuple[int, int]], limit: int) -> None:
        """One FLUSH per range (executed after this queue pair's writes), with at most
        ``limit`` work requests in flight."""
        persistent = self._flush_persistent
        base, rkey, inflight = self.info.remote_addr, self.info.rkey, self._inflight
        for off, n in ranges:
            if len(inflight) >= limit:
                self._drain(ep, limit - 1)
            wr_id = self._wr_id()
            ep.post_flush(wr_id, base + off, n, rkey, persistent)
            inflight[wr_id] = (_FLUSH, base + off, n, -1, None)

    def _post_message(self, ep: Endpoint, bufs: RegisteredBuffer, msg: bytes) -> None:
        """A receive for the answer, then the SEND of ``msg``."""
        recv_id, send_id = self._wr_id(), self._wr_id()
        self._answer = None
        ep.post_recv(recv_id, bufs.addr + self._recv_off, MAX_MESSAGE_SIZE, bufs.lkey)
        self._inflight[recv_id] = (_RECV, 0, MAX_MESSAGE_SIZE, -1, None)
        bufs.view[self._send_off:self._send_off + len(msg)] = msg
        ep.post(send_id, rdma.e.IBV_WR_SEND, bufs.addr + self._send_off, len(msg), bufs.lkey)
        self._inflight[send_id] = (_SEND, 0, len(msg), -1, None)

    def _take_answer(self) -> bytes:
        answer, self._answer = self._answer, None
        assert answer is not None, "drained without the answer's receive"
        return answer

    # -- the verbs -------------------------------------------------------------------------

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
        chunk, lkey, addr, view = self.chunk_size, bufs.lkey, bufs.addr, bufs.view
        base, rkey, inflight, free = (self.info.remote_addr, self.info.rkey, self._inflight,
                                      self._free)
        kind = _READ if opcode == rdma.e.IBV_WR_RDMA_READ else _WRITE
        try:
            for off, length, src, dst in segments:
                for pos in range(0, length, chunk):
                    n = min(chunk, length - pos)
                    slot = free.pop() if free else self._slot(ep)
                    if src is None and dst is None:  # zeroes: the shared zero chunk
                        laddr = addr + self._zero_off
                    else:
                        laddr = addr + slot * chunk
                        if src is not None:
                            view[slot * chunk:slot * chunk + n] = src[pos:pos + n]
                    wr_id = self._wr_id()
                    ep.post(wr_id, opcode, laddr, n, lkey, base + off + pos, rkey)
                    inflight[wr_id] = (kind, base + off + pos, n, slot,
                                       None if dst is None else dst[pos:pos + n])
            request_id = 0
            if persist is not None:  # behind the last chunk, before waiting: one wait
                assert isinstance(persist, _Step), f"{persist!r} is not an RDMA step"
                request_id = persist.post(self, ep, bufs,
                                          [(off, n) for off, n, _, _ in segments])
            self._drain(ep)
            if request_id:  # a bad status: RemoteError
                check_commit_reply(self._take_answer(), request_id, len(segments))
        except (TransportError, ProtocolError) as exc:
            raise self._fail(exc) from None

    def _barrier_step(self, ep: Endpoint, bufs: RegisteredBuffer,
                      ranges: list[tuple[int, int]]) -> int:
        self._post_barrier(ep, bufs, ranges[0][0])
        return 0

    def _commit_step(self, ep: Endpoint, bufs: RegisteredBuffer,
                     ranges: list[tuple[int, int]]) -> int:
        request_id = self._wr_id()
        self._post_message(ep, bufs, Commit(request_id, tuple(ranges)).encode())
        return request_id

    def _flush_step(self, ep: Endpoint, bufs: RegisteredBuffer,
                    ranges: list[tuple[int, int]]) -> int:
        self._post_flushes(ep, ranges, self._send_depth)  # as the send queue has room
        return 0

    barrier_step: PersistStep = _Step("barrier", _barrier_step)
    commit_step: PersistStep = _Step("commit", _commit_step)
    #: Made at connect where both ends can post the FLUSH verb (flush=native).
    flush_step: PersistStep | None = None

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
    kind = "verbs"
    tls = False  # one-sided RDMA: the host cannot encrypt it (docs/security.md)

    def read_barrier(self, offset: int) -> None:
        self.start_barrier(offset)
        self.finish_barrier()

    def start_barrier(self, offset: int) -> None:
        ep, bufs = self._usable()
        try:
            self._post_barrier(ep, bufs, offset)
        except TransportError as exc:
            raise self._fail(exc) from None
        self._barrier = True

    def finish_barrier(self) -> None:
        self._check_usable()  # the barrier is in flight: not _usable()
        assert self._barrier, "finish_barrier without start_barrier"
        assert self.ep is not None
        self._barrier = False
        try:
            self._drain(self.ep)
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
        try:
            self._post_flushes(ep, ranges, self.depth)
            self._drain(ep)
        except TransportError as exc:
            raise self._fail(exc) from None

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
        # (remote address, expected, new), each word checked before anything is posted
        todo = [(self._check_word(offset, f"an {what}"), expected, new)
                for offset, expected, new in items]
        found = self._found = [0] * len(items)
        rkey, inflight = self.info.rkey, self._inflight
        try:
            for i, (remote, expected, new) in enumerate(todo):
                slot = self._slot(ep)  # its word of the atomics area
                wr_id = self._wr_id()
                if store:
                    ep.post_atomic_write(wr_id, remote, rkey, new.to_bytes(8, "little"))
                    inflight[wr_id] = (_ATOMIC_WRITE, remote, 8, slot, None)
                else:
                    ep.post_compare_swap(wr_id, bufs.addr + self._atomic_off + 8 * slot,
                                         bufs.lkey, remote, rkey, expected, new)
                    self._slot_item[slot] = i
                    inflight[wr_id] = (_CAS, remote, 8, slot, None)
            self._drain(ep)
        except TransportError as exc:
            raise self._fail(exc) from None
        return found

    def _exchange(self, msg: bytes) -> bytes:
        """SEND ``msg`` and return the message the target answers with."""
        ep, bufs = self._usable()
        self._post_message(ep, bufs, msg)
        self._drain(ep)
        return self._take_answer()

    def _request_id(self) -> int:
        return self._wr_id()

    def _commit_exchange(self, message: bytes) -> bytes:
        return self._exchange(message)

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
