"""Crash suite: figures are collected here and printed at the end of the run."""

from __future__ import annotations

import os
from typing import Any

import pytest

#: Seeds per crash kind: a quick sweep by default, PMEMBLK_CRASH_SEEDS=N for a longer one.
SEEDS = int(os.environ.get("PMEMBLK_CRASH_SEEDS", "8"))

FIGURES: dict[str, int] = {"crash points": 0, "bytes checked": 0,
                           "acknowledged durable bytes": 0, "bytes lost": 0,
                           "foreign bytes": 0}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES["crash points"]:
        terminalreporter.write_line(
            "crash suite: " + ", ".join(f"{v} {k}" for k, v in FIGURES.items()))


@pytest.fixture
def figures() -> dict[str, int]:
    return FIGURES
