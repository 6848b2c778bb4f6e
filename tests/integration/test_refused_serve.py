"""A serve that is refused changes nothing in the region: not its state word, not its loss
epoch, not a byte. A target that did not open the region for serving must never mark it clean,
or the next serve after a power cut keeps the loss epoch and acknowledges FLUSHes of lost
writes (the loss epoch's damaged and maximum words; an atomic-blocks region whose log is
corrupt after an unclean stop)."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest

from pmemblk import layout
from pmemblk.pmem import PmemRegion

from ..procs import Target, pmemblk, region_info
from .conftest import read
from .test_atomic import client
from .test_hostile import one_error_line
from .test_lane_recovery import corrupt_flog


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def serve_refused(region: str, tmp_path: Path) -> str:
    res = pmemblk("serve", region, "--listen", f"unix:{tmp_path / 'refused.sock'}",
                  "--transport", "tcp", check=False)
    return one_error_line(res)


def killed_after_a_write(region: str, tmp_path: Path) -> None:
    t = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, transport="tcp").start()
    with client(t) as c:
        c.pwrite(memoryview(b"\x5a" * 4096), 8192)
    t.stop(9)  # SIGKILL: not clean


def poke_header(region: str, offset: int, data: bytes) -> None:
    with PmemRegion.open(region) as r:
        r.write(offset, data)
        r.persist(offset, len(data))


@pytest.mark.parametrize("word", [2**64 - 1, 1 << 40, 0x0123456789ABCDEF])
def test_a_damaged_loss_epoch_is_refused_in_one_line_and_read_only_still_serves(
        region: str, tmp_path: Path, word: int) -> None:
    killed_after_a_write(region, tmp_path)
    poke_header(region, layout.LOSS_EPOCH_OFFSET, word.to_bytes(8, "little"))
    before = digest(region)
    line = serve_refused(region, tmp_path)
    assert f"{region}: its loss epoch word" in line and "is damaged" in line, line
    assert "serve it --readonly" in line.lower()
    assert digest(region) == before
    assert str(region_info(region)["loss_epoch"]).startswith("damaged: ")
    reader = Target(region, f"unix:{tmp_path / 'r.sock'}", tmp_path, "--readonly",
                    transport="tcp").start()
    with client(reader, readonly=True) as c:
        assert read(c, 8192, 4096) == b"\x5a" * 4096
    reader.stop()
    assert "is damaged" in reader.log() and digest(region) == before


def test_at_the_maximum_a_needed_increment_is_refused_in_one_line(region: str,
                                                                  tmp_path: Path) -> None:
    killed_after_a_write(region, tmp_path)
    poke_header(region, layout.LOSS_EPOCH_OFFSET,
                layout.encode_loss_epoch(layout.LOSS_EPOCH_MAX).to_bytes(8, "little"))
    # The same boot: the killed target's writes are all in the region, the epoch need not move.
    t = Target(region, f"unix:{tmp_path / 'same.sock'}", tmp_path, transport="tcp").start()
    with client(t) as c:
        assert c.transport.info.loss_epoch == layout.LOSS_EPOCH_MAX
        c.pwrite(memoryview(b"\xa5" * 4096), 0)
    t.stop(9)
    poke_header(region, layout.BOOT_ID_OFFSET, uuid.uuid4().bytes)  # then a power cut
    before = digest(region)
    line = serve_refused(region, tmp_path)
    assert "its loss epoch is at its maximum (4294967295)" in line, line
    assert digest(region) == before
    assert region_info(region)["loss_epoch"] == layout.LOSS_EPOCH_MAX


def test_a_refused_atomic_blocks_serve_after_an_unclean_stop_changes_nothing(
        tmp_path: Path) -> None:
    """A corrupt flog lane after a SIGKILL: serve refuses, and the region is byte for byte
    as it was: still not clean, the same times served, loss epoch and boot id. (It used to
    persist and mark the region cleanly shut down on its way out.)"""
    region = str(tmp_path / "atomic.img")
    pmemblk("create", region, "--size", "4M", "--atomic-blocks", "--lanes", "16")
    killed_after_a_write(region, tmp_path)
    corrupt_flog(region, 5)
    before, state = digest(region), region_info(region)
    assert state["clean_shutdown"] is False
    line = serve_refused(region, tmp_path)
    assert "lane 5: both flog slots are corrupt" in line, line
    assert digest(region) == before
    assert region_info(region) == state
    assert os.path.getsize(region) == 4 << 20
