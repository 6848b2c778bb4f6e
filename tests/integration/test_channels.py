"""Channels coming and going, and lanes across reconnects (issue 23), over the stream
transport: a real target, the real client core.

One client's channels (each a ``Client`` carrying the same client id, as a plugin instance's
NBD connections and threads do) open and close in every order while the others write and
read back: none is ever refused, an outsider never gets the writer slot beside them, and
every write verifies. A writer that reconnects to a restarted target gets lanes no other
writer holds, and uses them: nothing it wrote is overwritten by the other writer.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from pmemblk.client import Client
from pmemblk.errors import RemoteError
from pmemblk.transport.stream import StreamTransport

from ..blockmap import check_map
from ..procs import Target, pmemblk, wait_until
from .conftest import read

BLOCK = 4096


def serve(region: str, tmp_path: Path, *extra: str) -> Target:
    return Target(region, f"unix:{tmp_path / 'c.sock'}", tmp_path, *extra,
                  transport="tcp").start()


def channel(t: Target, client_id: bytes | None = None, reconnect_timeout: float = 0) -> Client:
    """A client core on one stream connection; with ``client_id``, a channel of that client."""
    def connect() -> StreamTransport:
        return StreamTransport(t.listen, client_id=client_id, timeout=10)

    return Client(connect(), "gpspm", reconnect=connect if reconnect_timeout else None,
                  reconnect_timeout=reconnect_timeout, max_channels=1)


def pattern(n: int) -> bytes:
    return n.to_bytes(4, "little") * (BLOCK // 4)


@pytest.fixture
def atomic_region(tmp_path: Path) -> str:
    path = str(tmp_path / "atomic.img")
    pmemblk("create", path, "--size", "4M", "--atomic-blocks", "--lanes", "16")
    return path


def test_channels_open_and_close_in_every_order_while_others_write(
        tmp_path: Path, region: str) -> None:
    """A plain region: each channel is a client core of its own carrying the client's id (on
    an atomic-blocks region two client cores of one id would share its lanes)."""
    t = serve(region, tmp_path)
    me = os.urandom(16)
    orders = [o for o in itertools.permutations(
        [("open", i) for i in range(3)] + [("close", i) for i in range(3)])
        if all(o.index(("open", i)) < o.index(("close", i)) for i in range(3))]
    orders = sorted(set(orders))
    assert len(orders) == 90
    open_: dict[int, Client] = {}
    locks = {i: threading.Lock() for i in range(3)}
    stop, failures = threading.Event(), []
    written = [0]

    def writer() -> None:
        """Writes and reads back on every open channel, round and round, while channels come
        and go (a channel is closed only under its lock: never in the middle of a request)."""
        n = 0
        try:
            while not stop.is_set():
                for i in range(3):
                    with locks[i]:
                        c = open_.get(i)
                        if c is None:
                            continue
                        n += 1
                        off = (i * 32 + n % 32) * BLOCK
                        c.pwrite(memoryview(pattern(n)), off)
                        assert read(c, off, BLOCK) == pattern(n), f"channel {i} read back"
                        written[0] += 1
        except BaseException as exc:  # handed to the test
            failures.append(exc)

    worker = threading.Thread(target=writer)
    worker.start()
    try:
        for order in orders:
            for kind_, i in order:
                with locks[i]:
                    if kind_ == "open":
                        open_[i] = channel(t, me)  # never refused: the client's own
                    else:
                        open_.pop(i).close()
                if open_:
                    with pytest.raises(RemoteError, match="another client has this export"):
                        channel(t).close()
                assert not failures, failures
            with channel(t) as outsider:  # all gone: the slot is free
                outsider.pwrite(memoryview(pattern(0)), 100 * BLOCK)
    finally:
        stop.set()
        worker.join(timeout=120)
        for c in open_.values():
            c.close()
        t.stop()
    assert not worker.is_alive() and not failures, failures
    assert written[0] > 0


def test_a_writer_reconnecting_to_a_restarted_target_never_writes_through_anothers_lanes(
        atomic_region: str, tmp_path: Path) -> None:
    """--shared, 2 lane groups. Start 1: X writes and leaves, A writes (grant 2, group 0).
    The target is killed and restarted: C comes first (grant 1, group 0), then A reconnects
    (group 1). With grant numbers counted from 1 at every start A's WELCOME said grant 2
    again, A kept its group-0 lanes, and C's write took the block A had just written."""
    t = serve(atomic_region, tmp_path, "--shared")
    a = None
    try:
        with channel(t) as x:
            x.pwrite(memoryview(pattern(1)), 0)
        a = channel(t, reconnect_timeout=30)
        a.pwrite(memoryview(pattern(10)), 10 * BLOCK)
        t.kill()
        t = t.restart()
        with channel(t) as c:
            a.pwrite(memoryview(pattern(11)), 11 * BLOCK)  # reconnects (new lanes)
            assert a.reconnects == 1
            c.pwrite(memoryview(pattern(20)), 20 * BLOCK)
            for who in (a, c):
                assert read(who, 10 * BLOCK, BLOCK) == pattern(10)
                assert read(who, 11 * BLOCK, BLOCK) == pattern(11), "A's write was taken"
                assert read(who, 20 * BLOCK, BLOCK) == pattern(20)
    finally:
        if a is not None:
            a.close()
        t.stop()
    check_map(atomic_region)


