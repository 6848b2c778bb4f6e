"""What a devdax device's memory is, from the kernel's sysfs: persistent or volatile, and why.

libpmem reports ``is_pmem=1`` for every device-DAX character device, but devdax devices are
also made from memory that does not survive a power cut: soft-reserved ranges (``dax_hmem``:
CXL volatile memory, HBM, EFI "specific purpose" memory), CXL RAM regions, and any device
handed to the kernel as RAM (``daxctl reconfigure-device --mode=system-ram``, the ``kmem``
driver). The kernel knows which: ``/sys/dev/char/MAJ:MIN`` resolves to the device's place in
the device tree. A device under a libnvdimm region (``.../ndbusN/regionN/daxN.M/...``) whose
region is an ``nd_pmem`` one is persistent memory; anything else is not, and pmemblk then
says so (docs/persistence.md has the table, and what was seen in the VM).

The sysfs root is a parameter so that the rules can be tested against built trees.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_REGION = re.compile(r"region\d+")
_NDBUS = re.compile(r"ndbus\d+")


@dataclass(frozen=True)
class MemoryKind:
    """The memory under a region: ``kind`` names it, ``persistent`` is the kernel's answer."""

    kind: str
    persistent: bool
    why: str

    def describe(self) -> str:
        return f"{self.kind}, {'persistent' if self.persistent else 'volatile'} ({self.why})"


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(4096).strip()
    except OSError:
        return ""


def _uevent(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in _read(os.path.join(path, "uevent")).splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def _driver(where: str) -> str:
    """The driver bound to the dax device (a bus device on today's kernels; the class device's
    parent on old ones)."""
    for link in (os.path.join(where, "driver"), os.path.join(where, "device", "driver")):
        if os.path.exists(link):
            return os.path.basename(os.path.realpath(link))
    return ""


def devdax_kind(major: int, minor: int, sys_root: str = "/sys") -> MemoryKind:
    """The memory behind the devdax character device ``major:minor``, as sysfs shows it."""
    link = os.path.join(sys_root, "dev", "char", f"{major}:{minor}")
    if not os.path.lexists(link):
        return MemoryKind("unknown devdax", False,
                          f"{link} does not exist: the kernel does not show what it is")
    where = os.path.realpath(link)
    driver = _driver(where)
    if driver == "kmem":
        return MemoryKind("devdax onlined as system RAM", False,
                          "bound to the kmem driver: the kernel uses it as ordinary RAM")
    parts = where.split(os.sep)
    if any(_NDBUS.fullmatch(p) for p in parts):
        for i in range(len(parts) - 1, 0, -1):
            if _REGION.fullmatch(parts[i]):
                region = os.sep.join(parts[:i + 1])
                # the region's devtype file (seen on 6.1: "nd_pmem"), else its uevent's
                devtype = (_read(os.path.join(region, "devtype"))
                           or _uevent(region).get("DEVTYPE", ""))
                domain = _read(os.path.join(region, "persistence_domain"))
                if devtype == "nd_pmem":
                    return MemoryKind(
                        "pmem", True, f"libnvdimm pmem region {parts[i]}"
                        + (f", persistence domain {domain}" if domain else ""))
                return MemoryKind("volatile nvdimm region", False,
                                  f"libnvdimm region {parts[i]} is {devtype or 'of no type'}, "
                                  "not nd_pmem")
        return MemoryKind("unknown devdax", False,
                          f"under a libnvdimm bus but no region in {where}")
    if any(p.startswith("hmem") for p in parts):
        return MemoryKind("soft-reserved memory", False,
                          "dax_hmem: soft-reserved (EFI specific-purpose, HBM or CXL) memory "
                          "is volatile")
    if any(p.startswith(("cxl", "ACPI0017", "dax_region")) for p in parts):
        return MemoryKind("CXL volatile memory", False, "a CXL RAM region is volatile")
    return MemoryKind("unknown devdax", False,
                      f"not under a libnvdimm pmem region ({where}): pmemblk cannot call it "
                      "persistent")


def region_kind(st: os.stat_result, is_pmem: bool, sys_root: str = "/sys") -> MemoryKind:
    """The memory of a region whose ``stat`` is ``st`` (a devdax device or a file)."""
    import stat

    if stat.S_ISCHR(st.st_mode):
        return devdax_kind(os.major(st.st_rdev), os.minor(st.st_rdev), sys_root)
    if is_pmem:
        return MemoryKind("fsdax file", True, "a file on a DAX filesystem on pmem (libpmem)")
    return MemoryKind("file", True, "page cache, written back by msync")
