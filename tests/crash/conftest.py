"""Crash suite: figures are collected here; tests/conftest.py prints them at the end."""

from __future__ import annotations

import os

import pytest

#: Seeds per crash kind: a quick sweep by default, PMEMBLK_CRASH_SEEDS=N for a longer one.
SEEDS = int(os.environ.get("PMEMBLK_CRASH_SEEDS", "8"))

FIGURES: dict[str, int] = {"crash points": 0, "bytes checked": 0,
                           "acknowledged durable bytes": 0, "bytes lost": 0,
                           "foreign bytes": 0}


@pytest.fixture
def figures() -> dict[str, int]:
    return FIGURES
