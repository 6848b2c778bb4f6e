"""End to end over Soft-RoCE: region → target → plugin → /dev/nbd0 → ext4, fio, crashes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ..conftest import report
from ..procs import PLUGIN, NbdDevice, Nbdkit, Target, mounted, pmemblk, region_info, run, served
from .harness import ADDR, secret_file, vm_target

FLUSH = ["gpspm", "apm"]
BIG = 70 << 20  # "one file over 64 MiB"


def write_files(root: Path) -> dict[str, str]:
    """Files of known content: one over 64 MiB and some small ones; returns name → sha256."""
    sums = {}
    specs = [("big.bin", BIG), ("small-1.bin", 1), ("small-2.bin", 4095), ("mid.bin", 3 << 20)]
    for name, size in specs:
        data = os.urandom(size)
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def check_files(root: Path, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


def flush_keys(flush: str) -> list[str]:
    # apm on /dev/shm is visibility only: enough for a SIGKILL of the target (page cache
    # survives the process), and refused unless accepted.
    return [f"flush={flush}"] + (["allow-visibility-only=true"] if flush == "apm" else [])


def filesystem_story(region: str, port: int, workdir: Path, flush: str) -> None:
    target = vm_target(region, port, workdir).start()
    try:
        with served(target, workdir, *flush_keys(flush)) as dev:
            run("mkfs.ext4", "-q", "-F", dev.dev)
            with mounted(dev, workdir / "mnt") as mnt:
                sums = write_files(mnt)
                run("sync")
        what = f"ext4 on {region} flush={flush}"
        report(f"{what}: mkfs, mount, {len(sums)} files written ({BIG >> 20} MiB largest), "
               "synced, unmounted; target SIGKILLed")
        target.kill()  # SIGKILL: no clean shutdown
        assert region_info(region)["clean_shutdown"] is False
        target = vm_target(region, port, workdir).start()
        target.wait_log("was not shut down cleanly")
        with served(target, workdir, *flush_keys(flush)) as dev:
            fsck = run("fsck.ext4", "-fn", dev.dev)
            report(f"{what}: restarted, fsck -fn clean: " + fsck.stdout.strip().splitlines()[-1])
            with mounted(dev, workdir / "mnt") as mnt:
                check_files(mnt, sums)
        report(f"{what}: after SIGKILL + restart, {len(sums)}/{len(sums)} checksums match")
    finally:
        target.stop()
    assert region_info(region)["clean_shutdown"] is True  # SIGTERM persisted and marked it


@pytest.mark.parametrize("flush", FLUSH)
def test_ext4_survives_target_sigkill(shm_region: Path, workdir: Path, flush: str) -> None:
    pmemblk("create", str(shm_region), "--size", "256M")
    filesystem_story(str(shm_region), 7100 + FLUSH.index(flush), workdir, flush)


def fio(dev: str, label: str, *args: str) -> dict[str, object]:
    res = run("fio", "--name=verify", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
              "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
              "--output-format=json", *args, timeout=900)
    out = json.loads(res.stdout[res.stdout.index("{"):])
    job = out["jobs"][0]
    assert job["error"] == 0, job
    w, r = job["write"], job["read"]
    report(f"fio {dev} ({label}) {' '.join(args)}: wrote {w['io_bytes'] >> 20} MiB "
           f"({w['iops']:.0f} IOPS), verified {r['io_bytes'] >> 20} MiB, 0 verify errors")
    assert w["io_bytes"] > 0 and r["io_bytes"] == w["io_bytes"]
    return dict(job)


@pytest.mark.parametrize("flush", FLUSH)
def test_fio_verify(shm_region: Path, workdir: Path, flush: str) -> None:
    pmemblk("create", str(shm_region), "--size", "256M")
    target = vm_target(str(shm_region), 7110 + FLUSH.index(flush), workdir).start()
    try:
        with served(target, workdir, *flush_keys(flush)) as dev:
            fio(dev.dev, f"flush={flush}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                "--size=32M")
            fio(dev.dev, f"flush={flush}", "--rw=write", "--bs=1M", "--iodepth=4", "--size=128M",
                "--offset=64M")
    finally:
        assert target.stop() == 0


def need_pmem(path: str) -> None:
    if not os.path.exists(path):
        if os.environ.get("PMEMBLK_VM_REQUIRE"):
            pytest.fail(f"no {path}: scripts/vm --pmem should have created it")
        pytest.skip(f"no {path}: boot the VM with scripts/vm --pmem")


def test_devdax_region(workdir: Path) -> None:
    dax = "/dev/dax0.0"
    need_pmem(dax)
    pmemblk("create", dax, "--force")
    info = region_info(dax)
    assert info["is_pmem"] is True and info["persistence"] == "pmem_persist"
    assert info["kind"] == "devdax"
    # memmap= e820 pmem (stable) is under a libnvdimm nd_pmem region: still persistent
    assert info["memory_persistent"] is True, info["memory"]
    report(f"devdax memory: {info['memory']}")
    filesystem_story(dax, 7120, workdir, "gpspm")  # apm is persistent only with --apm-durable


def test_fsdax_file_gets_a_clear_error(workdir: Path) -> None:
    if os.environ.get("PMEMBLK_VM_FLAVOUR") == "current":
        pytest.skip("the current flavour's one NVDIMM namespace is devdax: fsdax is checked in "
                    "the stable flavour (memmap= gives it both)")
    need_pmem("/dev/pmem1")
    mnt = workdir / "dax"
    mnt.mkdir()
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "/dev/pmem1")  # DAX needs page-sized blocks
    run("mount", "-o", "dax", "/dev/pmem1", str(mnt))
    try:
        region = str(mnt / "region.img")
        pmemblk("create", region, "--size", "16M")
        assert region_info(region)["is_pmem"] is True  # MAP_SYNC on a DAX mount
        target = vm_target(region, 7130, workdir)
        with pytest.raises(AssertionError, match="exited 1") as exc:
            target.start()
        target.stop()
        message = str(exc.value)
        assert "fsdax" in message and "devdax" in message and "Traceback" not in message
        report("fsdax refusal: " + [x for x in message.splitlines() if "error:" in x][-1])
    finally:
        run("umount", str(mnt))


def test_sigterm_marks_clean_and_persists(shm_region: Path, workdir: Path) -> None:
    pmemblk("create", str(shm_region), "--size", "16M")
    target = vm_target(str(shm_region), 7140, workdir).start()
    assert region_info(str(shm_region))["clean_shutdown"] is False
    assert target.stop(signal.SIGTERM) == 0
    assert "marked" in target.log() and "clean" in target.log()
    info = region_info(str(shm_region))
    assert info["clean_shutdown"] is True and info["times_served"] == 1


def test_readonly_export(shm_region: Path, workdir: Path) -> None:
    pmemblk("create", str(shm_region), "--size", "16M")
    target = vm_target(str(shm_region), 7150, workdir, "--readonly").start()
    server = Nbdkit(workdir, *target.keys).start()
    try:
        res = run("nbdsh", "-u", f"nbd+unix:///?socket={server.sock}", "-c",
                  "print(h.is_read_only(), h.get_size())")
        assert res.stdout.split() == ["True", str((16 << 20) - 4096)]
        res = run("nbdsh", "-u", f"nbd+unix:///?socket={server.sock}", "-c",
                  "h.pwrite(b'x' * 512, 0)", check=False)
        assert res.returncode != 0
    finally:
        server.stop()
        target.stop()


def test_nbd_device_reports_fua_and_write_cache(shm_region: Path, workdir: Path) -> None:
    pmemblk("create", str(shm_region), "--size", "16M")
    target = vm_target(str(shm_region), 7160, workdir).start()
    try:
        with served(target, workdir) as dev:
            queue = Path(f"/sys/block/{NbdDevice().name}/queue")
            assert (queue / "write_cache").read_text().strip() == "write back"
            assert (queue / "fua").read_text().strip() == "1"
            assert int(Path(f"/sys/block/{dev.name}/size").read_text()) * 512 == (16 << 20) - 4096
    finally:
        target.stop()


def captive_verbose(target: Target, cmd: str, *keys: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdkit", "-v", "-U", "-", "python", PLUGIN, *target.keys,
                           *keys, "--run", cmd], capture_output=True, text=True, timeout=300)


def test_auto_transport_picks_rdma_and_falls_back_to_tcp(shm_region: Path,
                                                          workdir: Path) -> None:
    pmemblk("create", str(shm_region), "--size", "16M")
    both = Target(str(shm_region), f"{ADDR}:7170", workdir, transport="verbs,tcp",
                  secret=secret_file(workdir)).start()
    try:
        res = captive_verbose(both, 'nbdinfo "$uri"')
        assert res.returncode == 0, res.stderr
        assert "transport=auto: using RDMA verbs: RDMA device rxe0 has an active port" \
            in res.stderr
        assert "over RDMA" in res.stdout
        res = captive_verbose(both, 'nbdinfo "$uri"', "transport=tcp")
        assert res.returncode == 0 and "over TCP" in res.stdout  # same port, other transport
    finally:
        both.stop()
    tcp_only = Target(str(shm_region), f"{ADDR}:7171", workdir, transport="tcp",
                      secret=secret_file(workdir)).start()
    try:
        res = captive_verbose(tcp_only, 'nbdinfo "$uri"')
        assert res.returncode == 0, res.stderr
        assert "transport=auto: using TCP: RDMA could not reach the target" in res.stderr
        assert "over TCP" in res.stdout
    finally:
        tcp_only.stop()
