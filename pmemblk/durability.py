"""What each flush method guarantees on a given region: persistence, or only visibility.

docs/persistence.md is the long form; this module is what the code does, and the target states
it to every client in its WELCOME (``durable_methods``).

- **gpspm** is persistent everywhere: the target calls ``pmem_persist`` (real pmem) or
  ``pmem_msync`` (anything else) before it replies.
- **apm** (an RDMA READ after the writes, or over TCP a READ after the writes) proves only that
  the writes reached the target's memory. That is persistence only when the memory is real pmem
  *and* the platform puts incoming writes in the persistence domain (ADR with DDIO off, or eADR).
  No software can see that; the operator asserts it with ``pmemblk serve --apm-durable``.
  On a plain file it is page cache: it survives the target process, not a power cut.
- **native** (the IBTA 1.5 FLUSH verb, ``QPEx.wr_flush``; rdma-core 45 and Linux 6.2 for
  Soft-RoCE) asks the target's RDMA device to make a range persistent, without the target's
  CPU. FLUSH_PERSISTENT is persistence, and the kernel allows it only on memory it calls
  persistent (an NVDIMM namespace; not ``memmap=`` "legacy" pmem, never DRAM or a file):
  the target finds that out by registering the region with it. FLUSH_GLOBAL alone is
  visibility, like apm on non-pmem. Offered over RDMA only, where both devices have the verb.

None of them is persistence on volatile memory (a devdax device made from soft-reserved, CXL
RAM or kmem-onlined memory: pmemblk.memkind asks sysfs): there every method is visibility only,
and a client's flush=auto refuses unless allow-visibility-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .memkind import MemoryKind
from .protocol import FLUSH_APM, FLUSH_GPSPM, FLUSH_METHODS, FLUSH_NATIVE


@dataclass(frozen=True)
class Guarantee:
    method: str
    persistent: bool
    why: str

    def describe(self) -> str:
        return f"{self.method}: {'persistent' if self.persistent else 'visibility only'} " \
               f"({self.why})"


@dataclass(frozen=True)
class NativeOffer:
    """What the target's RDMA device and region allow of the native verbs (probed at start)."""

    #: "persistent" (FLUSH_PERSISTENT and FLUSH_GLOBAL), "global" (FLUSH_GLOBAL) or None.
    flush: str | None
    atomic_write: bool
    why: str

    def guarantee(self) -> Guarantee | None:
        if self.flush == "persistent":
            return Guarantee("native", True, f"the RDMA device's FLUSH_PERSISTENT; {self.why}")
        if self.flush == "global":
            return Guarantee("native", False, f"FLUSH_GLOBAL only (visibility): {self.why}")
        return None

    def describe(self) -> str:
        flush = {"persistent": "FLUSH_PERSISTENT and FLUSH_GLOBAL", "global": "FLUSH_GLOBAL",
                 None: "no FLUSH"}[self.flush]
        atomic = "ATOMIC_WRITE" if self.atomic_write else "no ATOMIC_WRITE"
        return f"native verbs: {flush}, {atomic} ({self.why})"


#: What registering the region for FLUSH found: "persistent", "global" or None, and why.
Registration = tuple[str | None, str]


def native_offer(flush_global: bool, flush_persistent: bool, atomic_write: bool,
                 device_why: str, readonly: bool,
                 register: Callable[[bool], Registration]) -> NativeOffer:
    """What the target offers of the native verbs, from its probe: the device's capabilities
    (``flush_*``, ``atomic_write``; ``device_why`` says why any are missing) and, when the
    device has a FLUSH, what the kernel lets the region be registered with (``register``,
    told whether to try FLUSH_PERSISTENT). FLUSH is persistent only when the device *and* the
    memory both allow FLUSH_PERSISTENT; a read-only export is offered nothing."""
    if readonly:
        return NativeOffer(None, False, "the export is read-only")
    if not (flush_global or flush_persistent):
        return NativeOffer(None, atomic_write, device_why)
    registered, why = register(flush_persistent)
    if registered == "persistent" and not flush_persistent:
        registered, why = "global", "the device offers FLUSH_GLOBAL only"
    return NativeOffer(registered, atomic_write, why)


