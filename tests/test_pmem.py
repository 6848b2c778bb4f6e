from __future__ import annotations

import os
from pathlib import Path

import pytest

from pmemblk.errors import PmemError
from pmemblk.pmem import PmemRegion


def test_create_map_write_persist_reopen(region_path: Path) -> None:
    with PmemRegion.create(str(region_path), 1 << 20) as r:
        assert r.size == 1 << 20
        assert not r.is_pmem  # a tmp file is not pmem: persistence is msync
        assert r.persist_method == "pmem_msync"
        r.write(12345, b"hello pmem")
        r.persist(12345, 10)
        r.persist(0, r.size)
    assert os.path.getsize(region_path) == 1 << 20
    with PmemRegion.open(str(region_path)) as r:
        assert r.read(12345, 10) == b"hello pmem"


def test_close_is_safe_twice_and_blocks_use(region_path: Path) -> None:
    r = PmemRegion.create(str(region_path), 65536)
    r.close()
    r.close()
    with pytest.raises(PmemError, match="closed"):
        r.read(0, 1)


def test_out_of_range_access_is_refused(region_path: Path) -> None:
    with PmemRegion.create(str(region_path), 65536) as r:
        with pytest.raises(PmemError, match="outside"):
            r.write(65530, b"0123456789")
        with pytest.raises(PmemError, match="outside"):
            r.persist(-1, 2)
        with pytest.raises(PmemError, match="unaligned"):
            r.store_u64(4, 1)


def test_store_u64_is_little_endian(region_path: Path) -> None:
    with PmemRegion.create(str(region_path), 65536) as r:
        r.store_u64(64, 0x0102030405060708)
        assert r.read(64, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])


def test_create_refuses_existing_file(region_path: Path) -> None:
    region_path.write_bytes(b"precious")
    with pytest.raises(PmemError, match="exists"):
        PmemRegion.create(str(region_path), 65536)
    assert region_path.read_bytes() == b"precious"


def test_open_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PmemError, match="no such file"):
        PmemRegion.open(str(tmp_path / "nope"))


def test_nonpositive_size(region_path: Path) -> None:
    with pytest.raises(PmemError, match="positive"):
        PmemRegion.create(str(region_path), 0)


def test_allocate_reports_progress_in_steps(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pmemblk import pmem

    monkeypatch.setattr(pmem, "ALLOCATE_STEP", 1 << 20)
    seen: list[int] = []
    path = tmp_path / "r.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pmem.allocate(fd, str(path), (5 << 20) + 4096, seen.append)
    finally:
        os.close(fd)
    assert seen == [1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20, (5 << 20) + 4096]
    assert path.stat().st_blocks * 512 >= (5 << 20) + 4096
