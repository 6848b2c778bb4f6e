"""Reconnect: the client rides out a target restart, and says so when it must not."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pmemblk.client import Client
from pmemblk.errors import GaveUp

from ..conftest import ROOT, report
from ..procs import PLUGIN, Target, pmemblk
from .conftest import needs_nbdkit, plugin_client, read

WORKLOAD = str(ROOT / "tests" / "integration" / "workload.py")


def client(target: Target, reconnect_timeout: float = 60) -> Client:
    return plugin_client(target, "gpspm", reconnect_timeout, 1 if reconnect_timeout < 10 else 10)


@needs_nbdkit
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_workload_rides_out_a_target_restart(target: Target, tmp_path: Path, how: str) -> None:
    """The target dies in the middle of a model-checked workload and comes back: the requests
    in flight are issued again and the workload finishes with every read matching."""
    log = tmp_path / f"nbdkit-{how}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            ["nbdkit", "-U", "-", "python", PLUGIN, *target.keys, "--run",
             f'{sys.executable} {WORKLOAD} "$uri" --seed 7 --ops 1200 --announce 300'],
            stdout=subprocess.PIPE, stderr=err, text=True)
    restarted = None
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "at op 300"
        target.stop(getattr(signal, how))
        restarted = target.restart()
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + log.read_text()
        assert "0 mismatches" in out
        text = log.read_text()
        assert "reconnected to the target" in text, text
        report(f"target {how} + restart during a verified workload: {out.strip()}; "
               f"{text.count('reconnected to the target')} reconnect(s)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restarted is not None:
            restarted.stop()


def test_power_cut_while_writes_are_unflushed_fails_the_next_flush(region: str,
                                                                    tmp_path: Path) -> None:
    image = tmp_path / "durable.img"
    t = Target(region, f"unix:{tmp_path / 'pc.sock'}", tmp_path, "--testing-durable-image",
               str(image), transport="tcp").start()
    flushed, unflushed = os.urandom(8192), os.urandom(8192)
    c = client(t)
    try:
        c.pwrite(memoryview(flushed), 0)
        c.flush()
        c.pwrite(memoryview(unflushed), 1 << 20)  # acknowledged, never flushed
        t.kill()
        pmemblk("testing-power-cut", region, "--durable-image", str(image), "--keep", "0")
        t = t.restart()
        assert read(c, 0, 8192) == flushed  # reconnected: flushed data is there
        for _ in range(2):  # and stays an error: the loss cannot be taken back
            with pytest.raises(GaveUp, match="loss epoch 0 → 1") as exc:
                c.flush()
            assert exc.value.errno == errno.EIO
        assert "loss epoch now 1" in t.log()
        c.close()
        t.wait_log("disconnected after")
        with client(t) as fresh:  # a new connection starts with a clean slate
            fresh.pwrite(memoryview(b"new"), 0)
            fresh.flush()
    finally:
        c.close()
        t.stop()


def test_a_killed_target_loses_nothing_so_the_flush_succeeds(region: str,
                                                             tmp_path: Path) -> None:
    """The control for the test above: a killed process (same boot) keeps every write."""
    t = Target(region, f"unix:{tmp_path / 'k.sock'}", tmp_path, transport="tcp").start()
    data = os.urandom(8192)
    c = client(t)
    try:
        c.pwrite(memoryview(data), 1 << 20)  # not flushed
        t.kill()
        t = t.restart()
        c.flush()  # reconnects and commits the range on the new target
        assert read(c, 1 << 20, 8192) == data
        assert c.reconnects == 1 and c.lost is None
        assert "in this same boot" in t.log()
    finally:
        c.close()
        t.stop()


def test_io_fails_with_eio_after_the_reconnect_timeout(target: Target) -> None:
    c = client(target, reconnect_timeout=1)
    try:
        c.pwrite(memoryview(b"x" * 4096), 0)
        target.stop()
        with pytest.raises(GaveUp, match="did not come back within 1s") as exc:
            read(c, 0, 4096)
        assert exc.value.errno == errno.EIO
        target.restart().stop()  # too late: the connection has given up for good
        with pytest.raises(GaveUp, match="did not come back") as again:
            c.flush()
        assert again.value.errno == errno.EIO
    finally:
        c.close()


def test_a_hung_target_gives_eio_not_a_hang(target: Target) -> None:
    """A stopped (not dead) target: every attempt times out, then the request fails."""
    c = client(target, reconnect_timeout=2)
    assert target.proc is not None
    try:
        c.pwrite(memoryview(b"x" * 4096), 0)
        os.kill(target.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(GaveUp, match="did not come back within 2s") as exc:
                c.flush()
            assert exc.value.errno == errno.EIO
        finally:
            os.kill(target.proc.pid, signal.SIGCONT)
    finally:
        c.close()


def test_a_target_now_serving_another_region_is_refused(target: Target, tmp_path: Path) -> None:
    c = client(target)
    try:
        c.pwrite(memoryview(b"x" * 4096), 0)
        target.kill()
        other = tmp_path / "other.img"
        pmemblk("create", str(other), "--size", str(64 << 20))
        imposter = Target(str(other), target.listen, tmp_path, transport="tcp").start()
        try:
            for _ in range(2):
                with pytest.raises(GaveUp, match="now serves region") as exc:
                    read(c, 0, 4096)
                assert exc.value.errno == errno.EIO
        finally:
            imposter.stop()
    finally:
        c.close()
