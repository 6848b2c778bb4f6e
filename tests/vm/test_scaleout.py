"""Linux md across two targets (docs/scale-out.md): RAID1 that loses a target for longer than
reconnect-timeout under fio --verify and resyncs it from the bitmap; RAID1 through a power cut
of both targets; RAID0 with fio verify."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pmemblk.powercut import power_cut

from ..conftest import report
from ..procs import PY, Target, pmemblk, run, wait_until
from .harness import ADDR, secret_file, vm_target
from .test_crash import WORKLOAD, logged

SIZE = 96 << 20
MD = "/dev/md0"


@dataclass
class Member:
    """One target and the device attached from it."""

    name: str
    region: Path
    port: int
    target: Target
    device: str = ""

    def attach(self, workdir: Path, *extra: str) -> str:
        self.device = pmemblk("attach", f"{ADDR}:{self.port}", "--secret-file",
                              str(secret_file(workdir)), "--name", self.name,
                              "--device", f"/dev/nbd{self.port % 10}", *extra).stdout.strip()
        return self.device

    @property
    def md_state(self) -> str:
        path = Path(f"/sys/block/md0/md/dev-{os.path.basename(self.device)}/state")
        return path.read_text().strip() if path.exists() else "gone"


@pytest.fixture
def members(workdir: Path, monkeypatch: pytest.MonkeyPatch,
            request: pytest.FixtureRequest) -> Iterator[list[Member]]:
    """Two regions on /dev/shm, each served by its own target; cleaned up whatever happens."""
    monkeypatch.setenv("PMEMBLK_RUN_DIR", str(workdir / "run"))
    extra: tuple[str, ...] = getattr(request, "param", ())
    out = []
    for i in range(2):
        region = Path("/dev/shm") / f"pmemblk-md{i}-{workdir.name}.img"
        pmemblk("create", str(region), "--size", str(SIZE))
        image = [f"--testing-durable-image={region}.durable"] if extra else []
        target = vm_target(str(region), 7900 + i, workdir, *image).start()
        out.append(Member(f"m{i}", region, 7900 + i, target))
    try:
        yield out
    finally:
        run("umount", str(workdir / "mnt"), check=False)
        run("mdadm", "--stop", MD, check=False)
        for m in out:
            pmemblk("detach", "--force", m.name, check=False)
            m.target.stop()
            m.region.unlink(missing_ok=True)
            Path(f"{m.region}.durable").unlink(missing_ok=True)


def mdadm_create(level: int, devices: list[str]) -> None:
    run("mdadm", "--create", MD, "--run", "--metadata=1.2", f"--level={level}",
        f"--raid-devices={len(devices)}", *(["--bitmap=internal"] if level == 1 else []),
        *devices)
    run("mdadm", "--wait", MD, check=False)  # the initial resync (exit 1: nothing to wait for)


def assemble(devices: list[str]) -> None:
    """mdadm --assemble MD: udev may have assembled the members by itself as they appeared
    (incremental assembly, as /dev/md127): that array is stopped first."""
    run("udevadm", "settle", check=False)
    for dev in devices:
        for holder in Path(f"/sys/block/{os.path.basename(dev)}/holders").iterdir():
            run("mdadm", "--stop", f"/dev/{holder.name}")
    run("mdadm", "--assemble", MD, *devices)


def detail() -> str:
    return run("mdadm", "--detail", MD).stdout


def mismatches() -> int:
    """Ask md to compare the mirrors, and how many sectors differ."""
    Path("/sys/block/md0/md/sync_action").write_text("check\n")
    wait_until(lambda: Path("/sys/block/md0/md/sync_action").read_text().strip() == "idle",
               "md's check", timeout=600)
    return int(Path("/sys/block/md0/md/mismatch_cnt").read_text())


def test_raid1_survives_a_lost_target_and_resyncs_from_the_bitmap(
        members: list[Member], workdir: Path) -> None:
    a, b = members
    for m in members:  # a lost target fails its requests after 3 s: md then drops the member
        m.attach(workdir, "--reconnect-timeout", "3")
    mdadm_create(1, [a.device, b.device])
    mnt = workdir / "mnt"
    mnt.mkdir()
    run("mkfs.ext4", "-q", "-F", MD)
    run("mount", MD, str(mnt))
    job = ["fio", "--name=md", f"--directory={mnt}", "--rw=randwrite", "--bs=4k",
           "--size=16M", "--ioengine=libaio", "--iodepth=16", "--direct=1", "--verify=crc32c",
           "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
           "--fsync_on_close=1", "--output-format=json"]
    run(*job, "--create_only=1")
    run("sync")
    fio = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    written = Path("/sys/block/md0/stat")
    start = int(written.read_text().split()[6])
    wait_until(lambda: int(written.read_text().split()[6]) - start >= (4 << 20) // 512
               or fio.poll() is not None, "fio to get going", timeout=600)
    assert fio.poll() is None, "fio finished before the target was lost: make --size larger"
    lost_at = time.monotonic()
    b.target.kill()
    wait_until(lambda: "faulty" in b.md_state, "md to fail the lost member", timeout=300)
    failed_after = time.monotonic() - lost_at
    out, err = fio.communicate(timeout=900)
    assert fio.returncode == 0, out + err
    result = json.loads(out)["jobs"][0]
    assert result["error"] == 0
    assert "degraded" in detail()
    run("sync")
    sums = run("sha256sum", *(str(p) for p in sorted(mnt.glob("md.*")))).stdout

    # The target comes back: remove the failed member, attach it again, re-add it; the
    # write-intent bitmap makes the resync copy only what changed while it was away.
    b.target = b.target.restart()
    run("mdadm", MD, "--remove", b.device)
    res = pmemblk("detach", b.name, check=False)
    assert res.returncode == 1 and "final flush" in res.stderr, res.stderr  # it failed: say so
    pmemblk("detach", "--force", b.name)
    b.attach(workdir, "--reconnect-timeout", "3")
    started = time.monotonic()
    run("mdadm", MD, "--re-add", b.device)
    run("mdadm", "--wait", MD, check=False)
    resync = time.monotonic() - started
    # "active" until md's safe-mode delay passes with no writes, then "clean".
    wait_until(lambda: re.search(r"State : clean\s*$", detail(), re.M) is not None,
               "mdadm --detail to say clean", timeout=120)
    info = detail()
    assert re.search(r"Active Devices : 2", info), info
    assert mismatches() == 0
    run("umount", str(mnt))
    run("fsck.ext4", "-fn", MD)
    run("mount", MD, str(mnt))
    assert run("sha256sum", *(str(p) for p in sorted(mnt.glob("md.*")))).stdout == sums
    run("umount", str(mnt))
    report(f"md RAID1 over two targets: one SIGKILLed under fio --verify, md failed it after "
           f"{failed_after:.1f}s (reconnect-timeout 3), fio finished with 0 errors "
           f"({result['read']['io_bytes'] >> 20} MiB verified); back, re-added, bitmap "
           f"resync in {resync:.1f}s; mdadm --detail clean, 0 mismatches, fsck clean, "
           "checksums match")


@pytest.mark.parametrize("members", [("power-cut",)], indirect=True)
def test_raid1_power_cut_of_both_targets_keeps_every_fsynced_file(
        members: list[Member], workdir: Path) -> None:
    seed = int(os.environ.get("PMEMBLK_CRASH_SEED", "20261125"))
    rng = random.Random(seed)
    for m in members:  # the cut is permanent for these attachments: give up after a second
        m.attach(workdir, "--reconnect-timeout", "1")
    mdadm_create(1, [m.device for m in members])
    mnt = workdir / "mnt"
    mnt.mkdir()
    run("mkfs.ext4", "-q", "-F", MD)
    run("mount", MD, str(mnt))
    log = workdir / "fsynced.log"
    proc = subprocess.Popen([PY, WORKLOAD, str(mnt), str(log), str(seed)])
    want = rng.randint(3, 20)
    wait_until(lambda: len(logged(log)) >= want or proc.poll() is not None,
               f"{want} fsynced files", timeout=300)
    for m in members:  # the power cut, at both targets at once, whatever was in flight
        m.target.kill()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = logged(log)
    run("umount", str(mnt), check=False)  # the devices are failing: errors are expected
    run("mdadm", "--stop", MD)
    lost = 0
    for m in members:
        pmemblk("detach", "--force", m.name)
        cut = power_cut(str(m.region), f"{m.region}.durable", keep=rng.random(),
                        seed=rng.randrange(1 << 30))
        lost += cut.lost_words
        m.target = m.target.restart()
        m.attach(workdir)
    # No mdadm --wait: after an unclean stop the resync stays pending until the first write.
    assemble([m.device for m in members])
    run("mount", MD, str(mnt))  # replays the journal
    for name, digest in before.items():
        assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
    run("umount", str(mnt))
    run("fsck.ext4", "-fn", MD)
    report(f"md RAID1 power cut of both targets after {len(before)} fsynced files "
           f"({lost} unpersisted 8-byte words reverted): assembled, journal replayed, fsck "
           f"clean, {len(before)}/{len(before)} fsynced files intact")


def test_raid0_across_two_targets_fio_verify(members: list[Member], workdir: Path) -> None:
    for m in members:
        m.attach(workdir)
    mdadm_create(0, [m.device for m in members])
    res = run("fio", "--name=raid0", f"--filename={MD}", "--rw=randwrite", "--bs=4k",
              "--size=24M", "--ioengine=libaio", "--iodepth=16", "--direct=1",
              "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
              "--output-format=json")
    result = json.loads(res.stdout)["jobs"][0]
    assert result["error"] == 0
    stats = [json.loads(pmemblk("status", m.name, "--json").stdout) for m in members]
    writes = [s["ops"]["write"]["requests"] for s in stats]
    assert all(w > 0 for w in writes), writes  # both targets took writes
    report(f"md RAID0 over two targets: fio randwrite 24 MiB verified, errors=0; writes per "
           f"target {writes[0]} and {writes[1]}")
