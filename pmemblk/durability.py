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
- **native IBTA FLUSH** (``QPEx.wr_flush``) needs rdma-core 45 and Linux 6.2; it is probed
  and reported, and not used.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import FLUSH_GPSPM, FLUSH_METHODS


@dataclass(frozen=True)
class Guarantee:
    method: str
    persistent: bool
    why: str

    def describe(self) -> str:
        return f"{self.method}: {'persistent' if self.persistent else 'visibility only'} " \
               f"({self.why})"


def guarantees(is_pmem: bool, persist_method: str, apm_durable: bool) -> list[Guarantee]:
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
    return [gpspm, apm]


def durable_mask(items: list[Guarantee]) -> int:
    return sum(FLUSH_METHODS[g.method] for g in items if g.persistent)


def choose(offered: int, durable: int, wanted: str, allow_visibility_only: bool
           ) -> tuple[str, bool]:
    """The flush method to use, and whether it is persistent; raises ValueError to refuse.

    ``wanted`` is auto, apm or gpspm. auto takes apm where it is persistent (no target CPU),
    otherwise gpspm.
    """
    if wanted == "auto":
        for method in ("apm", "gpspm"):
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
    """A sentence on the native IBTA FLUSH verb on this host."""
    try:
        from pyverbs.qp import QPEx
    except ImportError:
        return "native IBTA FLUSH: not available (pyverbs is not importable)"
    if hasattr(QPEx, "wr_flush"):
        return "native IBTA FLUSH: pyverbs has QPEx.wr_flush, but pmemblk does not use it yet"
    return ("native IBTA FLUSH: not available (needs rdma-core 45 and Linux 6.2; this pyverbs "
            "has no QPEx.wr_flush)")

