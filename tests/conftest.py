from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import layout
from pmemblk.pmem import PmemRegion

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def region_path(tmp_path: Path) -> Path:
    return tmp_path / "region.img"


@pytest.fixture
def region(region_path: Path) -> Iterator[PmemRegion]:
    with PmemRegion.create(str(region_path), 1 << 20) as r:
        layout.format_region(r)
        yield r
