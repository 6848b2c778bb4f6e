"""Atomic blocks over RDMA (issue 16): the map moves by RDMA compare-and-swap on rxe.

ext4 on an atomic-blocks region rides out a SIGKILL of the target (fsck clean, checksums
match), fio verifies, several writers on a --shared export race on the same blocks without
corrupting the map, and a read-only client's compare-and-swap is refused by rxe itself.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from pmemblk import blockmap
from pmemblk.client import Client
from pmemblk.errors import TransportError

from ..blockmap import check_map
from ..conftest import report
from ..procs import mounted, pmemblk, region_info, run, served
from .harness import verbs, vm_target
from .test_e2e import fio

BLOCK = 4096


def test_ext4_on_atomic_blocks_survives_a_target_sigkill(shm_region: Path,
                                                          workdir: Path) -> None:
    region = str(shm_region)
    pmemblk("create", region, "--size", "96M", "--atomic-blocks")
    target = vm_target(region, 7200, workdir).start()
    sums: dict[str, str] = {}
    try:
        with served(target, workdir, "flush=gpspm") as dev:
            run("mkfs.ext4", "-q", "-F", dev.dev)
            with mounted(dev, workdir / "mnt") as mnt:
                for name, size in (("a.bin", 6 << 20), ("b.bin", 4095), ("c.bin", 1)):
                    data = os.urandom(size)
                    (mnt / name).write_bytes(data)
                    sums[name] = hashlib.sha256(data).hexdigest()
                run("sync")
        target.kill()
        assert region_info(region)["clean_shutdown"] is False
        target = vm_target(region, 7200, workdir).start()
        with served(target, workdir, "flush=gpspm") as dev:
            fsck = run("fsck.ext4", "-fn", dev.dev)
            with mounted(dev, workdir / "mnt") as mnt:
                for name, digest in sums.items():
                    assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest
    finally:
        target.stop()
    moved = check_map(region)
    report(f"ext4 on atomic blocks over rxe: SIGKILL, restart, fsck -fn clean "
           f"({fsck.stdout.strip().splitlines()[-1]}), {len(sums)}/{len(sums)} checksums "
           f"match; {moved} blocks moved, map whole")


def test_fio_verifies_on_atomic_blocks(shm_region: Path, workdir: Path) -> None:
    region = str(shm_region)
    pmemblk("create", region, "--size", "64M", "--atomic-blocks")
    target = vm_target(region, 7201, workdir).start()
    try:
        with served(target, workdir, "flush=gpspm") as dev:
            fio(dev.dev, "atomic blocks", "--rw=randwrite", "--bs=4k", "--iodepth=8",
                "--size=8M")
            fio(dev.dev, "atomic blocks", "--rw=write", "--bs=64k", "--iodepth=4",
                "--size=8M", "--offset=16M")
    finally:
        assert target.stop() == 0
    check_map(region)


def stamp(writer: int, n: int) -> bytes:
    return (writer.to_bytes(4, "little") + n.to_bytes(4, "little")) * (BLOCK // 8)


def test_shared_writers_race_by_rdma_compare_and_swap(shm_region: Path,
                                                      workdir: Path) -> None:
    region = str(shm_region)
    pmemblk("create", region, "--size", "16M", "--atomic-blocks")
    target = vm_target(region, 7202, workdir, "--shared").start()
    clients = [Client(verbs(target), "gpspm") for _ in range(2)]
    errors: list[BaseException] = []

    def hammer(c: Client, writer: int) -> None:
        try:
            for n in range(1, 60):
                c.pwrite(memoryview(stamp(writer, n)), (n % 4) * BLOCK)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        for lba in range(4):
            buf = bytearray(BLOCK)
            clients[0].pread(memoryview(buf), lba * BLOCK)
            assert len({bytes(buf[i:i + 8]) for i in range(0, BLOCK, 8)}) == 1
    finally:
        for c in clients:
            c.close()
        target.stop()
    check_map(region)


def test_a_read_only_clients_compare_and_swap_is_refused_by_the_device(
        shm_region: Path, workdir: Path) -> None:
    region = str(shm_region)
    pmemblk("create", region, "--size", "16M", "--atomic-blocks")
    target = vm_target(region, 7203, workdir).start()
    try:
        with verbs(target, readonly=True) as t:
            info = blockmap.BlockMap.load(t).info
            with pytest.raises(TransportError, match=r"REM_ACCESS_ERR|remote access"):
                t.compare_swap(info.map_at(0), 0, 5)
    finally:
        target.stop()
    assert check_map(region) == 0
