from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pmemblk import layout
from pmemblk.client import Client
from pmemblk.pmem import PmemRegion

ROOT = Path(__file__).resolve().parent.parent

#: Figures tests want in the run's output (pytest captures print): shown in the summary.
REPORT: list[str] = []


def roundtrip(c: Client, offset: int, n: int = 70_000) -> None:
    """Write, flush and read back ``n`` random bytes at ``offset``."""
    data = os.urandom(n)
    c.pwrite(memoryview(data), offset)
    c.flush()
    buf = bytearray(n)
    c.pread(memoryview(buf), offset)
    assert buf == data


def report(line: str) -> None:
    print(line, flush=True)
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from .crash.conftest import FIGURES

    lines = list(REPORT)
    if FIGURES["crash points"]:
        lines.append("crash suite: " + ", ".join(f"{v} {k}" for k, v in FIGURES.items()))
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _no_target_outlives_its_test() -> Iterator[None]:
    yield
    from .procs import Target

    for t in list(Target.running):
        t.stop(signal.SIGKILL)


@pytest.fixture
def region_path(tmp_path: Path) -> Path:
    return tmp_path / "region.img"


@pytest.fixture
def region(region_path: Path) -> Iterator[PmemRegion]:
    with PmemRegion.create(str(region_path), 1 << 20) as r:
        layout.format_region(r)
        yield r
