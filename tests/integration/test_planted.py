"""What an independent planted-bug pass (issue 23's check, by someone who had not seen the
mutants) found the host suite blind to: peers with the protocol's default all-zero client id,
the plugin's count of the NBD connections that share a client, the plugin's status of a client
that lost data, and attach's default name."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pmemblk.errors import RemoteError
from pmemblk.plugin_instance import PluginState
from pmemblk.transport.stream import StreamTransport

from ..procs import Target, our_nbdkits, pmemblk
from .conftest import needs_nbdkit, read


@pytest.fixture
def target(region: str, tmp_path: Path) -> Target:
    return Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, "--testing-durable-image",
                  str(tmp_path / "durable.img"), transport="tcp").start()


def plugin(t: Target) -> PluginState:
    state = PluginState()
    for key, value in (("target", t.listen), ("transport", "tcp"), ("flush", "gpspm"),
                       ("reconnect-timeout", "0")):
        state.config.set(key, value)
    state.config.complete()
    return state


def test_peers_with_the_all_zero_client_id_are_clients_of_their_own(target: Target) -> None:
    """Zeros is the id of a peer that names none: it joins no other connection's session,
    so a second such writer is refused the one writer slot (it would have been taken for
    another channel of the first)."""
    first = StreamTransport(target.listen, client_id=bytes(16))
    try:
        with pytest.raises(RemoteError, match="another client has this export open") as exc:
            StreamTransport(target.listen, client_id=bytes(16))
        assert exc.value.errno == errno.EBUSY
        StreamTransport(target.listen, client_id=bytes(16), readonly=True).close()
    finally:
        first.close()
    target.stop()


def test_a_client_shared_by_nbd_connections_closes_with_the_last_of_them(
        target: Target) -> None:
    state = plugin(target)
    clients = [state.open(False) for _ in range(3)]
    assert clients[0] is clients[1] is clients[2]
    client = clients[0]
    state.closed(client)
    state.closed(client)
    assert state.status()["connections"] == 1
    data = os.urandom(8192)
    client.pwrite(memoryview(data), 4096)  # reconnect-timeout=0: a closed client fails
    client.flush()
    assert read(client, 4096, 8192) == data
    state.closed(client)
    st = state.status()
    assert st["connections"] == 0 and st["state"] == "no connection open"
    target.stop()


def test_a_client_that_lost_data_is_shown_failing(target: Target, region: str,
                                                  tmp_path: Path) -> None:
    state = plugin(target)
    state.config.reconnect_timeout = 30
    client = state.open(False)
    client.pwrite(memoryview(b"\x11" * 4096), 0)  # never flushed
    target.kill()
    pmemblk("testing-power-cut", region, "--durable-image", str(tmp_path / "durable.img"),
            "--keep", "0")
    t = target.restart()
    try:
        client.pwrite(memoryview(b"\x22" * 4096), 4096)  # finds the new loss epoch
        assert client.lost is not None
        assert state.status()["state"].startswith("failing: ")
        families = {f.name: f for f in text_string_to_metric_families(  # type: ignore[no-untyped-call]
            state.metrics().decode())}
        assert families["pmemblk_client_failing"].samples[0].value == 1
    finally:
        state.closed(client)
        t.stop()


@needs_nbdkit
def test_attach_without_a_name_gives_export0_then_export1(
        target: Target, run_dir: Path) -> None:
    uris = [pmemblk("attach", target.listen, "--no-device", "--readonly").stdout.strip()
            for _ in range(2)]
    assert uris == [f"nbd+unix:///?socket={run_dir / name / 'nbd.sock'}"
                    for name in ("export0", "export1")]
    for name in ("export0", "export1"):
        pmemblk("detach", name)
    assert our_nbdkits(run_dir) == []
    target.stop()
