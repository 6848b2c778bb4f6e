"""nbdkit + plugin + a TCP target, driven with libnbd, fio and nbdinfo."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import ROOT, report
from ..procs import PLUGIN, Nbdkit, Target, pmemblk
from .conftest import SIZE, needs_nbdkit

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
pytestmark = needs_nbdkit
EXPORT = SIZE - 4096
WORKLOAD = str(ROOT / "tests" / "integration" / "workload.py")


def captive(target: Target, run_cmd: str, *keys: str) -> subprocess.CompletedProcess[str]:
    """nbdkit -U - ... --run CMD: the idiomatic captive server."""
    return subprocess.run(
        ["nbdkit", "-U", "-", "python", PLUGIN, *target.keys, *keys,
         "--run", run_cmd], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("flush", "seed"), [("gpspm", 1), ("apm", 2), ("gpspm", 3)])
def test_random_workload_matches_a_model(target: Target, flush: str, seed: int) -> None:
    keys = [f"flush={flush}"] + (["allow-visibility-only=true"] if flush == "apm" else [])
    res = captive(target, f'{sys.executable} {WORKLOAD} "$uri" --seed {seed} --ops 1500', *keys)
    report(res.stdout.strip())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 mismatches" in res.stdout


def errno_of(exc: Any) -> int:
    """libnbd's Error.errno is the errno's name in this version, a number in others."""
    value = exc.errno
    return int(getattr(errno, value)) if isinstance(value, str) else int(value)


@pytest.fixture
def connect() -> Iterator[Callable[[Nbdkit], Any]]:
    """Open libnbd handles; every one is shut down afterwards (nbdkit waits for clients)."""
    handles: list[Any] = []

    def open_handle(server: Nbdkit) -> Any:
        h = nbd.NBD()
        h.connect_uri(server.uri)
        handles.append(h)
        return h

    yield open_handle
    for h in handles:
        disconnect(h)


def disconnect(h: Any) -> None:
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def test_fua_and_flush_and_zero(nbd_server: Nbdkit, connect: Callable[[Nbdkit], Any]) -> None:
    h = connect(nbd_server)
    assert h.get_size() == EXPORT
    assert h.can_fua() and h.can_flush() and h.can_zero() and not h.can_trim()
    assert h.can_multi_conn()  # every connection of one nbdkit is one client
    h.pwrite(b"fua!" * 1024, 8192, nbd.CMD_FLAG_FUA)
    h.zero(100, 8200, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(4096, 8192) == b"fua!" * 2 + bytes(100) + (b"fua!" * 1024)[108:]


def test_requests_past_the_end_fail_cleanly(nbd_server: Nbdkit,
                                            connect: Callable[[Nbdkit], Any]) -> None:
    h = connect(nbd_server)
    h.set_strict_mode(0)  # let the requests reach the server
    calls: list[Callable[[], object]] = [
        lambda: h.pread(4096, EXPORT - 1024),
        lambda: h.pwrite(b"x" * 10, EXPORT),
        lambda: h.zero(1, EXPORT),
    ]
    for call in calls:
        with pytest.raises(nbd.Error) as exc:
            call()
        assert errno_of(exc.value) in (errno.EINVAL, errno.ENOSPC)
    h.pwrite(b"still fine", 0)  # the connection is still usable
    assert h.pread(10, 0) == b"still fine"


def test_readonly_export_refuses_writes_with_eperm(region: str, tmp_path: Path,
                                                   connect: Callable[[Nbdkit], Any]) -> None:
    target = Target(region, f"unix:{tmp_path / 'ro.sock'}", tmp_path, "--readonly",
                    transport="tcp").start()
    server = Nbdkit(tmp_path, *target.keys).start()
    try:
        h = connect(server)
        assert h.is_read_only()
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as exc:
            h.pwrite(b"x" * 512, 0)
        assert errno_of(exc.value) == errno.EPERM
        assert h.pread(512, 0) == bytes(512)
        disconnect(h)
    finally:
        server.stop()
        target.stop()


def test_readonly_key_refuses_writes_with_eperm(target: Target, tmp_path: Path,
                                                connect: Callable[[Nbdkit], Any]) -> None:
    server = Nbdkit(tmp_path, *target.keys, "readonly=true").start()
    try:
        h = connect(server)
        assert h.is_read_only()
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as exc:
            h.pwrite(b"x", 0)
        assert errno_of(exc.value) == errno.EPERM
        disconnect(h)
    finally:
        server.stop()


def test_flushed_data_survives_target_sigkill(target: Target, tmp_path: Path) -> None:
    model_file = tmp_path / "model.bin"
    res = captive(target, f'{sys.executable} {WORKLOAD} "$uri" --seed 7 --ops 600 '
                  f"--model-out {model_file}")
    assert res.returncode == 0, res.stdout + res.stderr
    target.kill()
    restarted = target.restart()
    restarted.wait_log("not shut down cleanly")
    try:
        res = captive(restarted, f'{sys.executable} -c "import nbd,sys; h=nbd.NBD(); '
                      f'h.connect_uri(sys.argv[1]); sys.stdout.buffer.write(h.pread({EXPORT}, 0))"'
                      ' "$uri" > ' + str(tmp_path / "after.bin"))
        assert res.returncode == 0, res.stderr
        after = (tmp_path / "after.bin").read_bytes()
        assert after == model_file.read_bytes(), "flushed bytes were lost across SIGKILL"
        report(f"every flushed byte ({EXPORT} compared) read back after SIGKILL + restart")
    finally:
        restarted.stop()


def test_fio_nbd_engine_verifies(target: Target) -> None:
    verify = "--verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0"
    res = captive(target, f'fio --name=verify --ioengine=nbd --uri="$uri" --rw=randwrite '
                  f"--bs=4k --iodepth=16 --size=16M {verify} && "
                  f'fio --name=seq --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=4 '
                  f"--size=32M --offset=16M {verify}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "err= 0" in res.stdout


def test_nbdinfo_shows_the_export(target: Target) -> None:
    res = captive(target, 'nbdinfo "$uri"')
    assert res.returncode == 0, res.stderr
    assert f"export-size: {EXPORT}" in res.stdout
    assert "over TCP: flush=gpspm (persistent)" in res.stdout


def test_auto_transport_says_why_it_chose_tcp(target: Target) -> None:
    res = captive(target, "true", "transport=auto")
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["nbdkit", "-v", "-U", "-", "python", PLUGIN,
                          *target.keys, "--run", 'nbdinfo "$uri" >/dev/null'],
                         capture_output=True, text=True, timeout=120)
    assert "transport=auto: using TCP: the target is a Unix socket" in res.stderr


def test_tcp_over_loopback(region: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a free port for this test
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = Target(region, f"127.0.0.1:{port}", tmp_path, transport="tcp").start()
    try:
        res = captive(target, f'{sys.executable} {WORKLOAD} "$uri" --seed 11 --ops 300',
                      "transport=tcp")
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        target.stop()


def test_apm_on_a_plain_file_is_refused_by_default(target: Target) -> None:
    res = captive(target, 'nbdinfo "$uri"', "flush=apm")
    assert res.returncode != 0
    assert "gives only visibility" in res.stderr and "allow-visibility-only=true" in res.stderr
    res = captive(target, 'nbdinfo "$uri"', "flush=apm", "allow-visibility-only=true")
    assert res.returncode == 0 and "flush=apm (visibility only)" in res.stdout
    res = captive(target, 'nbdinfo "$uri"')  # flush=auto picks a persistent method
    assert res.returncode == 0 and "flush=gpspm (persistent)" in res.stdout


def test_a_read_only_export_is_multi_conn(target: Target, tmp_path: Path,
                                          connect: Callable[[Nbdkit], Any]) -> None:
    """Read-only, every connection reads the target's memory: safe for several (nbd-client
    -connections N, attach --readonly --connections N). Read-write stays single."""
    server = Nbdkit(tmp_path, *target.keys, "readonly=true").start()
    try:
        h = connect(server)
        assert h.can_multi_conn() and h.is_read_only()
    finally:
        server.stop()


def test_over_tcp_a_write_reply_is_the_placement_proof(region: str, tmp_path: Path,
                                                       connect: Callable[[Nbdkit], Any]) -> None:
    """flush=apm over TCP: the target replies to a WRITE once the data is in its memory, so
    neither FUA nor FLUSH sends a READ after it (the target counts none); gpspm's FUA COMMIT
    goes out behind the write and is one COMMIT per FUA write."""
    control = tmp_path / "ctl.sock"
    target = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, "--control", str(control),
                    "--shared", transport="tcp").start()
    apm = Nbdkit(tmp_path, *target.keys, "flush=apm", "allow-visibility-only=true").start()
    gpspm = Nbdkit(tmp_path, *target.keys, "flush=gpspm").start()
    try:
        h = connect(apm)
        for i in range(3):
            h.pwrite(b"a" * 4096, i * 4096, nbd.CMD_FLAG_FUA)
        h.pwrite(b"b" * 4096, 3 * 4096)
        h.flush()
        g = connect(gpspm)
        g.pwrite(b"c" * 8192, 8 * 4096, nbd.CMD_FLAG_FUA)
        g.zero(4096, 16 * 4096, nbd.CMD_FLAG_FUA)
        assert g.pread(4096, 8 * 4096) == b"c" * 4096
        totals = json.loads(pmemblk("status", "--target", str(control), "--json").stdout)
        totals = totals["totals"]
        assert totals["writes"] == 5 and totals["zeros"] == 1
        assert totals["reads"] == 1  # the pread above; no barrier READs
        assert totals["commits"] == 2 and totals["commit_bytes"] == 8192 + 4096
        h.shutdown()
        g.shutdown()
    finally:
        apm.stop()
        gpspm.stop()
        target.stop()
