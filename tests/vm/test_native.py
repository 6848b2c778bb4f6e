"""The IBTA 1.5 native verbs on a current kernel (issue 15): FLUSH and ATOMIC WRITE over rxe.

They need Linux 6.2 (rxe) and rdma-core 45 (pyverbs): ``scripts/vm --flavour current``, whose
``--pmem`` is a QEMU-emulated NVDIMM, memory the kernel calls persistent. Elsewhere each test
skips with the reason.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pmemblk import rdma
from pmemblk.client import Client
from pmemblk.endpoint import Endpoint
from pmemblk.errors import ConfigError
from pmemblk.protocol import FLUSH_NATIVE, Welcome
from pmemblk.rdma import RegisteredBuffer

from ..blockmap import check_map
from ..conftest import report
from ..procs import NbdDevice, Nbdkit, Target, mounted, pmemblk, region_info, run
from .harness import verbs, vm_target
from .test_crash import power_cut_story
from .test_e2e import BIG, check_files, fio, need_pmem, write_files

DAX = "/dev/dax0.0"


def need_native() -> None:
    with rdma.Device("rxe0") as dev:
        native, why = dev.native, dev.native_why
    if native.flush_persistent and native.atomic_write:
        return
    if os.environ.get("PMEMBLK_VM_FLAVOUR") == "current":
        pytest.fail(f"the current flavour's rxe should have FLUSH and ATOMIC WRITE: {why}")
    pytest.skip(f"no native FLUSH/ATOMIC WRITE here ({why}): they run in scripts/vm "
                "--flavour current")


def plugin_flush(log: Path) -> str:
    """The plugin's line saying which flush method it chose (its log=FILE, INFO and up)."""
    lines = [x for x in log.read_text().splitlines() if "flush=" in x and "persistent" in x]
    assert lines, log.read_text()
    return lines[-1]


def test_auto_chooses_native_on_nvdimm_and_ext4_survives_a_target_sigkill(workdir: Path
                                                                          ) -> None:
    """flush=auto on the NVDIMM devdax picks native (FLUSH_PERSISTENT), persistent; ext4 on it
    rides out a SIGKILL of the target: fsck clean, checksums match."""
    need_native()
    need_pmem(DAX)
    pmemblk("create", DAX, "--force")
    memory = region_info(DAX)
    # QEMU's NVDIMM (nfit) is under a libnvdimm nd_pmem region: persistent
    assert memory["memory_persistent"] is True, memory["memory"]
    report(f"NVDIMM devdax memory: {memory['memory']}")
    target = vm_target(DAX, 7130, workdir).start()
    try:
        target.wait_log("flush native: persistent")
        plog = workdir / "plugin.log"
        server = Nbdkit(workdir, *target.keys, "flush=auto", f"log={plog}").start()
        dev = NbdDevice()
        try:
            dev.attach(server)
            run("mkfs.ext4", "-q", "-F", dev.dev)
            with mounted(dev, workdir / "mnt") as mnt:
                sums = write_files(mnt)
                run("sync")
            chosen = plugin_flush(plog)
        finally:
            dev.detach()
            server.stop()
        assert "flush=native: persistent" in chosen, chosen
        target.kill()
        assert region_info(DAX)["clean_shutdown"] is False
        target = vm_target(DAX, 7130, workdir).start()
        server = Nbdkit(workdir, *target.keys, "flush=native").start()
        dev = NbdDevice()
        try:
            dev.attach(server)
            run("fsck.ext4", "-fn", dev.dev)  # fails the test unless clean
            with mounted(dev, workdir / "mnt") as mnt:
                check_files(mnt, sums)
        finally:
            dev.detach()
            server.stop()
        report(f"ext4 on the NVDIMM {DAX}, flush=auto chose native (FLUSH_PERSISTENT): "
               f"{len(sums)} files ({BIG >> 20} MiB largest) synced, target SIGKILLed, "
               "restarted, fsck clean, checksums match")
    finally:
        target.stop()


