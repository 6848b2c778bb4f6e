"""One RC queue pair with its own CQ and completion channel: what both sides post work
requests on and take completions from, without ever blocking inside pyverbs (``pmemblk.rdma``
has the primitives: descriptors found and made non-blocking, event channels, buffers, the
native verbs a device offers). ``wc_failure`` turns a failed completion into one error that
names its work request."""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable
from typing import Any

from .errors import ConnectionLost, TransportError
from .rdma import (
    COMP_CHANNEL_LINK,
    FD_TABLE,
    HAVE_PYVERBS,
    OPCODE_NAMES,
    WC_STATUS_NAMES,
    EventChannel,
    Native,
    PyverbsError,
    e,
    open_with_fd,
    rdma_error,
    require_pyverbs,
    would_block,
)
from .resource import Closeable

try:
    from pyverbs.cq import CQ, CompChannel
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.qp import QP, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR
except ImportError:  # pragma: no cover - require_pyverbs() says so when one is made
    pass


class Endpoint(Closeable):
    """One RC queue pair with its own CQ and completion channel (so its own descriptor).

    With ``native`` verbs to post, the QP is an extended one (``QPEx``) created with those
    send operations, and every send-queue work request goes through the ``ibv_wr_*`` API
    (never mixed with ``ibv_post_send`` on one QP); otherwise it is a plain QP.
    """

    def __init__(self, ctx: Any, pd: Any, send_depth: int, recv_depth: int,
                 native: Native | None = None) -> None:
        require_pyverbs()
        self._closed = False
        self.native = native if native is not None and native.any else Native()
        self.channel, self.fd = open_with_fd(lambda: CompChannel(ctx), COMP_CHANNEL_LINK,
                                             "completion channel", CompChannel)
        self.cq: Any = None
        self.qp: Any = None
        try:
            self.cq = CQ(ctx, send_depth + recv_depth + 1, None, self.channel, 0)
            self.cq.req_notify()
            cap = QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=1,
                        max_recv_sge=1)
            if self.native.any:
                from pyverbs.qp import QPEx, QPInitAttrEx

                ops = (e.IBV_QP_EX_WITH_RDMA_WRITE | e.IBV_QP_EX_WITH_RDMA_READ
                       | e.IBV_QP_EX_WITH_SEND | e.IBV_QP_EX_WITH_ATOMIC_CMP_AND_SWP)
                if self.native.flush_global or self.native.flush_persistent:
                    ops |= e.IBV_QP_EX_WITH_FLUSH
                if self.native.atomic_write:
                    ops |= e.IBV_QP_EX_WITH_ATOMIC_WRITE
                attr_ex = QPInitAttrEx(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap,
                                       pd=pd, sq_sig_all=0, send_ops_flags=ops,
                                       comp_mask=e.IBV_QP_INIT_ATTR_PD
                                       | e.IBV_QP_INIT_ATTR_SEND_OPS_FLAGS)
                self.qp = QPEx(ctx, attr_ex)
            else:
                attr = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap,
                                  sq_sig_all=0)
                self.qp = QP(pd, attr)
        except PyverbsError as exc:
            self.close()
            raise rdma_error("creating a queue pair failed", exc) from None
        self.qp_num = int(self.qp.qp_num)

    def connect_qp(self, cmid: Any, access: int = 0) -> None:
        """Move the external QP to RTS with the attributes the CM negotiated, plus the
        remote ``access`` flags given (a responder's FLUSH flags: the CM never sets them)."""
        try:
            for state in (e.IBV_QPS_INIT, e.IBV_QPS_RTR, e.IBV_QPS_RTS):
                attr, mask = cmid.init_qp_attr(state)
                if state == e.IBV_QPS_INIT and access:
                    attr.qp_access_flags = int(attr.qp_access_flags) | access
                self.qp.modify(attr, mask)
        except PyverbsError as exc:
            raise rdma_error("moving the queue pair to RTS failed", exc) from None

    # -- posting ---------------------------------------------------------------------------

    def post(self, wr_id: int, opcode: int, addr: int, length: int, lkey: int,
             remote_addr: int = 0, rkey: int = 0) -> None:
        """Post one signaled send-queue work request (RDMA WRITE/READ or SEND)."""
        if self.native.any:
            self._post_ex(wr_id, opcode, addr, length, lkey, remote_addr, rkey)
            return
        sge = SGE(addr, length, lkey)
        try:
            wr = SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[sge],
                        send_flags=e.IBV_SEND_SIGNALED)
            try:
                if opcode != e.IBV_WR_SEND:
                    wr.set_wr_rdma(rkey, remote_addr)
                self.qp.post_send(wr)
            finally:
                wr.close()
        except PyverbsError as exc:
            raise rdma_error(
                f"posting {OPCODE_NAMES.get(opcode, opcode)} of {length} bytes "
                f"(remote 0x{remote_addr:x}, rkey 0x{rkey:x}) failed", exc
            ) from None
        finally:
            sge.close()

    def _post_ex(self, wr_id: int, opcode: int, addr: int, length: int, lkey: int,
                 remote_addr: int, rkey: int, *, persistent: bool = True,
                 value: bytes = b"", compare: int = 0, swap: int = 0) -> None:
        """Post through the extended QP's ``ibv_wr_*`` API (one work request)."""
        qp = self.qp
        try:
            qp.wr_start()
            try:
                qp.wr_id = wr_id
                qp.wr_flags = e.IBV_SEND_SIGNALED
                if opcode == e.IBV_WR_RDMA_WRITE:
                    qp.wr_rdma_write(rkey, remote_addr)
                elif opcode == e.IBV_WR_RDMA_READ:
                    qp.wr_rdma_read(rkey, remote_addr)
                elif opcode == e.IBV_WR_SEND:
                    qp.wr_send()
                elif opcode == e.IBV_WR_FLUSH:
                    qp.wr_flush(rkey, remote_addr, length,
                                e.IBV_FLUSH_PERSISTENT if persistent else e.IBV_FLUSH_GLOBAL,
                                e.IBV_FLUSH_RANGE)
                elif opcode == e.IBV_WR_ATOMIC_WRITE:
                    qp.wr_atomic_write(rkey, remote_addr, value)
                elif opcode == e.IBV_WR_ATOMIC_CMP_AND_SWP:
                    qp.wr_atomic_cmp_swp(rkey, remote_addr, compare, swap)
                else:
                    raise TransportError(f"cannot post opcode {opcode}")
                if opcode in (e.IBV_WR_RDMA_WRITE, e.IBV_WR_RDMA_READ, e.IBV_WR_SEND,
                              e.IBV_WR_ATOMIC_CMP_AND_SWP):
                    sge = SGE(addr, length, lkey)
                    try:
                        qp.wr_set_sge(sge)
                    finally:
                        sge.close()
            except BaseException:
                qp.wr_abort()
                raise
            qp.wr_complete()
        except PyverbsError as exc:
            raise rdma_error(
                f"posting {OPCODE_NAMES.get(opcode, opcode)} of {length} bytes "
                f"(remote 0x{remote_addr:x}, rkey 0x{rkey:x}) failed", exc
            ) from None

    def post_flush(self, wr_id: int, remote_addr: int, length: int, rkey: int,
                   persistent: bool) -> None:
        """Post one signaled native FLUSH of a range (PERSISTENT, or GLOBAL: visibility)."""
        if not (self.native.flush_persistent if persistent else self.native.flush_global):
            raise TransportError("this queue pair cannot post that FLUSH")
        self._post_ex(wr_id, e.IBV_WR_FLUSH, 0, length, 0, remote_addr, rkey,
                      persistent=persistent)

    def post_atomic_write(self, wr_id: int, remote_addr: int, rkey: int, value: bytes) -> None:
        """Post one signaled 8-byte ATOMIC WRITE."""
        if not self.native.atomic_write or len(value) != 8:
            raise TransportError("this queue pair cannot post that ATOMIC WRITE")
        self._post_ex(wr_id, e.IBV_WR_ATOMIC_WRITE, 0, 8, 0, remote_addr, rkey, value=value)

    def post_compare_swap(self, wr_id: int, addr: int, lkey: int, remote_addr: int, rkey: int,
                          compare: int, swap: int) -> None:
        """Post one signaled 8-byte compare-and-swap; the old value lands at ``addr``."""
        if self.native.any:
            self._post_ex(wr_id, e.IBV_WR_ATOMIC_CMP_AND_SWP, addr, 8, lkey, remote_addr, rkey,
                          compare=compare, swap=swap)
            return
        sge = SGE(addr, 8, lkey)
        try:
            wr = SendWR(wr_id=wr_id, opcode=e.IBV_WR_ATOMIC_CMP_AND_SWP, num_sge=1, sg=[sge],
                        send_flags=e.IBV_SEND_SIGNALED)
            try:
                wr.set_wr_atomic(rkey, remote_addr, compare, swap)
                self.qp.post_send(wr)
            finally:
                wr.close()
        except PyverbsError as exc:
            raise rdma_error(f"posting a compare-and-swap (remote 0x{remote_addr:x}, rkey "
                             f"0x{rkey:x}) failed", exc) from None
        finally:
            sge.close()

    def post_recv(self, wr_id: int, addr: int, length: int, lkey: int) -> None:
        sge = SGE(addr, length, lkey)
        try:
            wr = RecvWR(wr_id=wr_id, num_sge=1, sg=[sge])
            try:
                self.qp.post_recv(wr)
            finally:
                wr.close()
        except PyverbsError as exc:
            raise rdma_error("posting a receive failed", exc) from None
        finally:
            sge.close()

    # -- completions -----------------------------------------------------------------------

    def poll(self, max_entries: int = 32) -> list[Any]:
        try:
            _, wcs = self.cq.poll(max_entries)
        except PyverbsError as exc:
            raise rdma_error("polling the completion queue failed", exc) from None
        return list(wcs)

    def consume_events(self) -> None:
        """Read the completion event that made the descriptor readable, and re-arm the CQ.
        One event only: reading until EAGAIN would raise and catch a pyverbs exception on
        every wait, which costs more than the wait itself under emulation; another pending
        event keeps the descriptor readable and is read on the next wait."""
        try:
            self.channel.get_cq_event(self.cq)
        except PyverbsRDMAError as exc:
            if not would_block(exc):
                raise rdma_error("reading a completion event failed", exc) from None
        else:
            self.cq.ack_events(1)
        self.cq.req_notify()

    def wait(self, deadline: float, watch: EventChannel | None = None,
             on_cm_event: Callable[[], None] | None = None) -> list[Any]:
        """Completions, waiting until ``deadline`` (monotonic) at most.

        If ``watch`` is given, its descriptor is watched too and ``on_cm_event`` is called when
        it is readable (it raises ConnectionLost when the peer left).
        """
        while True:
            wcs = self.poll()
            if wcs:
                return wcs
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLost("no completion before the deadline: the peer is not answering")
            fds = [self.fd] if watch is None else [self.fd, watch.fd]
            ready, _, _ = select.select(fds, [], [], remaining)
            if self.fd in ready:
                self.consume_events()
            if watch is not None and watch.fd in ready and on_cm_event is not None:
                # Completions that arrived before the peer left come first (a REJECT is sent
                # just before the target disconnects); the CM event stays pending (the fd is
                # level-triggered) and is handled once the queue is empty.
                wcs = self.poll()
                if wcs:
                    return wcs
                on_cm_event()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with FD_TABLE:
            for obj in (self.qp, self.cq, self.channel):
                if obj is not None:
                    with contextlib.suppress(PyverbsError):
                        obj.close()


def wc_failure(wc: Any, what: str, remote_addr: int = 0, rkey: int = 0, length: int = 0
               ) -> TransportError:
    """A failed completion as an error naming every field of its work request that matters
    (librpma's way). Not logged here: whoever decides what the failure means (the client:
    reconnect or fail the request; the target: drop the client) logs it, once."""
    status = WC_STATUS_NAMES.get(wc.status, str(wc.status))
    msg = (f"{what} failed: completion status {status} (vendor error 0x{wc.vendor_err:x}); "
           f"remote address 0x{remote_addr:x}, rkey 0x{rkey:x}, length {length}")
    if HAVE_PYVERBS and wc.status == e.IBV_WC_WR_FLUSH_ERR:
        return ConnectionLost(msg)
    return TransportError(msg)
