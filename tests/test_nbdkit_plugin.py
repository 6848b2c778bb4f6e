"""The real nbdkit loading the real plugin: configuration errors are one line, exit 1."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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
        (("target=192.0.2.1:7000", "flush=sometimes"), "use auto, native, gpspm or apm"),
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


BUGGY = """
import sys

sys.path.insert(0, {root!r})
import pmemblk.nbdkit_plugin

plugin = vars(pmemblk.nbdkit_plugin)
API_VERSION = 2


def config(key, value):
    plugin["config"](key, value)


def config_complete():
    plugin["config_complete"]()


def planted_bug_in_a_helper():
    raise ValueError("planted bug")


def open(readonly):
    return plugin["_guard"](planted_bug_in_a_helper)


def get_size(h):
    return 0


def pread(h, buf, offset, flags):
    pass
"""


def test_an_internal_error_is_logged_with_every_frame(tmp_path: Path) -> None:
    """The plugin keeps expected errors to one line (sys.tracebacklimit = 0); a bug must still
    be logged with the frames that show where it is."""
    wrapper = tmp_path / "buggy_plugin.py"
    wrapper.write_text(BUGGY.format(root=str(ROOT)))
    res = subprocess.run(["nbdkit", "-f", "-U", "-", "python", str(wrapper),
                          "target=unix:/nonexistent.sock", "--run", "nbdinfo --size \"$uri\""],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "internal error in planted_bug_in_a_helper" in res.stderr, res.stderr
    assert 'line 20, in planted_bug_in_a_helper' in res.stderr, res.stderr
    assert "ValueError: planted bug" in res.stderr
