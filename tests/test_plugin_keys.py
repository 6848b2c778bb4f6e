"""The plugin's key table: one row per key is what set(), the help and the man page use."""

from __future__ import annotations

import dataclasses

import pytest

from pmemblk import plugin_instance
from pmemblk.address import UnixAddress
from pmemblk.plugin_instance import KEY_TABLE, KEYS, PluginConfig

from .conftest import ROOT

#: A good value for every key, the PluginConfig field it sets and the value that field then has.
GOOD: dict[str, tuple[str, str, object]] = {
    "target": ("unix:/run/p.sock", "target", UnixAddress("/run/p.sock")),
    "transport": ("tcp", "transport", "tcp"),
    "flush": ("gpspm", "flush", "gpspm"),
    "allow-visibility-only": ("yes", "allow_visibility_only", True),
    "readonly": ("on", "readonly", True),
    "secret-file": ("/etc/s", "secret_file", "/etc/s"),
    "client": ("backup", "client", "backup"),
    "reconnect-timeout": ("0", "reconnect_timeout", 0.0),
    "timeout": ("7.5", "timeout", 7.5),
    "channels": ("3", "channels", 3),
    "depth": ("5", "depth", 5),
    "chunk": ("1M", "chunk", 1 << 20),
    "control": ("/run/c.sock", "control", "/run/c.sock"),
    "stats": ("off", "stats", False),
    "name": ("db-1", "name", "db-1"),
    "log": ("/var/log/p.log", "log", "/var/log/p.log"),
    "tls": ("require", "tls", "require"),
    "tls-certificates": ("/etc/pmemblk/tls", "tls_certificates", "/etc/pmemblk/tls"),
}


def test_rows_are_unique_and_name_real_fields() -> None:
    fields = {f.name for f in dataclasses.fields(PluginConfig)}
    assert len(set(KEYS)) == len(KEYS)
    for key in KEY_TABLE:
        assert key.field in fields, key.name
        assert key.help and key.value and key.usage.startswith(f"{key.name}=")


@pytest.mark.parametrize("key", KEYS)
def test_each_key_sets_its_own_field_only(key: str) -> None:
    assert set(GOOD) == set(KEYS)  # a new key needs a row here
    value, field, parsed = GOOD[key]
    cfg, before = PluginConfig(), PluginConfig()
    cfg.set(key, value)
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in ("seen", "client_id")
               and getattr(cfg, f.name) != getattr(before, f.name)}
    assert changed == {field: parsed}
    assert cfg.seen == {key}


def test_help_docs_and_plugin_name_every_key() -> None:
    doc = plugin_instance.__doc__ or ""
    plugin_doc = (ROOT / "docs" / "nbdkit-plugin.md").read_text()
    for key in KEY_TABLE:
        assert f"    {key.usage}\n" in doc, key.name
        assert f"`{key.name}=" in plugin_doc, key.name
