"""The real nbdkit loading the real plugin: configuration errors are one line, exit 1."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import ROOT

PLUGIN = str(ROOT / "plugin" / "pmemblk.py")
pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit is not installed")


def nbdkit(*keys: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdkit", "-f", "-U", "-", "python", PLUGIN, *keys, "--run", "true"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ((), "target=HOST:PORT is required"),
        (("target=192.0.2.1:7000", "bogus=1"), "unknown key 'bogus'"),
        (("target=127.0.0.1:7000", "transport=verbs"), "loopback"),
        (("target=192.0.2.1:7000", "transport=infiniband"), "use auto, verbs or tcp"),
        (("target=192.0.2.1:7000", "flush=sometimes"), "use auto, gpspm or apm"),
    ],
)
def test_config_errors(keys: tuple[str, ...], message: str) -> None:
    res = nbdkit(*keys)
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_plugin_help_lists_nothing_unexpected() -> None:
    res = subprocess.run(["nbdkit", "python", PLUGIN, "--dump-plugin"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "python_pep_384_abi_version" in res.stdout or "max_known_status" in res.stdout \
        or "name=python" in res.stdout
