from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pmemblk import layout
from pmemblk.pmem import PmemRegion

ROOT = Path(__file__).resolve().parent.parent

#: Figures tests want in the run's output (pytest captures print): shown in the summary.
REPORT: list[str] = []


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


@pytest.fixture
def region_path(tmp_path: Path) -> Path:
    return tmp_path / "region.img"


@pytest.fixture
def region(region_path: Path) -> Iterator[PmemRegion]:
    with PmemRegion.create(str(region_path), 1 << 20) as r:
        layout.format_region(r)
        yield r
