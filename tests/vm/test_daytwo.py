"""Day two in the VM: attach → mkfs → mount → write → status → target restart → status shows
the reconnect → detach leaves nothing; failed attaches leave nothing; read-only multi-conn."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from ..conftest import report
from ..procs import our_nbdkits, pmemblk, run, wait_until
from .harness import ADDR, secret_file, vm_target

SIZE = 128 << 20


def status(name: str) -> dict[str, Any]:
    value = json.loads(pmemblk("status", name, "--json").stdout)
    assert isinstance(value, dict)
    return value


def nothing_left(run_dir: Path, device: str) -> None:
    name = os.path.basename(device)
    assert not Path(f"/sys/block/{name}/pid").exists(), f"{device} is still connected"
    assert not [p for p in run_dir.glob("*") if p.name != ".lock"], list(run_dir.iterdir())
    assert our_nbdkits(run_dir) == [], "nbdkit still running"


def test_attach_mkfs_status_restart_detach(shm_region: Path, workdir: Path,
                                           run_dir: Path) -> None:
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    control = workdir / "target.ctl"
    target = vm_target(str(shm_region), 7800, workdir, "--control", str(control)).start()
    secret = str(secret_file(workdir))
    device = pmemblk("attach", f"{ADDR}:7800", "--secret-file", secret,
                     "--name", "data").stdout.strip()
    assert device.startswith("/dev/nbd"), device
    assert int(Path(f"/sys/block/{os.path.basename(device)}/size").read_text()) > 0
    mnt = workdir / "mnt"
    mnt.mkdir()
    run("mkfs.ext4", "-q", "-F", device)
    run("mount", device, str(mnt))
    try:
        run("dd", "if=/dev/urandom", f"of={mnt}/a", "bs=1M", "count=8", "conv=fsync")
        st = status("data")
        assert st["transport"] == "verbs" and st["persistent"] is True, st
        assert st["ops"]["write"]["requests"] > 0 and st["ops"]["flush"]["requests"] > 0
        assert st["ops"]["write"]["p99_us"] is not None
        report(f"attach: {device} over {st['transport']}, flush={st['flush']}; after mkfs "
               f"and 8 MiB: {st['ops']['write']['requests']} writes, p50/p99/p99.9 "
               f"{st['ops']['write']['p50_us']}/{st['ops']['write']['p99_us']}/"
               f"{st['ops']['write']['p99.9_us']} µs, {st['ops']['flush']['requests']} flushes")
        kernel = st["kernel"]  # what the kernel decided, as attach checked it
        assert kernel["write_cache"] == "write back" and kernel["fua"] is True, kernel
        assert kernel["connections"] == 1 and kernel["timeout_s"], kernel
        assert "kernel:       write cache write back, FUA on" in pmemblk("status", "data").stdout
        report(f"attach: the kernel's view of {device}: {kernel}")
        tgt = json.loads(pmemblk("status", "--target", str(control), "--json").stdout)
        (client,) = tgt["clients"]
        assert client["transport"] == "verbs" and client["mode"] == "read-write"

        res = pmemblk("detach", "data", check=False)
        assert res.returncode == 1 and "mounted on" in res.stderr, res.stderr

        target.stop(signal.SIGKILL)
        target = target.restart()
        run("dd", "if=/dev/urandom", f"of={mnt}/b", "bs=1M", "count=4", "conv=fsync")
        st = status("data")
        assert st["reconnects"] == 1 and st["state"] == "connected", st
        report(f"attach: target SIGKILLed and restarted under ext4: status shows "
               f"{st['reconnects']} reconnect(s), state {st['state']}")
        checksum = run("sha256sum", f"{mnt}/a", f"{mnt}/b").stdout
    finally:
        run("umount", str(mnt), check=False)
    out = pmemblk("detach", "data").stdout
    assert "detached data" in out
    nothing_left(run_dir, device)

    # Attached again, the files are there and fsck is clean.
    device = pmemblk("attach", f"{ADDR}:7800", "--secret-file", secret,
                     "--name", "again").stdout.strip()
    run("fsck.ext4", "-fn", device)
    run("mount", device, str(mnt))
    try:
        assert run("sha256sum", f"{mnt}/a", f"{mnt}/b").stdout == checksum
    finally:
        run("umount", str(mnt))
    pmemblk("detach", device)
    nothing_left(run_dir, device)
    report("attach: detach left no process, socket or device; re-attached: fsck clean, "
           "checksums match")
    target.stop()


def test_failed_attach_leaves_nothing_in_the_vm(shm_region: Path, workdir: Path,
                                                run_dir: Path) -> None:
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    target = vm_target(str(shm_region), 7801, workdir).start()
    wrong = workdir / "wrong.secret"
    pmemblk("secret", str(wrong))
    for args in (["--secret-file", str(wrong)], ["--device", "/dev/nbd999"]):
        res = pmemblk("attach", f"{ADDR}:7801", *args, check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        nothing_left(run_dir, "/dev/nbd0")
    res = pmemblk("attach", f"{ADDR}:7899", "--secret-file", str(secret_file(workdir)),
                  check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    nothing_left(run_dir, "/dev/nbd0")
    # A second read-write attach of a non-shared export: nbdkit starts, the kernel client is
    # refused; the error says why (from the plugin's log), and only the first one remains.
    secret = str(secret_file(workdir))
    first = pmemblk("attach", f"{ADDR}:7801", "--secret-file", secret,
                    "--name", "first").stdout.strip()
    res = pmemblk("attach", f"{ADDR}:7801", "--secret-file", secret, "--name", "second",
                  check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "read-write" in res.stderr, res.stderr
    assert [p.name for p in run_dir.glob("*") if p.name != ".lock"] == ["first"]
    # The second's nbdkit had started: undoing the attach stopped it (only the first's runs).
    kept = our_nbdkits(run_dir)
    assert len(kept) == 1 and str(run_dir / "first") in Path(f"/proc/{kept[0]}/cmdline"
                                                             ).read_text(), kept
    pmemblk("detach", "first")
    nothing_left(run_dir, first)
    report("attach: wrong secret, missing device, unreachable target, a second writer: one "
           "line each, nothing left")

    # Read-only, two connections (multi-conn): the kernel spreads reads over both.
    device = pmemblk("attach", f"{ADDR}:7801", "--secret-file", secret, "--readonly",
                     "--connections", "2", "--name", "ro").stdout.strip()
    run("dd", f"if={device}", "of=/dev/null", "bs=1M", "count=32", "iflag=direct")
    wait_until(lambda: status("ro")["connections"] == 2, "two NBD connections")
    assert status("ro")["readonly"] is True
    pmemblk("detach", "ro")
    nothing_left(run_dir, device)
    target.stop()


def test_an_nbd_client_that_hangs_is_one_line_and_leaves_nothing(
        shm_region: Path, workdir: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nbd-client stuck (here: a wrapper that never returns, first on PATH) until attach's
    deadline: one line, its nbdkit stopped, the device free (it was a traceback, with
    subprocess.TimeoutExpired, and nbdkit left running)."""
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    target = vm_target(str(shm_region), 7802, workdir).start()
    real = run("sh", "-c", "command -v nbd-client").stdout.strip()
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    (bin_dir / "nbd-client").write_text(
        f'#!/bin/sh\n[ "$1" = -d ] && exec {real} "$@"\nexec sleep 600\n')
    (bin_dir / "nbd-client").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    res = pmemblk("attach", f"{ADDR}:7802", "--secret-file", str(secret_file(workdir)),
                  "--device", "/dev/nbd0", check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr and "did not connect /dev/nbd0 within" in res.stderr
    nothing_left(run_dir, "/dev/nbd0")
    report("attach: an nbd-client that hangs: one line at the deadline, nothing left")
    target.stop()


def test_a_kernel_that_will_not_send_flush_is_refused_and_leaves_nothing(
        shm_region: Path, workdir: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export offers FLUSH and FUA, but the device's queue is write-through (here: a
    wrapper, first on PATH, runs the real nbd-client and then writes "write through" to the
    queue's write_cache, as a udev rule or an old nbd-client would leave it): fsync would never
    reach the target. attach refuses in one line naming the setting; the device is
    disconnected and its nbdkit stopped."""
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    target = vm_target(str(shm_region), 7803, workdir).start()
    real = run("sh", "-c", "command -v nbd-client").stdout.strip()
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    (bin_dir / "nbd-client").write_text(
        f'#!/bin/sh\n{real} "$@" || exit $?\n[ "$1" = -d ] && exit 0\n'
        "echo 'write through' > /sys/block/nbd0/queue/write_cache\n")
    (bin_dir / "nbd-client").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    res = pmemblk("attach", f"{ADDR}:7803", "--secret-file", str(secret_file(workdir)),
                  "--device", "/dev/nbd0", check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "will not send FLUSH to /dev/nbd0" in res.stderr and "write_cache" in res.stderr
    assert "Traceback" not in res.stderr
    nothing_left(run_dir, "/dev/nbd0")
    report(f"attach: a write-through kernel queue refused: {res.stderr.strip()}")
    target.stop()
