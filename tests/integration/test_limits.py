"""A tasks limit reached by one connection too many refuses that connection and nothing else
(issue 24, item 1): every admitted stream channel is a thread, and a thread that cannot start
used to take the target down for every client with a traceback. Also the target's own bound
on those threads (serve --max-threads)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk.client import Client
from pmemblk.errors import RemoteError
from pmemblk.transport.stream import StreamTransport

from ..conftest import report, roundtrip
from ..procs import Target, wait_until

PIDS = Path("/sys/fs/cgroup/pids")  # cgroup v1's pids controller (this machine's kind)


def _pids_cgroup(tmp_path: Path) -> Path | None:
    for root in (PIDS, Path("/sys/fs/cgroup")):
        if not (root / "cgroup.procs").exists():
            continue
        if root == Path("/sys/fs/cgroup") and "pids" not in (
                root / "cgroup.controllers").read_text(errors="replace"):
            continue
        group = root / f"pmemblk-test-{os.getpid()}-{tmp_path.name}"
        with contextlib.suppress(OSError):
            group.mkdir()
            if (group / "pids.max").exists():
                return group
            group.rmdir()
    return None


@pytest.fixture
def pids_group(tmp_path: Path) -> Iterator[Path]:
    group = _pids_cgroup(tmp_path)
    if group is None:
        pytest.skip("no writable pids cgroup (needs root and the pids controller)")
    yield group
    procs = (group / "cgroup.procs").read_text().split()
    parent = group.parent / "cgroup.procs"
    for pid in procs:  # a failing test's target: back to the parent, then the group goes
        with contextlib.suppress(OSError):
            parent.write_text(pid)
    with contextlib.suppress(OSError):
        group.rmdir()


def channel(t: Target) -> Client:
    return Client(StreamTransport(t.listen), "gpspm")


def test_a_connection_past_the_tasks_limit_is_refused_and_the_target_serves_on(
        region: str, tmp_path: Path, pids_group: Path) -> None:
    t = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, "--shared",
               transport="tcp").start()
    assert t.proc is not None
    (pids_group / "cgroup.procs").write_text(str(t.proc.pid))
    room = 3
    (pids_group / "pids.max").write_text(str(int((pids_group / "pids.current").read_text())
                                             + room))
    admitted: list[Client] = []
    refused = 0
    try:
        for _ in range(room + 5):
            try:
                admitted.append(channel(t))
            except RemoteError as exc:
                assert exc.errno == errno.EAGAIN, exc
                assert "cannot start a thread for this connection" in str(exc), exc
                refused += 1
        assert len(admitted) == room and refused == 5, (len(admitted), refused)
        assert t.proc.poll() is None, t.log()
        for i, c in enumerate(admitted):
            roundtrip(c, i << 20)
        # One refusal a flood repeats is logged once (then counted), not once per connection.
        assert t.log().count("cannot start a thread") == 1, t.log()
        admitted.pop().close()  # its thread ends: there is room for one more
        wait_until(lambda: int((pids_group / "pids.current").read_text()) < int(
            (pids_group / "pids.max").read_text()), "the thread to end")
        admitted.append(channel(t))
        roundtrip(admitted[-1], 9 << 20)
    finally:
        for c in admitted:
            c.close()
    assert t.stop(signal.SIGTERM) == 0
    assert "Traceback" not in t.log() and "cannot join thread" not in t.log(), t.log()
    report(f"tasks limit: {room} channels admitted, 5 refused with EAGAIN, 1 log line, "
           "the target served on and stopped cleanly")


def test_the_targets_own_bound_on_threads(region: str, tmp_path: Path) -> None:
    t = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, "--shared", "--max-threads",
               "2", transport="tcp").start()
    first, second = channel(t), channel(t)
    with pytest.raises(RemoteError, match=r"serves 2 connections .*--max-threads") as exc:
        channel(t)
    assert exc.value.errno == errno.EAGAIN
    first.close()
    wait_until(lambda: "disconnected after" in t.log(), "the first channel to end")
    third = channel(t)
    roundtrip(third, 0)
    roundtrip(second, 1 << 20)
    second.close()
    third.close()
    t.stop()
