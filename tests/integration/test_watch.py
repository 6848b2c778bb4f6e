"""``pmemblk status --watch`` on the host: against a real attachment (--no-device) and a real
target's control socket; a bounded number of refreshes, and a clean end when the source goes."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import nbd

from pmemblk.watch import Sample, frame

from ..procs import PY, Target, pmemblk
from .conftest import needs_nbdkit

pytestmark = needs_nbdkit


def test_rates_are_the_differences_over_the_interval() -> None:
    before = Sample({"write": (100, 409600, 50.0)}, 0, "d")
    after = Sample({"write": (300, 1228800, 75.5)}, 2, "d")
    text = frame(before, after, 2.0)
    row = next(ln.split() for ln in text.splitlines() if ln.strip().startswith("write"))
    assert row == ["write", "100", "0.41", "75.5"]  # 200 requests, 819200 bytes in 2 s
    assert "2 reconnects" in text
    first = frame(None, after, 0.0).splitlines()[-1].split()
    assert first == ["write", "-", "-", "75.5"]  # no rate before a second sample


def test_watch_a_device_for_two_refreshes(region: str, run_dir: Path, tmp_path: Path) -> None:
    target = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, transport="tcp").start()
    uri = pmemblk("attach", target.listen, "--no-device", "--name", "w").stdout.strip()
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(8):
        h.pwrite(b"x" * 4096, i * 4096)
    h.flush()
    res = pmemblk("status", "w", "--watch", "--count", "2")
    assert res.returncode == 0
    assert res.stderr.strip() == "pmemblk: 2 refreshes"
    frames = [f for f in res.stdout.split("\n\n") if f.strip()]
    assert len(frames) == 2, res.stdout
    assert frames[0].startswith("w: ") and "0 reconnects" in frames[0]
    write = [ln.split() for ln in frames[1].splitlines() if ln.split()[:1] == ["write"]]
    assert write and write[0][1] == "0", frames[1]  # nothing written between the refreshes
    assert write[0][3] != "-"  # the p99 of the 8 writes
    bad = pmemblk("status", "w", "--watch", "--json", check=False)
    assert bad.returncode == 1 and "--watch shows the table" in bad.stderr
    h.shutdown()
    pmemblk("detach", "w")
    target.stop()


def _watcher(control: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, "-m", "pmemblk", "status", "--target", str(control),
                             "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_watch_ends_cleanly_on_ctrl_c_and_when_the_target_goes(region: str, tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    target = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, "--control", str(control),
                    transport="tcp").start()
    # Ctrl-C: exit 0, one line, no traceback.
    watcher = _watcher(control)
    assert watcher.stdout is not None and watcher.stdout.readline().startswith("target ")
    watcher.send_signal(signal.SIGINT)
    _, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0 and err.strip() == "pmemblk: stopped", err
    proc = _watcher(control)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first frame is out: the watch is running
        assert first.startswith("target "), first
        target.stop()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"pmemblk: the target at {control} is gone: "), err
    assert "Traceback" not in err