def test_a_plugin_client_that_replaces_a_lost_one_never_shares_its_lanes(
        atomic_region: str, tmp_path: Path) -> None:
    """A plugin instance's client finds the target after a power cut with writes unflushed
    (every FLUSH fails from then on; its writes still go through). A new NBD connection then
    gets a new client (plugin_instance.PluginState.open) while the old one's connections still
    write. With the plugin's one client id the new one joined the old one's session and was
    given the same lanes: two block maps moving blocks through one set of lanes (the new one's
    first write failed on the old one's unsettled record: EIO). A client of its own is
    refused the writer slot while the old one holds it, and admitted once that has gone."""
    from pmemblk.plugin_instance import PluginState

    image = str(tmp_path / "durable.img")
    t = serve(atomic_region, tmp_path, "--testing-durable-image", image)
    state = PluginState()
    for key, value in (("target", t.listen), ("transport", "tcp"), ("flush", "gpspm"),
                       ("reconnect-timeout", "30"), ("timeout", "10")):
        state.config.set(key, value)
    state.config.complete()
    old = state.open(False)
    new = None
    try:
        old.pwrite(memoryview(pattern(1)), 1 * BLOCK)  # never flushed
        t.kill()
        pmemblk("testing-power-cut", atomic_region, "--durable-image", image, "--keep", "0")
        t = t.restart()
        old.pwrite(memoryview(pattern(2)), 2 * BLOCK)  # finds the new loss epoch
        assert old.lost is not None
        with pytest.raises(RemoteError, match="another client has this export open"):
            state.open(False)
        old.pwrite(memoryview(pattern(3)), 3 * BLOCK)  # the old one still writes
        assert read(old, 3 * BLOCK, BLOCK) == pattern(3)
        state.closed(old)
        new = state.open(False)
        assert new is not old and new.lost is None
        new.pwrite(memoryview(pattern(4)), 4 * BLOCK)
        new.flush()
        assert [read(new, i * BLOCK, BLOCK) for i in (2, 3, 4)] == [pattern(i)
                                                                   for i in (2, 3, 4)]
    finally:
        for c in (old, new):
            if c is not None:
                c.close()
        t.stop()
    check_map(atomic_region)


def replaced(ch: Any, lost: object, failures: list[BaseException]) -> bool:
    return ch.transport is not lost or bool(failures)


def test_one_channel_lost_while_the_others_write_keeps_the_clients_lanes(
        atomic_region: str, tmp_path: Path) -> None:
    """One client core, three threads on three channels of an atomic-blocks region. Channels
    lose their connection one at a time (shut down under their lock, between requests) while
    the other two write: each reconnects into the same session, so with the same grant and
    lanes; no outsider gets the writer slot meanwhile; every write verifies, the map is
    whole."""
    import socket

    t = serve(atomic_region, tmp_path)
    me = os.urandom(16)
    c = Client(StreamTransport(t.listen, client_id=me, timeout=10), "gpspm",
               reconnect=lambda: StreamTransport(t.listen, client_id=me, timeout=10),
               reconnect_timeout=30, max_channels=3)
    stop, failures = threading.Event(), list[BaseException]()
    start = threading.Barrier(3)

    def work(i: int) -> None:
        n = 0
        try:
            start.wait(timeout=30)
            while not stop.is_set() or n < 20:
                n += 1
                off = (i * 64 + n % 64) * BLOCK
                c.pwrite(memoryview(pattern(i << 16 | n)), off)
                assert read(c, off, BLOCK) == pattern(i << 16 | n)
        except BaseException as exc:  # handed to the test
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    try:
        wait_until(lambda: c.channels == 3 or bool(failures), "three channels")
        channels = list(c._all)
        for round_ in range(6):
            ch = channels[round_ % 3]
            with ch.lock:  # between two of its requests
                lost = ch.transport
                assert isinstance(lost, StreamTransport)
                lost.sock.shutdown(socket.SHUT_RDWR)
            wait_until(functools.partial(replaced, ch, lost, failures),
                       "the channel's new connection")
            with pytest.raises(RemoteError, match="another client has this export"):
                channel(t).close()
            assert not failures, failures
        grants = {ch.transport.info.lane_grant for ch in channels if ch.transport is not None}
        assert len(grants) == 1 and 0 not in grants, grants
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=120)
        c.close()
        t.stop()
    assert not any(th.is_alive() for th in threads) and not failures, failures
    check_map(atomic_region)
