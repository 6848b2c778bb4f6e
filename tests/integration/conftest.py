"""Host integration suite: a real target over the TCP transport, the real nbdkit and plugin."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk.client import Client
from pmemblk.plugin_instance import PluginConfig, connect

from ..procs import Nbdkit, Target, our_nbdkits, pmemblk

SIZE = 64 << 20  # region file size; the export is 4 KiB less

needs_nbdkit = pytest.mark.skipif(shutil.which("nbdkit") is None,
                                  reason="nbdkit is not installed (scripts/setup installs it)")


@pytest.fixture
def region(tmp_path: Path) -> str:
    path = tmp_path / "region.img"
    pmemblk("create", str(path), "--size", str(SIZE))
    return str(path)


@pytest.fixture
def target(region: str, tmp_path: Path) -> Iterator[Target]:
    # --shared: these tests run several read-write clients at once on purpose.
    t = Target(region, f"unix:{tmp_path / 'target.sock'}", tmp_path, "--handshake-timeout",
               "1", "--shared", transport="tcp").start()
    yield t
    t.stop()


@pytest.fixture
def nbd_server(target: Target, tmp_path: Path) -> Iterator[Nbdkit]:
    server = Nbdkit(tmp_path, *target.keys).start()
    yield server
    server.stop()


def plugin_client(target: Target, flush: str = "gpspm", reconnect_timeout: float = 60,
                  timeout: float = 10, *keys: str) -> Client:
    """A client configured the way the plugin configures one (keys, then complete), over TCP,
    read-write; ``keys`` are more ``key=value`` plugin keys."""
    cfg = PluginConfig()
    for key, value in (("target", target.listen), ("transport", "tcp"), ("flush", flush),
                       ("reconnect-timeout", str(reconnect_timeout)), ("timeout", str(timeout)),
                       *(k.split("=", 1) for k in keys)):
        cfg.set(key, value)
    cfg.complete()
    return connect(cfg, readonly=False)


def read(c: Client, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    c.pread(memoryview(buf), offset)
    return bytes(buf)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``pmemblk attach``'s state folder, private to the test. A failing test (or a mutant)
    must not leave an nbdkit behind: every one whose command line names this test's folder
    is stopped, pid file or not."""
    folder = tmp_path / "run"
    monkeypatch.setenv("PMEMBLK_RUN_DIR", str(folder))
    yield folder
    for pid in our_nbdkits(tmp_path):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
