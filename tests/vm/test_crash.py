"""ext4 on /dev/nbd0 (over rxe) through an emulated power cut at the target."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from pmemblk.powercut import power_cut

from ..conftest import report
from ..procs import PY, NbdDevice, Nbdkit, mounted, pmemblk, run, wait_until
from .harness import vm_target

WORKLOAD = str(Path(__file__).with_name("fsync_workload.py"))


def logged(log: Path) -> dict[str, str]:
    if not log.exists():
        return {}
    lines = [x.split() for x in log.read_text().splitlines() if x.strip()]
    return {name: digest for name, digest in lines}


@pytest.mark.parametrize("write_back", ["partial", "none"])
def test_ext4_power_cut_keeps_every_fsynced_file(workdir: Path, write_back: str) -> None:
    """write_back: a random share of unpersisted words reached media, or none did."""
    seed = int(os.environ.get("PMEMBLK_CRASH_SEED", "20261124")) + (write_back == "none")
    region = Path("/dev/shm") / f"pmemblk-crash-{seed}.img"
    try:
        pmemblk("create", str(region), "--size", "128M")
        power_cut_story(region, workdir, seed, write_back, "gpspm")
    finally:
        region.unlink(missing_ok=True)


def power_cut_story(region: Path, workdir: Path, seed: int, write_back: str, flush: str,
                    *keys: str) -> None:
    """ext4 over ``flush``, a workload that logs each file once fsynced, a power cut at a
    random point, and every logged file must be intact after the journal replays."""
    rng = random.Random(seed)
    image = Path("/dev/shm") / f"pmemblk-crash-{seed}.durable"
    image.unlink(missing_ok=True)
    try:
        target = vm_target(str(region), 7180, workdir, "--testing-durable-image",
                           str(image)).start()
        # The power cut is permanent for this client: it gives up after a second.
        server = Nbdkit(workdir, *target.keys, "reconnect-timeout=1", f"flush={flush}",
                        *keys).start()
        dev = NbdDevice().attach(server)
        run("mkfs.ext4", "-q", "-F", dev.dev)
        mnt = workdir / "mnt"
        mnt.mkdir()
        run("mount", dev.dev, str(mnt))
        log = workdir / "fsynced.log"
        proc = subprocess.Popen([PY, WORKLOAD, str(mnt), str(log), str(seed)])
        want = rng.randint(3, 25)
        wait_until(lambda: len(logged(log)) >= want or proc.poll() is not None,
                   f"{want} fsynced files", timeout=300)
        target.kill()  # the power cut: mid-workload, whatever was in flight
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = logged(log)
        run("umount", str(mnt), check=False)  # the device is failing: errors are expected
        dev.detach()
        server.stop()
        keep = rng.random() if write_back == "partial" else 0.0
        cut = power_cut(str(region), str(image), keep=keep, seed=seed)
        cut_line = (f"ext4 power cut (flush={flush}, seed {seed}, write-back {write_back}): "
                    f"after {len(before)} fsynced files, {cut.unpersisted_words} unpersisted "
                    f"8-byte words, {cut.kept_words} kept")

        target = target.restart()
        server = Nbdkit(workdir, *target.keys, f"flush={flush}", *keys).start()
        dev = NbdDevice().attach(server)
        try:
            with mounted(dev, mnt):  # mounting replays the journal
                for name, digest in before.items():
                    data = (mnt / name).read_bytes()
                    assert hashlib.sha256(data).hexdigest() == digest, f"{name} damaged"
            fsck = run("fsck.ext4", "-fn", dev.dev)
            assert fsck.returncode == 0
            report(f"{cut_line}; journal replayed, fsck clean, {len(before)}/{len(before)} "
                   "fsynced files intact, 0 lost")
        finally:
            dev.detach()
            server.stop()
            target.stop()
    finally:
        image.unlink(missing_ok=True)
        Path(f"{image}.native").unlink(missing_ok=True)
