from __future__ import annotations

import os
from pathlib import Path

import pytest

from pmemblk import durability, layout
from pmemblk.pmem import PmemRegion
from pmemblk.powercut import DurableImage, power_cut
from pmemblk.protocol import FLUSH_APM, FLUSH_GPSPM, FLUSH_NATIVE

BOTH = FLUSH_APM | FLUSH_GPSPM
ALL = BOTH | FLUSH_NATIVE


def mask(is_pmem: bool, apm_durable: bool) -> int:
    return durability.durable_mask(durability.guarantees(is_pmem, "x", apm_durable))


def test_guarantee_table() -> None:
    assert mask(False, False) == FLUSH_GPSPM  # plain file: apm is page cache only
    assert mask(False, True) == FLUSH_GPSPM  # asserting ADR does not make a file pmem
    assert mask(True, False) == FLUSH_GPSPM  # pmem, but DDIO may hold the writes
    assert mask(True, True) == BOTH
    text = {g.method: g.describe() for g in durability.guarantees(False, "pmem_msync", False)}
    assert "persistent" in text["gpspm"] and "pmem_msync" in text["gpspm"]
    assert "visibility only" in text["apm"]


@pytest.mark.parametrize(
    ("offered", "durable", "wanted", "allow", "expected"),
    [
        (BOTH, BOTH, "auto", False, ("apm", True)),
        (BOTH, FLUSH_GPSPM, "auto", False, ("gpspm", True)),
        (BOTH, FLUSH_GPSPM, "gpspm", False, ("gpspm", True)),
        (BOTH, FLUSH_GPSPM, "apm", True, ("apm", False)),
        (BOTH, 0, "auto", True, ("gpspm", False)),
        # native first where it is persistent (FLUSH_PERSISTENT on kernel-persistent memory)
        (ALL, ALL, "auto", False, ("native", True)),
        (ALL, FLUSH_NATIVE | FLUSH_GPSPM, "auto", False, ("native", True)),
        (ALL, FLUSH_GPSPM, "auto", False, ("gpspm", True)),  # FLUSH_GLOBAL only: visibility
        (ALL, FLUSH_GPSPM, "native", True, ("native", False)),
        (ALL, FLUSH_NATIVE, "native", False, ("native", True)),
    ],
)
def test_choose(offered: int, durable: int, wanted: str, allow: bool,
                expected: tuple[str, bool]) -> None:
    assert durability.choose(offered, durable, wanted, allow) == expected


