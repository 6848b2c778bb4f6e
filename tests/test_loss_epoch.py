"""The loss epoch's word at its limits: its own CRC (the header's does not cover it), the plain
count of earlier versions, and the maximum, where a needed increment is refused."""

from __future__ import annotations

import uuid
import zlib
from pathlib import Path

import pytest

from pmemblk import layout
from pmemblk.errors import LayoutError
from pmemblk.pmem import PmemRegion

SIZE = 1 << 20
MAX = layout.LOSS_EPOCH_MAX


@pytest.fixture
def region(tmp_path: Path) -> PmemRegion:
    r = PmemRegion.create(str(tmp_path / "r.img"), SIZE)
    layout.format_region(r)
    return r


def poke(region: PmemRegion, word: int) -> None:
    region.store_u64(layout.LOSS_EPOCH_OFFSET, word)


@pytest.mark.parametrize("epoch", [0, 1, 0xFFFF, MAX - 1, MAX])
def test_the_word_carries_the_count_and_its_crc(epoch: int) -> None:
    word = layout.encode_loss_epoch(epoch)
    assert word >> 32 == zlib.crc32(b"loss epoch" + epoch.to_bytes(4, "little"))
    assert layout.decode_loss_epoch(word, times_served=0) == epoch
    for bit in (0, 13, 31, 32, 63):  # any one bit flipped is seen
        with pytest.raises(LayoutError, match="damaged"):
            layout.decode_loss_epoch(word ^ (1 << bit), times_served=1 << 40)


def test_out_of_range_counts_are_not_encoded() -> None:
    for bad in (-1, MAX + 1, 2**64 - 1):
        with pytest.raises(LayoutError, match="out of range"):
            layout.encode_loss_epoch(bad)


def test_an_earlier_versions_plain_count_is_believed_only_within_the_times_served() -> None:
    assert layout.decode_loss_epoch(3, times_served=3) == 3
    assert layout.decode_loss_epoch(0, times_served=0) == 0
    with pytest.raises(LayoutError, match="damaged"):
        layout.decode_loss_epoch(4, times_served=3)
    with pytest.raises(LayoutError, match=r"byte 88 of the header, 0xffffffffffffffff"):
        layout.decode_loss_epoch(2**64 - 1, times_served=2**56 - 1)


def test_a_plain_count_is_carried_on_in_the_checked_form(region: PmemRegion) -> None:
    layout.write_state(region, layout.State(False, 5))
    poke(region, 2)  # as an earlier version left it, after an unclean stop
    opening = layout.open_for_serving(region, uuid.uuid4().bytes)
    assert opening.loss_epoch == 3
    word = int.from_bytes(region.read(layout.LOSS_EPOCH_OFFSET, 8), "little")
    assert word == layout.encode_loss_epoch(3) and word >> 32


def image(region: PmemRegion) -> bytes:
    return region.read(0, layout.DATA_ALIGN)


def test_a_damaged_word_refuses_to_serve_and_changes_nothing(region: PmemRegion) -> None:
    layout.open_for_serving(region, uuid.uuid4().bytes)  # served, then killed
    poke(region, 2**64 - 1)
    before = image(region)
    for boot in (uuid.uuid4().bytes, region.read(layout.BOOT_ID_OFFSET, 16)):
        with pytest.raises(LayoutError, match=r"loss epoch word .* is damaged.*--readonly"):
            layout.open_for_serving(region, boot)
        assert image(region) == before


def test_at_the_maximum_an_increment_is_refused_and_changes_nothing(region: PmemRegion) -> None:
    boot = uuid.uuid4().bytes
    layout.open_for_serving(region, boot)  # served, then killed: not clean
    poke(region, layout.encode_loss_epoch(MAX))
    # Killed and restarted in the same boot: nothing was lost, the epoch need not move.
    assert layout.open_for_serving(region, boot).loss_epoch == MAX
    before = image(region)
    with pytest.raises(LayoutError, match=r"at its maximum \(4294967295\).*--readonly"):
        layout.open_for_serving(region, uuid.uuid4().bytes)  # another boot: it must move
    assert image(region) == before
    # A clean stop carries continuity: it serves again, still at the maximum.
    layout.write_state(region, layout.State(True, layout.read_state(region).times_served))
    assert layout.open_for_serving(region, uuid.uuid4().bytes).loss_epoch == MAX
