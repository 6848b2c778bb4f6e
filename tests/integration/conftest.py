"""Host integration suite: a real target over the TCP transport, the real nbdkit and plugin."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..procs import Nbdkit, Target, pmemblk

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