def test_fio_verify_with_native_flush_and_fua(workdir: Path) -> None:
    need_native()
    need_pmem(DAX)
    pmemblk("create", DAX, "--force")
    target = vm_target(DAX, 7131, workdir).start()
    try:
        server = Nbdkit(workdir, *target.keys, "flush=native").start()
        dev = NbdDevice()
        try:
            dev.attach(server)
            fio(dev.dev, "flush=native", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                "--size=16M", "--fsync=32")
            fio(dev.dev, "flush=native, FUA", "--rw=write", "--bs=64k", "--iodepth=4",
                "--size=16M", "--offset=64M", "--sync=1")
        finally:
            dev.detach()
            server.stop()
    finally:
        assert target.stop() == 0


def test_flush_persistent_is_refused_on_dram_and_the_fallback_is_honest(
        shm_region: Path, workdir: Path) -> None:
    """A region on /dev/shm: the kernel refuses FLUSH_PERSISTENT there, so native is offered
    as visibility only. auto falls back to gpspm (persistent), flush=native is refused with a
    reason unless visibility only is accepted."""
    need_native()
    pmemblk("create", str(shm_region), "--size", "64M")
    target = vm_target(str(shm_region), 7132, workdir).start()
    try:
        target.wait_log("flush native: visibility only")
        with verbs(target) as t:
            assert t.info.flush_methods & FLUSH_NATIVE
            assert not t.info.durable_methods & FLUSH_NATIVE
            c = Client(t, "auto")
            assert (c.flush_method, c.persistent) == ("gpspm", True)
        with verbs(target) as t, pytest.raises(ConfigError, match="only visibility") as err:
            Client(t, "native")
        with verbs(target) as t:
            c = Client(t, "native", allow_visibility_only=True)
            assert not c.persistent
            c.pwrite(memoryview(b"v" * 4096), 0)
            c.flush()  # FLUSH_GLOBAL: completes, and claims only visibility
        report(f"native on /dev/shm: FLUSH_PERSISTENT refused by the kernel; auto chose gpspm; "
               f"flush=native refused: {err.value}")
    finally:
        target.stop()


READER = """
import mmap, os, struct, sys
path, offset, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
words = memoryview(m).cast("Q")  # one 8-byte load per read
i = offset // 8
seen = {}
import time
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(1000):
        v = words[i]
        seen[v] = seen.get(v, 0) + 1
print(" ".join(f"{v:x}:{n}" for v, n in seen.items()))
"""


def test_atomic_write_of_8_bytes_is_never_seen_torn(shm_region: Path, workdir: Path) -> None:
    """A client alternates two 8-byte values at one offset with ATOMIC WRITE while a process
    on the target's side loads that word in a loop: it sees only whole values, and both."""
    need_native()
    pmemblk("create", str(shm_region), "--size", "16M")
    info = region_info(str(shm_region))
    target = vm_target(str(shm_region), 7133, workdir).start()
    a, b = struct.pack("<Q", 0x1111111111111111), struct.pack("<Q", 0x2222222222222222)
    offset = 8 * 1000 + 8  # 8-aligned, away from anything else
    try:
        with verbs(target) as t:
            assert t.info.atomic_write
            t.atomic_write(offset, a)
            reader = subprocess.Popen(
                [sys.executable, "-c", READER, str(shm_region),
                 str(int(str(info["data_offset"])) + offset), "10"],
                stdout=subprocess.PIPE, text=True)
            writes = 0
            while reader.poll() is None:
                t.atomic_write(offset, b if writes % 2 else a)
                writes += 1
            out = reader.communicate()[0]
    finally:
        target.stop()
    seen = {int(v, 16): int(n) for v, n in (x.split(":") for x in out.split())}
    whole = {struct.unpack("<Q", a)[0], struct.unpack("<Q", b)[0]}
    assert set(seen) == whole, f"torn or foreign values seen: {seen}"
    report(f"ATOMIC WRITE: {writes} alternating 8-byte writes, {sum(seen.values())} loads of "
           "the word on the target's side, only whole values seen (both)")



def test_power_cut_with_native_flush_keeps_every_fsynced_file(workdir: Path) -> None:
    """ext4 over flush=native on the NVDIMM, power cut mid-workload with no write-back: every
    fsynced file is intact. The emulation sees the FLUSHes only by tracing rxe (the target's
    CPU never does): a native FLUSH that did not persist would lose files here."""
    need_native()
    need_pmem(DAX)
    pmemblk("create", DAX, "--force")
    seed = int(os.environ.get("PMEMBLK_CRASH_SEED", "20261124")) + 7
    power_cut_story(Path(DAX), workdir, seed, "none", "native")


