"""RDMA primitives shared by the target and the client: pyverbs, with non-blocking event handling.

pyverbs holds the GIL in every blocking call (``CMEvent(...)``, ``get_cq_event``, ...) and does not
expose the file descriptors of its event channels. So we never call a blocking pyverbs function:

- The file descriptor of each CM event channel and completion channel is found when it is
  created, as the one new descriptor in ``/proc/self/fd`` whose link names the channel's kind
  (``/dev/infiniband/rdma_cm``, ``anon_inode:[infinibandevent]``). It is set ``O_NONBLOCK``.
  A device context has such a descriptor too (its async events), and librdmacm opens and
  closes contexts inside CM calls (reading an ADDR_RESOLVED event, destroying the last id on a
  device): every pyverbs call that may open or close one runs under ``FD_TABLE``, the lock
  the search holds, so that another thread's channel never looks like ours.
- Waits are ``select()`` calls on those descriptors with a deadline; ``select`` releases the GIL,
  so other nbdkit threads run meanwhile. After the descriptor is readable, the pyverbs call
  returns at once (or fails with EAGAIN, which we treat as "nothing yet").

QPs are *external*: created by us on our own Context and PD and moved to RTS with
``CMID.init_qp_attr``. pyverbs' CMID shares its Context/PD objects between a listener and its
children and invalidates them when a child closes, so we never use those objects for verbs.

pyverbs 44's ``SGE``, ``SendWR`` and ``RecvWR`` never free their C memory by themselves (their
destructor is misspelt ``__dealloc``), so every one made here is closed explicitly once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .errors import ConnectionLost, TransportError
from .resource import Closeable

log = logging.getLogger(__name__)

try:
    # Re-exported (``as``) for the target and the verbs transport.
    import pyverbs.cm_enums as ce
    import pyverbs.enums as e
    from pyverbs.cmid import CMID as CMID
    from pyverbs.cmid import AddrInfo as AddrInfo
    from pyverbs.cmid import CMEvent, CMEventChannel
    from pyverbs.cmid import ConnParam as ConnParam
    from pyverbs.cq import CQ, CompChannel
    from pyverbs.device import Context
    from pyverbs.mr import MR as MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsError as PyverbsError
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.qp import QP, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR

    HAVE_PYVERBS = True
except ImportError:  # pragma: no cover - exercised on hosts without python3-pyverbs
    HAVE_PYVERBS = False

PYVERBS_MISSING = (
    "pyverbs is not importable: install the Debian package python3-pyverbs and run pmemblk "
    "with /usr/bin/python3 (or a venv made from it with --system-site-packages)"
)

__all__ = [
    "CMID", "FD_TABLE", "MR", "AddrInfo", "ConnParam", "Device", "Endpoint", "EventChannel",
    "PyverbsError", "RegisteredBuffer", "active_rdma_devices", "ce", "e", "event_name",
    "iter_cm_events", "new_cmid", "rdma_devices", "rdma_error", "require_pyverbs", "wc_failure",
]

T = TypeVar("T")
#: Held around every pyverbs call that may open or close an RDMA descriptor (see above).
FD_TABLE = threading.RLock()
CM_CHANNEL_LINK = "/dev/infiniband/rdma_cm"
COMP_CHANNEL_LINK = "anon_inode:[infinibandevent]"


def require_pyverbs() -> None:
    if not HAVE_PYVERBS:
        raise TransportError(PYVERBS_MISSING)


def rdma_devices() -> list[str]:
    """Names of the RDMA devices on this host (empty when there are none or no pyverbs)."""
    if not HAVE_PYVERBS:
        return []
    from pyverbs.device import get_device_list

    try:
        return [d.name.decode() for d in get_device_list()]
    except PyverbsError:
        return []


def active_rdma_devices() -> list[str]:
    """RDMA devices with at least one port in the ACTIVE state."""
    active = []
    for name in rdma_devices():
        try:
            with FD_TABLE, Context(name=name) as ctx:
                ports = int(ctx.query_device().phys_port_cnt)
                if any(int(ctx.query_port(p).state) == e.IBV_PORT_ACTIVE
                       for p in range(1, ports + 1)):
                    active.append(name)
        except PyverbsError:
            continue
    return active


def _fd_links() -> dict[int, str]:
    links = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return links


def open_with_fd(factory: Callable[[], T], link: str, what: str) -> tuple[T, int]:
    """Create a pyverbs channel object and find the file descriptor it opened."""
    with FD_TABLE:
        before = _fd_links()
        obj = factory()
        after = _fd_links()
    new = [fd for fd, target in after.items() if target == link and before.get(fd) != target]
    if len(new) != 1:
        close = getattr(obj, "close", None)
        if close is not None:
            close()
        raise TransportError(
            f"cannot find the file descriptor of the new {what} (found {len(new)} new "
            f"descriptors linking to {link}); pmemblk needs it for deadlines"
        )
    fd = new[0]
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return obj, fd


def _would_block(exc: Exception) -> bool:
    code = getattr(exc, "error_code", None)
    return code in (errno.EAGAIN, errno.EWOULDBLOCK)


def rdma_error(what: str, exc: Exception) -> TransportError:
    code = getattr(exc, "error_code", None)
    detail = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
    err = TransportError(f"{what}: {detail}")
    if isinstance(code, int) and code > 0:
        err.errno = code
    return err


class EventChannel(Closeable):
    """An RDMA CM event channel whose events are read without blocking."""

    def __init__(self) -> None:
        require_pyverbs()
        try:
            self.channel, self.fd = open_with_fd(CMEventChannel, CM_CHANNEL_LINK,
                                                 "CM event channel")
        except PyverbsRDMAError as exc:
            if getattr(exc, "error_code", None) == errno.ENODEV:
                raise TransportError(
                    "no RDMA CM device on this host (/dev/infiniband/rdma_cm is missing): load "
                    "an RDMA driver (for Soft-RoCE: modprobe rdma_rxe; rdma link add rxe0 type "
                    "rxe netdev IFACE) or use a host with an RDMA NIC"
                ) from None
            raise rdma_error("creating an RDMA CM event channel failed", exc) from None
        self._closed = False

    def get(self, timeout: float | None = 0.0) -> Any | None:
        """The next CM event, or None if none arrives within ``timeout`` seconds.

        The caller must ``ack_cm_event()`` it (after reading its private data).
        """
        if timeout is None or timeout > 0:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
        try:
            with FD_TABLE:  # librdmacm may open the device while reading ADDR_RESOLVED
                return CMEvent(self.channel)
        except PyverbsRDMAError as exc:
            if _would_block(exc):
                return None
            raise rdma_error("reading a CM event failed", exc) from None

    def wait_for(self, expected: int, deadline: float, what: str) -> tuple[int, bytes]:
        """Wait for one event; return (type, private data). Anything else than ``expected``
        is returned too, so that the caller can report it (REJECTED, UNREACHABLE, ...)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLost(f"timed out waiting for {what}")
            event = self.get(remaining)
            if event is None:
                continue
            try:
                etype = int(event.event_type)
                data = bytes(event.private_data) if etype in _PRIVATE_DATA_EVENTS else b""
                name = event.event_str()
            finally:
                event.ack_cm_event()
            log.debug("CM event %s while waiting for %s", name, what)
            if etype != expected:
                log.debug("unexpected CM event %s (wanted %d)", name, expected)
            return etype, data

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with FD_TABLE:
            self.channel.close()


