from __future__ import annotations

import pytest

from pmemblk.address import TCPAddress, UnixAddress
from pmemblk.errors import ConfigError
from pmemblk.plugin_instance import PluginConfig, parse_bool


def configured(**keys: str) -> PluginConfig:
    cfg = PluginConfig()
    for k, v in keys.items():
        cfg.set(k, v)
    cfg.complete()
    return cfg


def test_defaults_and_values() -> None:
    cfg = configured(target="192.0.2.1:7000")
    assert (cfg.target, cfg.flush, cfg.readonly) == (TCPAddress("192.0.2.1", 7000), "auto", False)
    cfg = configured(target="[2001:db8::1]:9", flush="apm", readonly="yes", timeout="2.5",
                     depth="4", chunk="64K")
    assert (cfg.target, cfg.flush, cfg.readonly) == (TCPAddress("2001:db8::1", 9), "apm", True)
    assert str(cfg.target) == "[2001:db8::1]:9"  # printed as it is written
    assert (cfg.timeout, cfg.depth, cfg.chunk) == (2.5, 4, 65536)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("bogus", "1", "unknown key 'bogus'"),
        ("target", "nohostport", "HOST:PORT"),
        ("target", "host:99999", "outside 1..65535"),
        ("target", "host:http", "not a number"),
        ("flush", "always", "use auto, native, gpspm or apm"),
        ("readonly", "maybe", "expected true or false"),
        ("timeout", "soon", "expected seconds"),
        ("timeout", "0", "more than 0"),
        ("depth", "0", "1 to 64"),
        ("depth", "-3", "1 to 64"),
        ("chunk", "3000", "power of two"),
        ("chunk", "64M", "power of two"),
        ("chunk", "lots", "not a number"),
    ],
)
def test_bad_values(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PluginConfig().set(key, value)


def test_duplicate_and_missing_keys() -> None:
    cfg = PluginConfig()
    cfg.set("flush", "apm")
    with pytest.raises(ConfigError, match="given twice"):
        cfg.set("flush", "gpspm")
    with pytest.raises(ConfigError, match="target=HOST:PORT is required"):
        cfg.complete()


@pytest.mark.parametrize("addr", ["127.0.0.1:7000", "localhost:7000", "0.0.0.0:7000"])
def test_addresses_rdma_cm_cannot_use(addr: str) -> None:
    cfg = PluginConfig()
    cfg.set("target", addr)
    cfg.set("transport", "verbs")
    with pytest.raises(ConfigError, match=r"loopback|wildcard"):
        cfg.complete()
    tcp = PluginConfig()
    tcp.set("target", addr)
    tcp.set("transport", "tcp")
    tcp.complete()  # TCP is happy on loopback


def test_transport_and_unix_targets() -> None:
    cfg = configured(target="unix:/run/p.sock")
    assert cfg.target == UnixAddress("/run/p.sock") and cfg.transport == "auto"
    with pytest.raises(ConfigError, match="use auto, verbs or tcp"):
        PluginConfig().set("transport", "carrier-pigeon")
    with pytest.raises(ConfigError, match="needs a socket path"):
        PluginConfig().set("target", "unix:")
    cfg = PluginConfig()
    cfg.set("target", "unix:/run/p.sock")
    cfg.set("transport", "verbs")
    with pytest.raises(ConfigError, match="not a unix: socket"):
        cfg.complete()


def test_parse_bool() -> None:
    assert parse_bool("k", "ON") and not parse_bool("k", "0")


def test_client_names_an_identity_and_needs_its_secret() -> None:
    cfg = PluginConfig()
    cfg.set("target", "unix:/x")
    cfg.set("client", "db1.a_b-c")
    with pytest.raises(ConfigError, match=r"client=db1\.a_b-c needs secret-file="):
        cfg.complete()
    for bad in ("", "a b", "x" * 33, "é"):
        with pytest.raises(ConfigError, match="client="):
            PluginConfig().set("client", bad)
