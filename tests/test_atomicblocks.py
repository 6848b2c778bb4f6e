"""Atomic blocks: the layout, and recovery's decision for every way a move can be cut short."""

from __future__ import annotations

import pytest

from pmemblk import atomicblocks as ab
from pmemblk.errors import LayoutError

AREA = 1 << 20


class MemArea(ab.Area):
    def __init__(self, size: int = AREA) -> None:
        self.buf = bytearray(size)
        self.persisted: list[tuple[int, int]] = []
        super().__init__(self._get, self._put, lambda off, n: self.persisted.append((off, n)),
                         0, size)

    def _get(self, off: int, n: int) -> bytes:
        return bytes(self.buf[off:off + n])

    def _put(self, off: int, data: bytes) -> None:
        self.buf[off:off + len(data)] = data


def map_entry(area: MemArea, info: ab.Info, lba: int) -> int:
    return int.from_bytes(area.read(info.map_at(lba), 8), "little")


def set_map(area: MemArea, info: ab.Info, lba: int, value: int) -> None:
    area.write(info.map_at(lba), value.to_bytes(8, "little"))


def lane_record(area: MemArea, info: ab.Info, lane: int) -> ab.FlogRecord:
    cur = ab.current_record(area.read(info.slot_at(lane, 0), ab.FLOG_LANE))
    assert cur is not None
    return cur[1]


def write_record(area: MemArea, info: ab.Info, lane: int, lba: int, old: int, new: int) -> None:
    """What a writer does before its compare-and-swap: the next record, in the other slot."""
    cur = ab.current_record(area.read(info.slot_at(lane, 0), ab.FLOG_LANE))
    assert cur is not None
    slot, rec = cur
    area.write(info.slot_at(lane, 1 - slot),
               ab.FlogRecord(lba, old, new, ab.next_seq(rec.seq)).encode())


def free_blocks(area: MemArea, info: ab.Info) -> list[int]:
    return [ab.entry_block(lane_record(area, info, lane).new) for lane in range(info.lanes)]


def check_consistent(area: MemArea, info: ab.Info) -> None:
    """Every physical block is mapped once or is one lane's free block, never both."""
    mapped = [ab.entry_block(map_entry(area, info, lba)) for lba in range(info.external_blocks)]
    frees = free_blocks(area, info)
    assert sorted(mapped + frees) == list(range(info.internal_blocks))


@pytest.fixture
def fresh() -> tuple[MemArea, ab.Info]:
    area = MemArea()
    return area, ab.format_area(area, 4096, lanes=4)


def test_geometry_fits_and_reads_back(fresh: tuple[MemArea, ab.Info]) -> None:
    area, info = fresh
    assert ab.read_info(area) == info
    assert info.end <= AREA and info.internal_blocks == info.external_blocks + 4
    check_consistent(area, info)
    for sector in (512, 4096):
        g = ab.geometry(64 << 20, sector)
        assert g.end <= (64 << 20) and g.data_offset % max(sector, 4096) == 0
        assert g.end + sector + 8 > (64 << 20) - 3 * 4096  # nothing large left unused


