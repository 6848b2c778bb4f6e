"""Day two on the host: attach --no-device, status (client and target, JSON and Prometheus),
detach, list, and what a failed attach leaves (nothing). The kernel-device half is in
tests/vm/test_daytwo.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import nbd
import pytest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ..procs import PY, Target, our_nbdkits, pmemblk, run
from .conftest import needs_nbdkit

pytestmark = needs_nbdkit


def families(text: str) -> dict[str, Metric]:
    """Prometheus' own parser reads what we wrote (it fails on malformed text)."""
    parsed = text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    return {f.name: f for f in parsed}


def status(name: str) -> dict[str, Any]:
    value = json.loads(pmemblk("status", name, "--json").stdout)
    assert isinstance(value, dict)
    return value


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("pmemblk: error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_attach_io_status_reconnect_detach(target: Target, run_dir: Path,
                                           tmp_path: Path) -> None:
    uri = pmemblk("attach", target.listen, "--no-device", "--name", "d0").stdout.strip()
    assert uri == f"nbd+unix:///?socket={run_dir / 'd0' / 'nbd.sock'}"
    folder = run_dir / "d0"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "control.sock").stat().st_mode) == 0o600
    h = nbd.NBD()
    h.connect_uri(uri)
    data = os.urandom(1 << 20)
    for i in range(8):
        h.pwrite(data, i << 20)
    h.flush()
    assert h.pread(1 << 20, 3 << 20) == data

    st = status("d0")
    print("status after I/O:", json.dumps(st["ops"]))
    assert st["transport"] == "tcp" and st["flush"] == "gpspm" and st["persistent"] is True
    assert st["connections"] == 1 and st["state"] == "connected"
    assert st["ops"]["write"]["requests"] == 8 and st["ops"]["write"]["bytes"] == 8 << 20
    assert st["ops"]["read"]["requests"] == 1 and st["ops"]["flush"]["requests"] == 1
    for pct in ("p50_us", "p99_us", "p99.9_us"):
        assert st["ops"]["write"][pct] > 0
    assert st["ops"]["write"]["p50_us"] <= st["ops"]["write"]["p99_us"]
    human = pmemblk("status", "d0").stdout
    assert "gpspm (persistent)" in human and "write" in human
    listed = pmemblk("list").stdout
    assert "d0" in listed and target.listen in listed

    # The target restarts: the plugin reconnects, and status counts it.
    target.stop()
    target = target.restart()
    assert h.pread(1 << 20, 0) == data
    st = status("d0")
    assert st["reconnects"] == 1 and st["state"] == "connected"
    h.shutdown()

    out = pmemblk("detach", "d0").stdout
    assert "detached d0" in out
    assert not folder.exists(), list(folder.iterdir())
    assert our_nbdkits(run_dir) == []
    assert pmemblk("list").stdout.strip() == "nothing attached"
    target.stop()