_PRIVATE_DATA_EVENTS: frozenset[int] = frozenset()
if HAVE_PYVERBS:
    _PRIVATE_DATA_EVENTS = frozenset(
        {
            ce.RDMA_CM_EVENT_CONNECT_REQUEST,
            ce.RDMA_CM_EVENT_CONNECT_RESPONSE,
            ce.RDMA_CM_EVENT_ESTABLISHED,
            ce.RDMA_CM_EVENT_REJECTED,
        }
    )


def event_name(etype: int) -> str:
    if HAVE_PYVERBS:
        for name in dir(ce):
            if name.startswith("RDMA_CM_EVENT_") and getattr(ce, name) == etype:
                return name[len("RDMA_CM_EVENT_"):]
    return str(etype)


class RegisteredBuffer(Closeable):
    """Anonymous memory registered once for local access; sliced by offset, never re-registered."""

    def __init__(self, pd: Any, size: int, access: int | None = None) -> None:
        self.size = size
        self._mm = mmap.mmap(-1, size)
        self._anchor = ctypes.c_char.from_buffer(self._mm)
        self.addr = ctypes.addressof(self._anchor)
        self.view = memoryview(self._mm)
        try:
            self.mr = MR(pd, size, e.IBV_ACCESS_LOCAL_WRITE if access is None else access,
                         address=self.addr)
        except PyverbsRDMAError as exc:
            self._release()
            raise rdma_error(f"registering a {size}-byte buffer failed", exc) from None
        self.lkey = int(self.mr.lkey)
        self._closed = False

    def _release(self) -> None:
        self.view.release()
        del self._anchor
        self._mm.close()

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.mr.close()
        self._release()


