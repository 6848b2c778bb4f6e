"""Multi-conn through the kernel over Soft-RoCE (issue 12): ``nbd-client -C 4`` on one nbdkit.

The four NBD connections are one client of the target (one writer slot on a non-shared
export, one MR); the kernel spreads requests over them by CPU (blk-mq maps each CPU to a
hardware queue, each queue to a connection), and a FLUSH on one must cover the writes of all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pmemblk.powercut import power_cut

from ..conftest import report
from ..procs import NbdDevice, Nbdkit, pmemblk, region_info, run
from .harness import ADDR, secret_file, vm_target

CONNECTIONS = 4


def target_status(control: Path) -> dict[str, Any]:
    out = json.loads(pmemblk("status", "--target", str(control), "--json").stdout)
    assert isinstance(out, dict)
    return out


def device_status(name: str) -> dict[str, Any]:
    out = json.loads(pmemblk("status", name, "--json").stdout)
    assert isinstance(out, dict)
    return out


def write_files(root: Path, tag: str) -> dict[str, str]:
    sums = {}
    for name, size in ((f"{tag}-big.bin", 24 << 20), (f"{tag}-a.bin", 1),
                       (f"{tag}-b.bin", 4095), (f"{tag}-c.bin", 3 << 20)):
        data = os.urandom(size)
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def test_ext4_on_four_connections_rides_out_a_target_sigkill(shm_region: Path, workdir: Path,
                                                             run_dir: Path) -> None:
    """pmemblk attach --connections 4 on a non-shared export: the four connections are one
    client; ext4 on it rides out a target SIGKILL and restart; fsck clean, checksums match."""
    pmemblk("create", str(shm_region), "--size", "256M")
    control = workdir / "ctl.sock"
    target = vm_target(str(shm_region), 7300, workdir, "--control", str(control)).start()
    attach = ["attach", f"{ADDR}:7300", "--secret-file", str(secret_file(workdir)),
              "--connections", str(CONNECTIONS), "--name", "mc"]
    mnt = workdir / "mnt"
    mnt.mkdir()
    try:
        device = pmemblk(*attach).stdout.strip()
        run("mkfs.ext4", "-q", "-F", device)
        run("mount", device, str(mnt))
        try:
            sums = write_files(mnt, "before")
            run("sync")
            assert device_status("mc")["connections"] == CONNECTIONS
            clients = target_status(control)["clients"]
            assert isinstance(clients, list) and len(clients) == 1, clients
            # How many channels the pool opened depends on how the requests overlapped (under
            # TCG they may not overlap at all); what must hold is one client with its writer slot.
            assert clients[0]["mode"] == "read-write" and clients[0]["channels"] >= 1, clients
            channels = clients[0]["channels"]
            target.kill()
            target = target.restart()
            sums.update(write_files(mnt, "after"))  # the plugin reconnects every channel
            run("sync")
            reconnects = device_status("mc")["reconnects"]
            assert reconnects == 1  # one restart, whichever channel met it first
        finally:
            run("umount", str(mnt))
        pmemblk("detach", "mc")
        device = pmemblk(*attach).stdout.strip()
        run("fsck.ext4", "-fn", device)  # fails the test unless clean
        run("mount", device, str(mnt))
        try:
            for name, digest in sums.items():
                assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
        finally:
            run("umount", str(mnt))
        pmemblk("detach", "mc")
        report(f"ext4 on attach --connections {CONNECTIONS} over RDMA: one client with "
               f"{channels} channels, target SIGKILLed and restarted under it ({reconnects} "
               f"reconnect), fsck clean, {len(sums)}/{len(sums)} checksums match")
    finally:
        target.stop()
    assert region_info(str(shm_region))["clean_shutdown"] is True


def test_a_flush_on_one_connection_persists_writes_of_another(workdir: Path) -> None:
    """Writes from both CPUs (so on two connections), one fsync of the device from CPU 0 (one
    FLUSH, on CPU 0's connection), then a power cut that keeps nothing unpersisted: every
    byte written from CPU 1 is back."""
    region = Path("/dev/shm") / "pmemblk-multiconn.img"
    image = Path("/dev/shm") / "pmemblk-multiconn.durable"
    try:
        pmemblk("create", str(region), "--size", "64M")
        target = vm_target(str(region), 7310, workdir, "--testing-durable-image",
                           str(image)).start()
        server = Nbdkit(workdir, *target.keys, "flush=gpspm", "reconnect-timeout=1").start()
        dev = NbdDevice().attach(server, connections=CONNECTIONS)
        blobs: dict[int, bytes] = {}
        try:
            for cpu in (0, 1):
                for i in range(8):
                    off = (cpu * 16 + i) * (1 << 20)
                    blobs[off] = os.urandom(64 << 10)
                    (workdir / "blob").write_bytes(blobs[off])
                    run("taskset", "-c", str(cpu), "dd", f"if={workdir / 'blob'}",
                        f"of={dev.dev}", "bs=64k", f"seek={off >> 16}", "oflag=direct",
                        "conv=notrunc", "status=none")
            run("taskset", "-c", "0", "python3", "-c",
                f"import os; fd = os.open({dev.dev!r}, os.O_RDONLY); os.fsync(fd)")
            target.kill()  # the power cut, right after the FLUSH was acknowledged
        finally:
            dev.detach()
            server.stop()
        cut = power_cut(str(region), str(image), keep=0.0, seed=1)
        target = target.restart()
        server = Nbdkit(workdir, *target.keys).start()
        dev = NbdDevice().attach(server)
        try:
            with open(dev.dev, "rb") as f:
                lost = [off for off, blob in blobs.items()
                        if os.pread(f.fileno(), len(blob), off) != blob]
        finally:
            dev.detach()
            server.stop()
            target.stop()
        assert not lost, f"{len(lost)} of {len(blobs)} writes lost (offsets {lost[:4]})"
        report(f"nbd-client -C {CONNECTIONS}: {len(blobs)} writes from 2 CPUs, one FLUSH from "
               f"CPU 0, power cut ({cut.unpersisted_words} unpersisted words, none kept): "
               "every byte back")
    finally:
        region.unlink(missing_ok=True)
        image.unlink(missing_ok=True)
