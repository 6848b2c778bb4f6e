"""pmemblk.memkind against built sysfs trees: what each kind of devdax memory is called, and
what the flush guarantees become on volatile memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pmemblk import durability, layout, pmem
from pmemblk.address import parse_address
from pmemblk.memkind import devdax_kind, region_kind
from pmemblk.pmem import PmemRegion
from pmemblk.protocol import CLIENT_NONCE_SIZE, FLUSH_APM, FLUSH_GPSPM, MAC_SIZE, Auth, Hello
from pmemblk.session import Admission, Greeting, ServeConfig
from pmemblk.target import Export

MAJ, MIN = 252, 0


def _tree(root: Path, device: str, driver: str = "device_dax",
          region_uevent: str | None = None, domain: str | None = None) -> Path:
    """/sys/dev/char/MAJ:MIN -> ROOT/devices/DEVICE/dax/daxX.Y, its device's driver link."""
    dev = root / "devices" / device
    char = dev / "dax" / "dax0.0"
    char.mkdir(parents=True)
    (char / "device").symlink_to(dev)
    drivers = root / "bus" / "dax" / "drivers" / driver
    drivers.mkdir(parents=True)
    (dev / "driver").symlink_to(drivers)
    if region_uevent is not None:
        region = dev.parent
        (region / "uevent").write_text(region_uevent)
        if domain is not None:
            (region / "persistence_domain").write_text(domain + "\n")
    (root / "dev" / "char").mkdir(parents=True)
    (root / "dev" / "char" / f"{MAJ}:{MIN}").symlink_to(os.path.relpath(
        char, root / "dev" / "char"))
    return root


def test_e820_pmem_namespace_is_persistent(tmp_path: Path) -> None:
    root = _tree(tmp_path, "platform/e820_pmem/ndbus0/region0/dax0.0",
                 region_uevent="DEVTYPE=nd_pmem\nMODALIAS=nd:t2\n")
    kind = devdax_kind(MAJ, MIN, str(root))
    assert kind.persistent and kind.kind == "pmem", kind
    assert "region0" in kind.why


def test_the_region_devtype_file_is_read_as_seen_in_the_vm(tmp_path: Path) -> None:
    """6.1's e820 region: .../ndbus0/region0/devtype says nd_pmem (the uevent may not)."""
    root = _tree(tmp_path, "platform/e820_pmem/ndbus0/region0/dax0.0/dax0.0", region_uevent="")
    (root / "devices/platform/e820_pmem/ndbus0/region0/dax0.0/devtype").unlink(missing_ok=True)
    (root / "devices/platform/e820_pmem/ndbus0/region0/devtype").write_text("nd_pmem\n")
    assert devdax_kind(MAJ, MIN, str(root)).persistent


def test_nfit_pmem_namespace_is_persistent_with_its_domain(tmp_path: Path) -> None:
    root = _tree(tmp_path, "LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00/ndbus1/region1/dax1.0",
                 region_uevent="DEVTYPE=nd_pmem\n", domain="memory_controller")
    kind = devdax_kind(MAJ, MIN, str(root))
    assert kind.persistent
    assert "memory_controller" in kind.why


def test_volatile_nvdimm_region_is_not(tmp_path: Path) -> None:
    root = _tree(tmp_path, "platform/ACPI0012:00/ndbus0/region0/dax0.0",
                 region_uevent="DEVTYPE=nd_volatile\n")
    kind = devdax_kind(MAJ, MIN, str(root))
    assert not kind.persistent and "nd_volatile" in kind.why


def test_soft_reserved_hmem_is_volatile(tmp_path: Path) -> None:
    root = _tree(tmp_path, "platform/hmem.0/dax0.0")
    kind = devdax_kind(MAJ, MIN, str(root))
    assert not kind.persistent and kind.kind == "soft-reserved memory"


def test_cxl_ram_region_is_volatile(tmp_path: Path) -> None:
    root = _tree(tmp_path, "platform/ACPI0017:00/root0/decoder0.0/region0/dax_region0/dax0.0")
    kind = devdax_kind(MAJ, MIN, str(root))
    assert not kind.persistent and kind.kind == "CXL volatile memory"


