"""Concurrency (issue 12): a pool of channels, one client per plugin instance, multi-conn.

Host, over a Unix socket: several NBD connections of one nbdkit are one client of the target
(one writer slot), a FLUSH on any of them persists the writes of all of them (proved by an
emulated power cut), and a lost target is noticed once however many threads lost it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from pmemblk.client import Client
from pmemblk.errors import GaveUp, RemoteError

from ..conftest import report
from ..procs import PLUGIN, Nbdkit, Target, pmemblk
from .conftest import SIZE, needs_nbdkit, plugin_client, read

nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
EXPORT = SIZE - 4096


def durable_target(region: str, tmp_path: Path, *extra: str) -> Target:
    return Target(region, f"unix:{tmp_path / 'm.sock'}", tmp_path, "--testing-durable-image",
                  str(tmp_path / "durable.img"), "--control", str(tmp_path / "ctl.sock"),
                  *extra, transport="tcp").start()


def power_cut(t: Target) -> Target:
    """SIGKILL the target, keep only what was persisted, start it again."""
    t.kill()
    pmemblk("testing-power-cut", t.region, "--durable-image",
            str(t.log_path.parent / "durable.img"), "--keep", "0")
    return t.restart()


def target_status(tmp_path: Path) -> dict[str, Any]:
    out = json.loads(pmemblk("status", "--target", str(tmp_path / "ctl.sock"), "--json").stdout)
    assert isinstance(out, dict)
    return out


def client(t: Target, reconnect_timeout: float = 0) -> Client:
    return plugin_client(t, "gpspm", reconnect_timeout, 5)


def repeat(n: int, call: Any, *args: Any) -> None:
    for _ in range(n):
        call(*args)


def in_threads(n: int, work: Any) -> None:
    """Run ``work(i)`` on ``n`` threads at once; re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait(timeout=30)
            work(i)
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    if errors:
        raise errors[0]


@needs_nbdkit
def test_writes_on_three_connections_a_flush_on_a_fourth_survive_a_power_cut(
        region: str, tmp_path: Path) -> None:
    """Multi-conn: one nbdkit, four NBD connections on a non-shared export (one client, one
    writer slot). Writes on three, FLUSH on the fourth, power cut: every byte is back."""
    t = durable_target(region, tmp_path)
    server = Nbdkit(tmp_path, *t.keys, "flush=gpspm").start()
    blobs = {}
    try:
        handles = []
        for _ in range(4):
            h = nbd.NBD()
            h.connect_uri(server.uri)
            handles.append(h)
        assert all(h.can_multi_conn() for h in handles)
        for i, h in enumerate(handles[:3]):
            for j in range(8):  # 8 writes per connection, in flight together
                off = (i * 8 + j) * (1 << 20) + 4096 * j
                blobs[off] = os.urandom(12288)
                h.aio_pwrite(blobs[off], off)
            while h.aio_in_flight():
                h.poll(-1)
        clients = target_status(tmp_path)["clients"]
        assert len(clients) == 1 and clients[0]["mode"] == "read-write", clients
        assert clients[0]["channels"] >= 3, clients  # several channels, one client
        handles[3].flush()
        for h in handles:
            h.shutdown()
    finally:
        server.stop()
    t = power_cut(t)
    try:
        with client(t) as c:
            lost = [off for off, blob in blobs.items() if read(c, off, len(blob)) != blob]
        assert not lost, f"{len(lost)} of {len(blobs)} writes flushed on another connection lost"
        report(f"multi-conn: {len(blobs)} writes on 3 connections, FLUSH on a 4th, power cut: "
               "every byte back")
    finally:
        t.stop()