@pytest.mark.parametrize(
    ("offered", "durable", "wanted", "message"),
    [
        (BOTH, FLUSH_GPSPM, "apm", "gives only visibility"),
        (FLUSH_GPSPM, FLUSH_GPSPM, "apm", "does not offer"),
        (BOTH, 0, "auto", "no flush method that gives persistence"),
        (BOTH, BOTH, "native", "does not offer"),
        (ALL, FLUSH_GPSPM, "native", "gives only visibility"),
    ],
)
def test_choose_refuses(offered: int, durable: int, wanted: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        durability.choose(offered, durable, wanted, False)


def test_native_flush_is_reported_as_this_host_has_it() -> None:
    text = durability.native_flush_support()
    try:
        from pyverbs.qp import QPEx
    except ImportError:
        assert text.endswith("(pyverbs is not importable)")
        return
    if hasattr(QPEx, "wr_flush"):
        assert "this pyverbs posts FLUSH and ATOMIC WRITE" in text
    else:
        assert "FLUSH needs rdma-core 45" in text and "flush=native is not available" in text


def test_native_guarantee_follows_what_the_region_was_registered_with() -> None:
    def native(flush: str | None) -> list[durability.Guarantee]:
        offer = durability.NativeOffer(flush, True, "probed")
        return [g for g in durability.guarantees(True, "pmem_persist", False, offer)
                if g.method == "native"]

    assert [g.persistent for g in native("persistent")] == [True]
    assert [g.persistent for g in native("global")] == [False]  # visibility, like apm
    assert native(None) == []  # not offered at all
    mask = durability.durable_mask(durability.guarantees(
        True, "x", False, durability.NativeOffer("persistent", False, "probed")))
    assert mask == FLUSH_GPSPM | FLUSH_NATIVE


@pytest.fixture
def emulated(tmp_path: Path) -> tuple[str, str]:
    path, image = str(tmp_path / "r.img"), str(tmp_path / "durable.img")
    with PmemRegion.create(path, 1 << 20) as r:
        layout.format_region(r)
        DurableImage(image, r).close()
    return path, image


def test_power_cut_keeps_exactly_what_was_persisted(emulated: tuple[str, str]) -> None:
    path, image = emulated
    old = os.urandom(64 << 10)
    new = os.urandom(64 << 10)
    with PmemRegion.open(path) as r:
        img = DurableImage(image, r)
        r.write(8192, old)
        r.persist(8192, len(old))  # durable: old
        r.write(8192, new)  # never persisted
        r.write(200_000, b"P" * 100)
        r.persist(200_010, 10)  # widened to the cache line 199_936..200_064
        img.close()
    cut = power_cut(path, image, keep=0.0, seed=1)
    assert cut.kept_words == 0 and cut.unpersisted_words > 0
    with PmemRegion.open(path) as r:
        assert r.read(8192, len(old)) == old
        assert r.read(200_000, 64) == b"P" * 64  # inside the persisted line
        assert r.read(200_064, 36) == bytes(36)  # past it: lost
        assert layout.read_header(r)  # the header was persisted at create


def test_partial_write_back_is_old_or_new_per_word(emulated: tuple[str, str]) -> None:
    path, image = emulated
    old, new = b"\x11" * 4096, b"\x22" * 4096
    with PmemRegion.open(path) as r:
        img = DurableImage(image, r)
        r.write(4096, old)
        r.persist(4096, 4096)
        r.write(4096, new)
        img.close()
    cut = power_cut(path, image, keep=0.5, seed=3)
    assert 0 < cut.kept_words < cut.unpersisted_words == 512
    with PmemRegion.open(path) as r:
        data = r.read(4096, 4096)
    words = [data[i:i + 8] for i in range(0, 4096, 8)]
    assert set(words) == {b"\x11" * 8, b"\x22" * 8}  # never torn, never foreign
    assert power_cut(path, image, keep=0.5).unpersisted_words == 0  # the cut is now durable


def test_power_cut_checks_its_input(emulated: tuple[str, str], tmp_path: Path) -> None:
    path, image = emulated
    from pmemblk.errors import PmemError

    with pytest.raises(PmemError, match=r"outside 0\.\.1"):
        power_cut(path, image, keep=2)
    other = tmp_path / "small.img"
    other.write_bytes(bytes(4096))
    with pytest.raises(PmemError, match="not the size"):
        power_cut(path, str(other))


def test_traced_native_flushes_reach_the_durable_image(emulated: tuple[str, str]) -> None:
    """What the kprobe on rxe_flush_pmem_iova reports (the target's own virtual addresses) is
    copied into the image, widened to cache lines; a range outside the region (another
    target's) is ignored. A power cut then keeps exactly the flushed range."""
    from pmemblk.powercut import apply_flushes

    path, image = emulated
    with PmemRegion.open(path) as r:
        img = DurableImage(image, r)
        r.write(65536, b"N" * 4096)
        r.write(131072, b"U" * 4096)  # never flushed
        trace = (f"  ksoftirqd/1-22 [001] ..s1. 12.5: flush: (rxe_flush_pmem_iova+0x0/0x1d0) "
                 f"iova=0x{r.addr + 65536:x} len=4096\n"
                 f"  kworker-9 [000] ..s1. 12.6: flush: (rxe_flush_pmem_iova+0x0/0x1d0) "
                 f"iova=0x{r.addr + r.size + 4096:x} len=4096\n")
        assert apply_flushes(img, r.addr, trace) == 1
        img.close()
    power_cut(path, image, keep=0.0, seed=1)
    with PmemRegion.open(path) as r:
        assert r.read(65536, 4096) == b"N" * 4096
        assert r.read(131072, 4096) == bytes(4096)