def test_pmem_onlined_by_kmem_is_volatile(tmp_path: Path) -> None:
    """Even a libnvdimm pmem namespace is RAM once kmem has it (daxctl reconfigure-device)."""
    root = _tree(tmp_path, "platform/e820_pmem/ndbus0/region0/dax0.0", driver="kmem",
                 region_uevent="DEVTYPE=nd_pmem\n")
    kind = devdax_kind(MAJ, MIN, str(root))
    assert not kind.persistent and "kmem" in kind.why


def test_unknown_or_missing_is_not_called_persistent(tmp_path: Path) -> None:
    assert not devdax_kind(MAJ, MIN, str(tmp_path)).persistent
    root = _tree(tmp_path, "virtual/somewhere/dax0.0")
    kind = devdax_kind(MAJ, MIN, str(root))
    assert not kind.persistent and kind.kind == "unknown devdax"


def test_files_keep_their_old_answer(tmp_path: Path) -> None:
    f = tmp_path / "r"
    f.write_bytes(b"x")
    assert region_kind(os.stat(f), False).persistent
    assert region_kind(os.stat(f), True).kind == "fsdax file"


def test_volatile_memory_makes_every_method_visibility_only(tmp_path: Path) -> None:
    kind = devdax_kind(MAJ, MIN, str(_tree(tmp_path, "platform/hmem.0/dax0.0")))
    items = durability.guarantees(True, "pmem_persist", True, memory=kind)
    assert {g.method for g in items} == {"gpspm", "apm"}
    assert not any(g.persistent for g in items)
    assert all("soft-reserved" in g.why for g in items)
    durable = durability.durable_mask(items)
    assert durable == 0
    # flush=auto then refuses, as on any region without persistence, unless told
    try:
        durability.choose(FLUSH_APM | FLUSH_GPSPM, durable, "auto", False)
    except ValueError as exc:
        assert "persistence" in str(exc)
    else:
        raise AssertionError("flush=auto accepted volatile memory")
    assert durability.choose(FLUSH_APM | FLUSH_GPSPM, durable, "auto", True) == ("gpspm", False)


def test_persistent_memory_keeps_its_guarantees(tmp_path: Path) -> None:
    kind = devdax_kind(MAJ, MIN, str(_tree(tmp_path, "platform/e820_pmem/ndbus0/region0/dax0.0",
                                           region_uevent="DEVTYPE=nd_pmem\n")))
    items = durability.guarantees(True, "pmem_persist", True, memory=kind)
    assert all(g.persistent for g in items)


def test_a_target_on_volatile_memory_declares_nothing_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The WELCOME, the serve log's table and the target's status, on a region whose memory
    sysfs calls volatile (the sysfs answer planted; the rest is the real target), even with a
    native FLUSH_PERSISTENT probe and --apm-durable."""
    hmem = devdax_kind(MAJ, MIN, str(_tree(tmp_path / "sys", "platform/hmem.0/dax0.0")))
    monkeypatch.setattr(pmem, "region_kind", lambda st, is_pmem: hmem)
    path = str(tmp_path / "r.img")
    with PmemRegion.create(path, 1 << 20) as r:
        layout.format_region(r)
    ex = Export(ServeConfig(path=path, listen=parse_address(f"unix:{tmp_path}/s", "--listen"),
                            transports=("tcp",), apm_durable=True))
    try:
        ex.begin()
        ex.offer_native(durability.NativeOffer("persistent", False, "probed"))
        hello = Hello(readonly=False, nonce=os.urandom(CLIENT_NONCE_SIZE),
                      client_id=os.urandom(16))
        greeting = ex.greet(hello.encode())
        assert isinstance(greeting, Greeting)
        admission = ex.admit(greeting, Auth(bytes(MAC_SIZE)).encode())
        assert isinstance(admission, Admission)
        w = ex.welcome(admission, rkey=1, remote_addr=4096, native=True)
        assert w.flush_methods & FLUSH_GPSPM and w.durable_methods == 0
        st = ex.status()
        assert st["memory_persistent"] is False and "soft-reserved" in st["memory"]
        assert all("visibility only" in text for text in st["flush"].values())
    finally:
        ex.close()