def test_prometheus_text_from_device_and_target(region: str, run_dir: Path,
                                                tmp_path: Path) -> None:
    control = tmp_path / "target-control.sock"
    target = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, "--control", str(control),
                    transport="tcp").start()
    assert stat.S_IMODE(control.stat().st_mode) == 0o600
    uri = pmemblk("attach", target.listen, "--no-device", "--name", "prom").stdout.strip()
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"x" * 4096, 0)
    h.flush()

    text = pmemblk("status", "prom", "--prometheus").stdout
    client = families(text)
    writes = [s for s in client["pmemblk_client_requests"].samples
              if s.labels["op"] == "write" and s.name.endswith("_total")]
    assert writes[0].value == 1 and writes[0].labels["device"] == "prom"
    buckets = [s for s in client["pmemblk_client_request_seconds"].samples
               if s.labels["op"] == "write" and s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 1

    textfile = tmp_path / "pmemblk.prom"
    pmemblk("status", "prom", "--textfile", str(textfile))
    assert "pmemblk_client_requests_total" in textfile.read_text()
    assert [p.name for p in tmp_path.glob(".pmemblk-*")] == []  # no temporary left

    st = json.loads(pmemblk("status", "--target", str(control), "--json").stdout)
    assert st["totals"]["commits"] == 1 and st["totals"]["writes"] == 1
    (session,) = st["clients"]
    assert session["mode"] == "read-write" and session["transport"] == "tcp"
    assert session["commits"] == 1 and session["write_bytes"] == 4096
    text = pmemblk("status", "--target", str(control), "--prometheus").stdout
    target_families = families(text)
    assert target_families["pmemblk_target_commits"].samples[0].value == 1
    assert target_families["pmemblk_target_clients"].samples[0].value == 1
    h.shutdown()
    pmemblk("detach", "prom")
    target.stop()
    assert not control.exists()  # removed by the target that made it


def test_failed_attach_leaves_nothing(target: Target, run_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "wrong.secret"
    pmemblk("secret", str(secret))
    cases = {
        "unreachable": ["unix:" + str(tmp_path / "nobody.sock"), "--no-device"],
        "wrong secret": [target.listen, "--no-device", "--secret-file", str(secret)],
        "bad name": [target.listen, "--no-device", "--name", "../x"],
        "bad device": [target.listen, "--device", "/dev/sda"],
        "no connections": [target.listen, "--no-device", "--connections", "0"],
        "no threads": [target.listen, "--no-device", "--threads", "0"],
    }
    for what, args in cases.items():
        line = one_line(pmemblk("attach", *args, check=False))
        print(f"{what}: {line}")
        assert not [p for p in run_dir.glob("*") if p.name != ".lock"], what
        assert our_nbdkits(run_dir) == [], what
    # A name in use is refused, and the first attachment is untouched.
    pmemblk("attach", target.listen, "--no-device", "--name", "same")
    line = one_line(pmemblk("attach", target.listen, "--no-device", "--name", "same",
                            check=False))
    assert "exists already" in line
    assert len(our_nbdkits(run_dir)) == 1
    pmemblk("detach", "same")
    assert our_nbdkits(run_dir) == []


def test_attach_without_the_nbd_module_says_so(target: Target, run_dir: Path) -> None:
    if os.path.isdir("/sys/module/nbd"):
        pytest.skip("the nbd module is loaded here: tests/vm/test_daytwo.py covers the device")
    line = one_line(pmemblk("attach", target.listen, check=False))
    assert "modprobe nbd" in line and "--no-device" in line
    assert not run_dir.exists() or not [p for p in run_dir.iterdir() if p.name != ".lock"]


def test_detach_and_status_of_unknown_names(run_dir: Path) -> None:
    assert "no attachment is called" in one_line(pmemblk("detach", "nope", check=False))
    assert "nothing is attached" in one_line(pmemblk("status", check=False))
    assert "nothing answers" in one_line(pmemblk("status", "--target", "/nonexistent.sock",
                                                 check=False))


def test_detach_after_nbdkit_died(target: Target, run_dir: Path) -> None:
    """nbdkit killed behind attach's back: list says so, detach cleans up with a warning."""
    pmemblk("attach", target.listen, "--no-device", "--name", "gone")
    (pid,) = our_nbdkits(run_dir)
    os.kill(pid, signal.SIGKILL)
    run("sh", "-c", f"while [ -d /proc/{pid} ] && ! grep -q '^State:.*Z' /proc/{pid}/status; "
        "do sleep 0.05; done")
    assert "nbdkit is not running" in pmemblk("list").stdout
    res = pmemblk("detach", "gone")
    assert "nbdkit was not running any more" in res.stderr
    assert not (run_dir / "gone").exists()


def test_install_plugin_runs_under_nbdkit(tmp_path: Path) -> None:
    """The installed file is what `nbdkit pmemblk` runs (nbdkit execs its #! line); the man
    pages are installed beside, where man finds them."""
    (tmp_path / "man").mkdir()
    out = pmemblk("install-plugin", "--plugindir", str(tmp_path), "--mandir",
                  str(tmp_path / "man")).stdout
    for page in ("man8/pmemblk.8", "man1/nbdkit-pmemblk-plugin.1"):
        assert f"installed {tmp_path / 'man' / page}\n" in out
        assert (tmp_path / "man" / page).read_text().startswith(".TH ")
    installed = tmp_path / "nbdkit-pmemblk-plugin"
    assert f"installed {installed}:" in out and os.access(installed, os.X_OK)
    assert installed.read_text().startswith("#!")
    res = run(str(installed), "--dump-plugin")
    from pmemblk import __version__
    from pmemblk.plugin_instance import KEYS
    assert f"pmemblk_version={__version__}" in res.stdout
    assert f"pmemblk_keys={','.join(KEYS)}" in res.stdout


def test_version_has_one_source() -> None:
    from importlib.metadata import version

    from pmemblk import __version__
    assert version("pmemblk") == __version__
    assert run(PY, "-m", "pmemblk", "--version").stdout.strip() == f"pmemblk {__version__}"


def test_systemd_units_verify(tmp_path: Path) -> None:
    if subprocess.run(["systemd-analyze", "--version"], capture_output=True).returncode != 0:
        pytest.skip("systemd-analyze is not installed")
    units = tmp_path / "units"
    units.mkdir()
    out = pmemblk("install-units", "--unit-dir", str(units)).stdout
    assert out.count("installed") == 2
    for name in ("pmemblk-serve@.service", "pmemblk-attach@.service"):
        text = (units / name).read_text()
        assert "@PMEMBLK@" not in text
        instance = units / name.replace("@.", "@r1.")
        instance.symlink_to(units / name)
    res = subprocess.run(["systemd-analyze", "verify", "--man=no",
                          *(str(p) for p in sorted(units.glob("*@r1.service")))],
                         capture_output=True, text=True, cwd=units)
    print(res.stdout, res.stderr)
    problems = [ln for ln in res.stderr.splitlines()
                if "pmemblk" in ln and "EnvironmentFile" not in ln]
    assert res.returncode == 0 and not problems, res.stderr


def test_an_attach_whose_nbdkit_cannot_start_leaves_nothing(
        target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target answers, so nbdkit is started; it cannot listen (the run directory is too
    deep for a socket path): one line, and the directory attach made is gone again."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("PMEMBLK_RUN_DIR", str(deep))
    line = one_line(pmemblk("attach", target.listen, "--no-device", "--name", "deep",
                            check=False))
    print(line)
    assert "nbdkit did not start" in line
    assert not (deep / "deep").exists()
    assert our_nbdkits(deep) == []


def test_control_socket_outlasts_silent_and_garbage_askers(region: str, tmp_path: Path) -> None:
    """Askers that say nothing, or send garbage, delay status by a second each at most; a
    bogus request gets a one-line answer; the target goes on."""
    import socket

    control = tmp_path / "ctl.sock"
    target = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, "--control", str(control),
                    transport="tcp").start()
    held = []
    try:
        for _ in range(3):  # silent: connect, never send
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(control))
            held.append(s)
        garbage = socket.socket(socket.AF_UNIX)
        garbage.connect(str(control))
        garbage.sendall(b"\x00" * 4096)  # no newline, more than a request may be
        held.append(garbage)
        st = json.loads(pmemblk("status", "--target", str(control), "--json").stdout)
        assert st["region"] == region
        bogus = socket.socket(socket.AF_UNIX)
        bogus.connect(str(control))
        bogus.sendall(b"shutdown\n")
        assert bogus.makefile("rb").read().startswith(b"error: unknown request 'shutdown'")
        bogus.close()
    finally:
        for s in held:
            s.close()
        target.stop()


def test_attach_runs_nbdkit_with_the_threads_asked_for(target: Target, run_dir: Path) -> None:
    """Each nbdkit worker thread gets a channel of its own: the count is the operator's to
    choose (docs/benchmarks.md has what it changes)."""
    for args, want in ((["--threads", "3"], b"--threads=3"),
                       (["--connections", "4"], b"--threads=2")):  # 8 in all, by default
        pmemblk("attach", target.listen, "--no-device", "--name", "t", *args)
        pids = our_nbdkits(run_dir)
        assert len(pids) == 1
        assert want in Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0"), args
        pmemblk("detach", "t")