WC_STATUS_NAMES: dict[int, str] = {}
OPCODE_NAMES: dict[int, str] = {}
if HAVE_PYVERBS:
    WC_STATUS_NAMES = {
        getattr(e, n): n[len("IBV_WC_"):]
        for n in dir(e)
        if (n.startswith("IBV_WC_") and n.endswith("_ERR")) or n == "IBV_WC_SUCCESS"
    }
    OPCODE_NAMES = {e.IBV_WR_RDMA_WRITE: "RDMA_WRITE", e.IBV_WR_RDMA_READ: "RDMA_READ",
                    e.IBV_WR_SEND: "SEND"}


class Endpoint(Closeable):
    """One RC queue pair with its own CQ and completion channel (so its own descriptor)."""

    def __init__(self, ctx: Any, pd: Any, send_depth: int, recv_depth: int) -> None:
        require_pyverbs()
        self._closed = False
        self.channel, self.fd = open_with_fd(lambda: CompChannel(ctx), COMP_CHANNEL_LINK,
                                             "completion channel")
        self.cq: Any = None
        self.qp: Any = None
        try:
            self.cq = CQ(ctx, send_depth + recv_depth + 1, None, self.channel, 0)
            self.cq.req_notify()
            cap = QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=1,
                        max_recv_sge=1)
            attr = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap,
                              sq_sig_all=0)
            self.qp = QP(pd, attr)
        except PyverbsError as exc:
            self.close()
            raise rdma_error("creating a queue pair failed", exc) from None
        self.qp_num = int(self.qp.qp_num)

    def connect_qp(self, cmid: Any) -> None:
        """Move the external QP to RTS with the attributes the CM negotiated."""
        try:
            for state in (e.IBV_QPS_INIT, e.IBV_QPS_RTR, e.IBV_QPS_RTS):
                attr, mask = cmid.init_qp_attr(state)
                self.qp.modify(attr, mask)
        except PyverbsError as exc:
            raise rdma_error("moving the queue pair to RTS failed", exc) from None

    # -- posting ---------------------------------------------------------------------------

    def post(self, wr_id: int, opcode: int, addr: int, length: int, lkey: int,
             remote_addr: int = 0, rkey: int = 0) -> None:
        """Post one signaled send-queue work request (RDMA WRITE/READ or SEND)."""
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
            if not _would_block(exc):
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
    """A failed completion as an error, logged once with every field that matters."""
    status = WC_STATUS_NAMES.get(wc.status, str(wc.status))
    msg = (f"{what} failed: completion status {status} (vendor error 0x{wc.vendor_err:x}); "
           f"remote address 0x{remote_addr:x}, rkey 0x{rkey:x}, length {length}")
    log.error("%s", msg)
    if HAVE_PYVERBS and wc.status == e.IBV_WC_WR_FLUSH_ERR:
        return ConnectionLost(msg)
    return TransportError(msg)


def iter_cm_events(events: EventChannel) -> Iterator[tuple[int, bytes, Any]]:
    """Drain pending CM events without blocking: (type, private data, event) — the caller acks."""
    while True:
        event = events.get(0.0)
        if event is None:
            return
        etype = int(event.event_type)
        data = bytes(event.private_data) if etype in _PRIVATE_DATA_EVENTS else b""
        yield etype, data, event


def new_cmid(events: EventChannel) -> Any:
    try:
        with FD_TABLE:
            return CMID(creator=events.channel, port_space=ce.RDMA_PS_TCP)
    except PyverbsError as exc:
        raise rdma_error("creating an RDMA CM id failed", exc) from None


class Device(Closeable):
    """Our own Context and PD on a named RDMA device (never the CMID's shared ones)."""

    def __init__(self, name: str) -> None:
        require_pyverbs()
        self.name = name
        self._closed = False
        try:
            with FD_TABLE:
                self.ctx = Context(name=name)
        except PyverbsError as exc:
            raise rdma_error(f"opening RDMA device {name} failed", exc) from None
        try:
            self.pd = PD(self.ctx)
            attr = self.ctx.query_device()
        except PyverbsError as exc:
            self.ctx.close()
            raise rdma_error(f"setting up RDMA device {name} failed", exc) from None
        #: RDMA READs one side may have outstanding (and the other accept).
        self.rd_atom = max(1, min(16, int(attr.max_qp_rd_atom), int(attr.max_qp_init_rd_atom)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(PyverbsError):
            self.pd.close()
        with FD_TABLE, contextlib.suppress(PyverbsError):
            self.ctx.close()