def test_bad_geometry_and_corrupt_info_are_refused() -> None:
    with pytest.raises(LayoutError, match="sector size 8192"):
        ab.geometry(AREA, 8192)
    with pytest.raises(LayoutError, match="too small"):
        ab.geometry(8192, 4096)
    area = MemArea()
    ab.format_area(area, 512, lanes=2)
    area.buf[20] ^= 1
    with pytest.raises(LayoutError, match="checksum"):
        ab.read_info(area)
    with pytest.raises(LayoutError, match="does not fit"):
        ab.Info.decode(ab.geometry(AREA, 4096).encode(), AREA // 2)


def move(area: MemArea, info: ab.Info, lane: int, lba: int, *, record: bool = True,
         flip: bool = True) -> tuple[int, int]:
    """One writer's move of ``lba`` into ``lane``'s free block, cut after the record
    (``flip=False``) or before it (``record=False``)."""
    rec = lane_record(area, info, lane)
    done = not rec.settled and map_entry(area, info, rec.lba) == rec.new
    free = ab.entry_block(rec.old if done else rec.new)
    old = map_entry(area, info, lba)
    new = ab.next_entry(old, free)
    if record:
        write_record(area, info, lane, lba, old, new)
    if flip:
        set_map(area, info, lba, new)
    return old, new


def test_a_finished_move_frees_the_old_block(fresh: tuple[MemArea, ab.Info]) -> None:
    area, info = fresh
    old, new = move(area, info, 0, 5)
    result = ab.recover(area)
    assert (result.completed, result.rolled_back) == (1, 0)
    assert free_blocks(area, info)[0] == ab.entry_block(old)
    assert map_entry(area, info, 5) == new
    check_consistent(area, info)


def test_a_move_cut_before_the_map_changed_is_rolled_back(
        fresh: tuple[MemArea, ab.Info]) -> None:
    area, info = fresh
    old, new = move(area, info, 1, 7, flip=False)
    result = ab.recover(area)
    assert (result.completed, result.rolled_back) == (0, 1)
    assert free_blocks(area, info)[1] == ab.entry_block(new)
    assert map_entry(area, info, 7) == old
    check_consistent(area, info)


def test_a_torn_record_leaves_the_previous_one(fresh: tuple[MemArea, ab.Info]) -> None:
    area, info = fresh
    before = free_blocks(area, info)
    move(area, info, 2, 3, flip=False)
    cur = ab.current_record(area.read(info.slot_at(2, 0), ab.FLOG_LANE))
    assert cur is not None
    area.buf[info.slot_at(2, cur[0]) + 9] ^= 0xFF  # the new record torn by the power cut
    ab.recover(area)
    assert free_blocks(area, info) == before
    check_consistent(area, info)


def test_a_move_overtaken_by_another_lane_is_told_from_its_record(
        fresh: tuple[MemArea, ab.Info]) -> None:
    """Lane 0 moved block 9, then lane 1 moved it again: lane 0's new block is now lane 1's
    free one, so lane 0's move happened and its old block is free."""
    area, info = fresh
    old0, new0 = move(area, info, 0, 9)
    old1, _ = move(area, info, 1, 9)
    assert old1 == new0
    ab.recover(area)
    frees = free_blocks(area, info)
    assert frees[0] == ab.entry_block(old0) and frees[1] == ab.entry_block(new0)
    check_consistent(area, info)


@pytest.mark.parametrize("chunk", [ab.MAP_CHUNK, 16])
def test_a_move_overtaken_and_its_block_mapped_elsewhere_is_found_in_the_map(
        fresh: tuple[MemArea, ab.Info], chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lane 0 moved block 9; lane 1 moved it again (freeing lane 0's new block), wrote block
    20 into that block, then block 30 elsewhere: it is found only in the map (searched a
    chunk at a time)."""
    monkeypatch.setattr(ab, "MAP_CHUNK", chunk)
    area, info = fresh
    old0, new0 = move(area, info, 0, 9)
    move(area, info, 1, 9)
    move(area, info, 1, 20)  # into lane 0's new block, freed by the move above
    assert ab.entry_block(map_entry(area, info, 20)) == ab.entry_block(new0)
    move(area, info, 1, 30)  # and on: no lane's record names that block any more
    ab.recover(area)
    assert free_blocks(area, info)[0] == ab.entry_block(old0)
    check_consistent(area, info)


def test_an_overtaken_move_that_never_happened_is_rolled_back(
        fresh: tuple[MemArea, ab.Info]) -> None:
    """Lane 0 recorded a move of block 4 but lost the race: lane 1 moved it first."""
    area, info = fresh
    _, new0 = move(area, info, 0, 4, flip=False)
    move(area, info, 1, 4)
    ab.recover(area)
    assert free_blocks(area, info)[0] == ab.entry_block(new0)
    check_consistent(area, info)


def test_recovery_is_idempotent(fresh: tuple[MemArea, ab.Info]) -> None:
    area, info = fresh
    move(area, info, 0, 1)
    move(area, info, 1, 2, flip=False)
    ab.recover(area)
    first = bytes(area.buf)
    again = ab.recover(area)
    assert bytes(area.buf) == first and (again.completed, again.rolled_back) == (0, 0)


def test_a_corrupt_flog_is_refused_not_guessed(fresh: tuple[MemArea, ab.Info]) -> None:
    area, info = fresh
    area.buf[info.slot_at(3, 0) + 1] ^= 1
    area.buf[info.slot_at(3, 1) + 1] ^= 1  # both slots: nothing to go by
    with pytest.raises(LayoutError, match="lane 3: both flog slots are corrupt"):
        ab.recover(area)


def test_lanes_are_taken_only_settled(fresh: tuple[MemArea, ab.Info]) -> None:
    area, info = fresh
    lane = ab.lane_from(info, 0, area.read(info.slot_at(0, 0), ab.FLOG_LANE), grant=1)
    assert lane.free == info.external_blocks
    move(area, info, 0, 1)
    with pytest.raises(LayoutError, match="lane 0 was not recovered"):
        ab.lane_from(info, 0, area.read(info.slot_at(0, 0), ab.FLOG_LANE), grant=1)


def test_two_lanes_with_one_free_block_are_refused_before_anything_is_rewritten(
        fresh: tuple[MemArea, ab.Info]) -> None:
    area, info = fresh
    move(area, info, 0, 5, flip=False)  # lane 0 has a move to settle
    free1 = ab.entry_block(lane_record(area, info, 1).new)
    write_record(area, info, 2, 0, ab.entry(free1, 0), ab.entry(free1, 0))  # lane 2: lane 1's
    before = bytes(area.buf)
    with pytest.raises(LayoutError, match="two lanes with the same free block"):
        ab.recover(area)
    assert bytes(area.buf) == before
