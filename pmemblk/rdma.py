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
from dataclasses import dataclass
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
    from pyverbs.device import Context
    from pyverbs.mr import MR as MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsError as PyverbsError
    from pyverbs.pyverbs_error import PyverbsRDMAError

    HAVE_PYVERBS = True
except ImportError:  # pragma: no cover - exercised on hosts without python3-pyverbs
    HAVE_PYVERBS = False

PYVERBS_MISSING = (
    "pyverbs is not importable: install the Debian package python3-pyverbs and run pmemblk "
    "with /usr/bin/python3 (or a venv made from it with --system-site-packages)"
)

__all__ = [
    "CMID", "FD_TABLE", "MR", "AddrInfo", "ConnParam", "Device", "EventChannel",
    "Native", "PyverbsError", "RegisteredBuffer", "active_rdma_devices", "ce", "e",
    "event_name", "flush_access", "flush_flags", "iter_cm_events", "native_from_caps",
    "new_cmid", "probe_native", "rdma_devices", "rdma_error", "require_pyverbs",
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


def open_with_fd(factory: Callable[[], T], link: str, what: str,
                 kind: type | None = None) -> tuple[T, int]:
    """Create a pyverbs channel object (of class ``kind``) and find the file descriptor it
    opened: its ``fd`` attribute where pyverbs has one (``CompChannel.fd`` from rdma-core 57;
    44 and 56 have none), else the one new descriptor of that kind in ``/proc/self/fd`` (only
    then is that searched, twice)."""
    has_fd = hasattr(kind if kind is not None else factory, "fd")
    with FD_TABLE:  # held either way: a search in another thread must not see ours
        before = {} if has_fd else _fd_links()
        obj = factory()
        after = {} if has_fd else _fd_links()
    own = getattr(obj, "fd", None)
    if isinstance(own, int) and own >= 0:
        fcntl.fcntl(own, fcntl.F_SETFL, fcntl.fcntl(own, fcntl.F_GETFL) | os.O_NONBLOCK)
        return obj, own
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


def would_block(exc: Exception) -> bool:
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
            if would_block(exc):
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
    for _name in ("FLUSH", "ATOMIC_WRITE"):
        if hasattr(e, f"IBV_WR_{_name}"):
            OPCODE_NAMES[getattr(e, f"IBV_WR_{_name}")] = _name


# -- native IBTA 1.5 verbs: FLUSH and ATOMIC WRITE -------------------------------------------

#: ``device_cap_flags_ex`` bits (verbs.h: IB_UVERBS_DEVICE_FLUSH_GLOBAL, ..._PERSISTENT,
#: ..._ATOMIC_WRITE); pyverbs has no names for them.
DEVICE_FLUSH_GLOBAL = 1 << 38
DEVICE_FLUSH_PERSISTENT = 1 << 39
DEVICE_ATOMIC_WRITE = 1 << 40
#: What this pyverbs can post: QPEx.wr_flush arrived in rdma-core 45, wr_atomic_write in 44.
PYVERBS_FLUSH = HAVE_PYVERBS and hasattr(e, "IBV_QP_EX_WITH_FLUSH") and hasattr(
    e, "IBV_ACCESS_FLUSH_PERSISTENT")
PYVERBS_ATOMIC_WRITE = HAVE_PYVERBS and hasattr(e, "IBV_QP_EX_WITH_ATOMIC_WRITE")


@dataclass(frozen=True)
class Native:
    """The native verbs a device offers and this pyverbs can post."""

    flush_global: bool = False
    flush_persistent: bool = False
    atomic_write: bool = False

    @property
    def any(self) -> bool:
        return self.flush_global or self.flush_persistent or self.atomic_write

    def describe(self) -> str:
        names = [n for n, on in (("FLUSH_GLOBAL", self.flush_global),
                                 ("FLUSH_PERSISTENT", self.flush_persistent),
                                 ("ATOMIC_WRITE", self.atomic_write)) if on]
        return ", ".join(names) if names else "none"


def probe_native(ctx: Any) -> tuple[Native, str]:
    """The device's native verbs, and a sentence on why any are missing."""
    if not PYVERBS_FLUSH and not PYVERBS_ATOMIC_WRITE:
        return Native(), "this pyverbs has neither (FLUSH needs rdma-core 45, ATOMIC WRITE 44)"
    try:
        flags = int(ctx.query_device_ex().device_cap_flags_ex)
    except (PyverbsError, AttributeError) as exc:
        return Native(), f"the device's extended capabilities cannot be read ({exc})"
    return native_from_caps(flags, PYVERBS_FLUSH, PYVERBS_ATOMIC_WRITE)


def native_from_caps(flags: int, can_flush: bool, can_atomic_write: bool) -> tuple[Native, str]:
    """The native verbs of a device whose ``device_cap_flags_ex`` are ``flags``, less those
    this pyverbs cannot post (``can_*``), and a sentence on why any are missing."""
    native = Native(can_flush and bool(flags & DEVICE_FLUSH_GLOBAL),
                    can_flush and bool(flags & DEVICE_FLUSH_PERSISTENT),
                    can_atomic_write and bool(flags & DEVICE_ATOMIC_WRITE))
    if native.any:
        return native, "offered by the device"
    if flags & (DEVICE_FLUSH_GLOBAL | DEVICE_FLUSH_PERSISTENT) and not can_flush:
        return native, "the device has FLUSH, this pyverbs cannot post it (rdma-core < 45)"
    return native, ("the device does not offer them (Soft-RoCE has them from Linux 6.2; "
                    "hardware varies)")


def flush_access(pd: Any, addr: int, length: int, persistent: bool = True
                 ) -> tuple[str | None, str]:
    """The FLUSH the kernel lets this memory be registered for ("persistent", "global" or
    None, and why), found by registering ``[addr, addr+length)`` (a page is enough: the kind
    of memory decides): FLUSH_PERSISTENT only on memory the kernel calls persistent (an
    NVDIMM, not ``memmap=`` "legacy" pmem, never DRAM), and tried only if ``persistent``
    (the device has it); FLUSH_GLOBAL on any memory."""
    if not PYVERBS_FLUSH:
        return None, "this pyverbs cannot register for FLUSH (rdma-core < 45)"
    base = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
    tried = [] if persistent else ["FLUSH_PERSISTENT: the device does not offer it"]
    for kind in ("persistent", "global")[0 if persistent else 1:]:
        try:
            MR(pd, length, base | flush_flags(kind), address=addr).close()
        except PyverbsError as exc:
            tried.append(f"FLUSH_{kind.upper()}: {rdma_error('registering', exc)}")
            continue
        if kind == "persistent":
            return kind, "the kernel calls this memory persistent"
        return kind, f"not persistent memory to the kernel ({tried[0]})"
    return None, "; ".join(tried)


def flush_flags(kind: str | None) -> int:
    """The MR access flags for a native FLUSH of ``kind`` ("persistent", "global", None)."""
    if kind is None or not PYVERBS_FLUSH:
        return 0
    if kind == "persistent":
        return int(e.IBV_ACCESS_FLUSH_PERSISTENT | e.IBV_ACCESS_FLUSH_GLOBAL)
    return int(e.IBV_ACCESS_FLUSH_GLOBAL)


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
        #: The native IBTA 1.5 verbs it offers (FLUSH, ATOMIC WRITE), and why not others.
        self.native, self.native_why = probe_native(self.ctx)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(PyverbsError):
            self.pd.close()
        with FD_TABLE, contextlib.suppress(PyverbsError):
            self.ctx.close()