Post = Callable[[Endpoint, Welcome, RegisteredBuffer], None]


def refused_by_the_device(target: Target, verb: str, post: Post, readonly: bool = False
                          ) -> None:
    """``post`` one work request on a fresh connection: the device answers it with a remote
    access error (which also ends that connection)."""
    with verbs(target, readonly=readonly) as t:
        ep, bufs = t.ep, t.buffers
        assert ep is not None and bufs is not None
        post(ep, t.info, bufs)
        statuses = {rdma.WC_STATUS_NAMES.get(wc.status)
                    for wc in ep.wait(time.monotonic() + 30)}
        assert statuses == {"REM_ACCESS_ERR"}, (verb, statuses)


def zeros_at(target: Target, offset: int) -> bool:
    with verbs(target) as t:
        buf = bytearray(8)
        Client(t, "gpspm").pread(memoryview(buf), offset)
        return buf == bytes(8)


def test_a_writers_flush_or_atomics_past_its_region_fail_with_a_remote_access_error(
        shm_region: Path, workdir: Path) -> None:
    """A read-write client posting FLUSH or ATOMIC WRITE past the end of its registration,
    or a compare-and-swap on a plain region (whose registration has no atomic access): the
    device refuses each with a remote access error, and the target serves the next client."""
    need_native()
    pmemblk("create", str(shm_region), "--size", "16M")
    target = vm_target(str(shm_region), 7135, workdir).start()
    posts: dict[str, Post] = {
        "FLUSH": lambda ep, info, bufs: ep.post_flush(
            1, info.remote_addr + info.export_size, 4096, info.rkey, False),
        "ATOMIC WRITE": lambda ep, info, bufs: ep.post_atomic_write(
            1, info.remote_addr + info.export_size, info.rkey, b"X" * 8),
        "compare-and-swap": lambda ep, info, bufs: ep.post_compare_swap(
            1, bufs.addr, bufs.lkey, info.remote_addr, info.rkey, 0, 1),
    }
    try:
        for verb, post in posts.items():
            refused_by_the_device(target, verb, post)
        assert zeros_at(target, 0)
        report("a writer's FLUSH and ATOMIC WRITE past its region, and a compare-and-swap on "
               "a plain region, fail with a remote access error; region unchanged")
    finally:
        target.stop()


def test_atomic_blocks_over_native_verbs_survive_a_power_cut(workdir: Path) -> None:
    """An atomic-blocks region on the NVDIMM, its sole writer moving map entries by ATOMIC
    WRITE and persisting by FLUSH: ext4 through a power cut that keeps a random share of the
    unpersisted words, every fsynced file intact, the map whole."""
    need_native()
    need_pmem(DAX)
    pmemblk("create", DAX, "--force", "--atomic-blocks")
    plog = workdir / "plugin.log"
    seed = int(os.environ.get("PMEMBLK_CRASH_SEED", "20261124")) + 16
    power_cut_story(Path(DAX), workdir, seed, "partial", "native", f"log={plog}")
    assert "map entries move by ATOMIC WRITE (sole writer)" in plog.read_text()
    check_map(DAX)


def test_a_read_only_client_cannot_flush_or_atomic_write(shm_region: Path, workdir: Path
                                                         ) -> None:
    """A read-only client is offered neither verb; posting them anyway on its rkey fails with a
    remote access error (its MR has no FLUSH or write access), and the word is unchanged."""
    need_native()
    pmemblk("create", str(shm_region), "--size", "16M")
    target = vm_target(str(shm_region), 7134, workdir).start()
    posts: dict[str, Post] = {
        "FLUSH": lambda ep, info, bufs: ep.post_flush(1, info.remote_addr, 4096, info.rkey,
                                                      False),
        "ATOMIC WRITE": lambda ep, info, bufs: ep.post_atomic_write(
            1, info.remote_addr + 64, info.rkey, b"X" * 8),
    }
    try:
        with verbs(target, readonly=True) as t:
            assert not t.info.flush_methods & FLUSH_NATIVE and not t.info.atomic_write
        for verb, post in posts.items():
            refused_by_the_device(target, verb, post, readonly=True)
        assert zeros_at(target, 64)
        report("read-only client: FLUSH and ATOMIC WRITE on its rkey fail with a remote access "
               "error; region unchanged")
    finally:
        target.stop()