def guarantees(is_pmem: bool, persist_method: str, apm_durable: bool,
               native: NativeOffer | None = None, memory: MemoryKind | None = None
               ) -> list[Guarantee]:
    """What each flush method gives on a region. ``memory`` is what the kernel says the
    region's memory is (pmemblk.memkind): volatile memory makes every method visibility only,
    whatever libpmem's ``is_pmem`` says (it says 1 for every devdax device)."""
    if memory is not None and not memory.persistent:
        why = f"the memory is {memory.kind}: {memory.why}"
        extra = native.guarantee() if native is not None else None
        return [Guarantee(g, False, why)
                for g in ["gpspm", "apm"] + (["native"] if extra is not None else [])]
    gpspm = Guarantee("gpspm", True, f"the target calls {persist_method} before it replies")
    if is_pmem and apm_durable:
        apm = Guarantee("apm", True, "real pmem, and the operator asserted with --apm-durable "
                        "that incoming writes reach the persistence domain")
    elif is_pmem:
        apm = Guarantee("apm", False, "real pmem, but writes may wait in CPU caches (DDIO); "
                        "--apm-durable asserts a platform where they cannot")
    else:
        apm = Guarantee("apm", False, "not pmem: the data is in the page cache until msync; it "
                        "survives the target process, not a power cut")
    extra = native.guarantee() if native is not None else None
    return [gpspm, apm] + ([extra] if extra is not None else [])


def durable_mask(items: list[Guarantee]) -> int:
    return sum(FLUSH_METHODS[g.method] for g in items if g.persistent)


@dataclass(frozen=True)
class Declared:
    """What a WELCOME declares of flushing and ATOMIC WRITE to one connection."""

    flush_methods: int
    durable_methods: int
    atomic_write: bool


def declare(durable: int, offer: NativeOffer | None, native: bool, readonly: bool
            ) -> Declared:
    """The flush methods offered to a connection, those that give persistence, and whether it
    may post ATOMIC WRITE. ``durable``: the region's own (``durable_mask`` without native);
    ``native``: the connection's rkey allows the native verbs ``offer`` found (RDMA). Native
    FLUSH is durable only if the probe found FLUSH_PERSISTENT; FLUSH_GLOBAL is visibility."""
    methods = FLUSH_APM | FLUSH_GPSPM
    atomic_write = False
    if native and offer is not None and not readonly:
        if offer.flush is not None:
            methods |= FLUSH_NATIVE
            durable |= FLUSH_NATIVE if offer.flush == "persistent" else 0
        atomic_write = offer.atomic_write
    return Declared(methods, durable & methods, atomic_write)


def choose(offered: int, durable: int, wanted: str, allow_visibility_only: bool
           ) -> tuple[str, bool]:
    """The flush method to use, and whether it is persistent; raises ValueError to refuse.

    ``wanted`` is auto, native, apm or gpspm. auto takes the first that is persistent of
    native (the device persists, no target CPU, no READ), apm (no target CPU) and gpspm.
    """
    if wanted == "auto":
        for method in ("native", "apm", "gpspm"):
            bit = FLUSH_METHODS[method]
            if offered & bit and durable & bit:
                return method, True
        if not allow_visibility_only:
            raise ValueError("the target offers no flush method that gives persistence")
        return ("gpspm" if offered & FLUSH_GPSPM else "apm"), False
    bit = FLUSH_METHODS[wanted]
    if not offered & bit:
        raise ValueError(f"the target does not offer flush method {wanted}")
    if durable & bit:
        return wanted, True
    if allow_visibility_only:
        return wanted, False
    raise ValueError(
        f"flush={wanted} gives only visibility on this target: an acknowledged FLUSH would "
        "not survive a power cut. Use flush=auto or flush=gpspm, or accept visibility only "
        "with allow-visibility-only=true (see docs/persistence.md)")


def native_flush_support() -> str:
    """A sentence on the native verbs this host's pyverbs can post (the devices are probed
    when connecting and serving)."""
    try:
        from . import rdma
    except ImportError:  # pragma: no cover (rdma imports without pyverbs)
        return "native verbs: not available"
    if not rdma.HAVE_PYVERBS:
        return "native verbs: not available (pyverbs is not importable)"
    have = [n for n, ok in (("FLUSH", rdma.PYVERBS_FLUSH),
                            ("ATOMIC WRITE", rdma.PYVERBS_ATOMIC_WRITE)) if ok]
    if not rdma.PYVERBS_FLUSH:
        return (f"native verbs: this pyverbs posts {' and '.join(have) or 'neither'}; FLUSH "
                "needs rdma-core 45 (and, for Soft-RoCE, Linux 6.2): flush=native is not "
                "available")
    return ("native verbs: this pyverbs posts FLUSH and ATOMIC WRITE; each connection uses "
            "them where both RDMA devices offer them (serve logs what its device and region "
            "allow; flush=native is durable only on memory the kernel calls persistent)")