@needs_nbdkit
def test_fio_on_four_connections_verifies(target: Target) -> None:
    """fio's nbd engine, 4 jobs (4 NBD connections of one nbdkit, a non-shared export), each
    at queue depth 16 against the parallel plugin, every block checked."""
    verify = "--verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0"
    res = subprocess.run(
        ["nbdkit", "-U", "-", "python", PLUGIN, *target.keys, "--run",
         f'fio --name=mc --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=16 '
         f"--numjobs=4 --size=4M --offset_increment=8M --group_reporting {verify}"],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "err= 0" in res.stdout


def test_one_client_many_channels_one_writer(region: str, tmp_path: Path) -> None:
    """Every channel of one client shares the writer slot; another client is refused it
    until the last of them has gone."""
    t = durable_target(region, tmp_path)
    try:
        with client(t) as c:
            in_threads(6, lambda i: repeat(50, c.pwrite, memoryview(bytes([i]) * 4096),
                                           i * 4096))
            assert c.channels >= 2  # requests overlapped: channels were opened for them
            st = target_status(tmp_path)
            assert [(x["mode"], x["channels"]) for x in st["clients"]] == \
                [("read-write", c.channels)]
            with pytest.raises(RemoteError, match="another client has this export open"):
                client(t)
        with client(t) as again:  # the slot came back with the last channel
            assert read(again, 0, 6 * 4096) == b"".join(bytes([i]) * 4096 for i in range(6))
    finally:
        t.stop()


def test_channels_past_the_targets_limit_are_not_needed(region: str, tmp_path: Path) -> None:
    """The target refuses a client's third channel: the client goes on with two."""
    t = durable_target(region, tmp_path, "--max-channels", "2")
    try:
        with client(t) as c:
            in_threads(8, lambda i: repeat(50, c.pwrite, memoryview(bytes([i + 1]) * 8192),
                                           i * 8192))
            in_threads(6, lambda i: c.flush())
            assert target_status(tmp_path)["clients"][0]["channels"] == 2
            assert read(c, 0, 6 * 8192) == b"".join(bytes([i + 1]) * 8192 for i in range(6))
    finally:
        t.stop()


def test_a_lost_target_is_noticed_once(region: str, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """Eight threads, each in a request on a channel of the pool, lose the target together:
    one of them looks for it, the others wait and then reconnect once each; every request
    completes."""
    t = durable_target(region, tmp_path)
    c = client(t, reconnect_timeout=60)
    stop = threading.Event()
    done = [0] * 8

    def work(i: int) -> None:
        data = bytes([i + 1]) * 4096
        n = 0
        while not stop.is_set() or n < 20:
            off = (i * 64 + n % 64) * 4096
            c.pwrite(memoryview(data), off)
            assert read(c, off, 4096) == data
            n += 1
        done[i] = n

    try:
        caplog.set_level(logging.WARNING, logger="pmemblk")
        worker = threading.Thread(target=in_threads, args=(8, work))
        worker.start()
        t.wait_log("client 8 connected")  # the pool's eight channels are open
        t.kill()
        t = t.restart()
        stop.set()
        worker.join(timeout=300)
        assert not worker.is_alive()
        lost = [r for r in caplog.records if "lost the connection to the target" in r.message]
        assert len(lost) == 1, [r.message for r in lost]
        assert c.reconnects == 1 and c.channels == 8
        assert all(n >= 20 for n in done), done
        report(f"8 threads lost the target together: noticed once, 1 reconnect, "
               f"{sum(done)} write+read pairs verified")
    finally:
        c.close()
        t.stop()


def test_a_power_cut_seen_by_another_channel_fails_the_flush(region: str,
                                                             tmp_path: Path) -> None:
    """One thread writes and does not flush; the target loses power and comes back; another
    thread's request finds it first. The loss epoch is the client's, not a channel's: the
    next FLUSH, on any thread, fails."""
    t = durable_target(region, tmp_path)
    c = client(t, reconnect_timeout=60)
    try:
        in_threads(1, lambda i: c.pwrite(memoryview(b"w" * 4096), 0))
        read(c, 4096, 8)  # this thread's channel
        t = power_cut(t)
        read(c, 4096, 8)  # this thread reconnects first and sees the new loss epoch
        with pytest.raises(GaveUp, match="loss epoch"):
            c.flush()
    finally:
        c.close()
        t.stop()
