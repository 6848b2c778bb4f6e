"""Atomic blocks, recovery judged by what survives a power cut (the durable copy), flog
sequence numbers across their 32-bit wrap, and the map search that must never take a map
entry's sequence half for a block number."""

from __future__ import annotations

import pytest

from pmemblk import atomicblocks as ab
from pmemblk.errors import LayoutError

from .test_atomicblocks import (
    MemArea,
    check_consistent,
    free_blocks,
    lane_record,
    map_entry,
    move,
    set_map,
)

LINE = 64  # pmemblk.powercut persists whole cache lines


class DurableArea(MemArea):
    """A data area with a durable copy that only persist() updates, a cache line at a time
    (as pmemblk.powercut's durable image); ``power_cut()`` brings back only that copy."""

    def __init__(self) -> None:
        super().__init__()
        self.durable = bytearray(self.buf)
        self._persist = self._to_durable

    def _to_durable(self, off: int, n: int) -> None:
        self.persisted.append((off, n))
        lo, hi = off // LINE * LINE, -(-(off + n) // LINE) * LINE
        self.durable[lo:hi] = self.buf[lo:hi]

    def power_cut(self) -> None:
        self.buf[:] = self.durable


@pytest.fixture
def durable() -> tuple[DurableArea, ab.Info]:
    area = DurableArea()
    info = ab.format_area(area, 4096, lanes=4)
    area.durable[:] = area.buf  # formatted and persisted
    return area, info


def test_a_move_found_done_has_its_map_entry_persistent_before_its_old_block_is_free(
        durable: tuple[DurableArea, ab.Info]) -> None:
    """The writer left after its map move, before the move was persisted (its connection
    died): recovery frees the old block, so the map entry must be persistent first, or a
    power cut after the next writer reuses that block brings back a map entry pointing at it."""
    area, info = durable
    old, new = move(area, info, 0, 5, flip=False)
    area.persist(info.slot_at(0, 0), ab.FLOG_LANE)  # data and record persisted, then moved
    set_map(area, info, 5, new)  # in the live map only
    result = ab.recover(area)
    assert (result.completed, result.rolled_back) == (1, 0)
    assert free_blocks(area, info)[0] == ab.entry_block(old)
    area.power_cut()
    assert map_entry(area, info, 5) == new  # the move survives with the freed block
    check_consistent(area, info)  # the old block is not both mapped and free


def test_an_overtaken_move_found_done_has_the_current_entry_persistent(
        durable: tuple[DurableArea, ab.Info]) -> None:
    """Lane 0 moved block 9, lane 1 moved it again, neither move persisted: recovery frees
    lane 0's old block and lane 1's; what the map holds now must be what survives."""
    area, info = durable
    for lane in (0, 1):
        move(area, info, lane, 9, flip=False)
        area.persist(info.slot_at(lane, 0), ab.FLOG_LANE)
        set_map(area, info, 9, lane_record(area, info, lane).new)
    now = map_entry(area, info, 9)
    ab.recover(area)
    area.power_cut()
    assert map_entry(area, info, 9) == now
    check_consistent(area, info)


def test_recovery_then_a_power_cut_then_recovery_again_is_settled_and_whole(
        durable: tuple[DurableArea, ab.Info]) -> None:
    """Every lane in another state (done, not done, overtaken, settled): recovered, cut,
    and recovered again, the durable copy is whole and the second recovery changes nothing."""
    area, info = durable
    move(area, info, 0, 1)  # done, nothing persisted but the record's slot below
    move(area, info, 1, 2, flip=False)  # not done
    move(area, info, 2, 3)
    move(area, info, 3, 3)  # lane 2's move overtaken by lane 3's
    area.persist(info.flog_offset, info.lanes * ab.FLOG_LANE)
    ab.recover(area)
    area.power_cut()
    check_consistent(area, info)
    before = bytes(area.buf)
    again = ab.recover(area)
    assert (again.completed, again.rolled_back) == (0, 0) and bytes(area.buf) == before



class PowerCut(Exception):
    pass


class TearsAFlogWrite(MemArea):
    """The first write into the flog lands half (the power fails in it); everything written
    before reached media."""

    def __init__(self) -> None:
        super().__init__()
        self.flog: tuple[int, int] | None = None

    def _put(self, off: int, data: bytes) -> None:
        if self.flog is not None and self.flog[0] <= off < self.flog[1]:
            self.flog = None
            super()._put(off, data[:len(data) // 2])
            raise PowerCut
        super()._put(off, data)


@pytest.mark.parametrize("flip", [True, False])
def test_a_recovery_cut_while_it_writes_a_settled_record_is_recovered_again(flip: bool) -> None:
    """Recovery writes a lane's settled record into the slot that does not hold the current
    record: torn there, the current one still decides, the same way, the next time."""
    area = TearsAFlogWrite()
    info = ab.format_area(area, 4096, lanes=4)
    old, new = move(area, info, 0, 5, flip=flip)
    area.flog = (info.flog_offset, info.map_offset)
    with pytest.raises(PowerCut):
        ab.recover(area)
    result = ab.recover(area)
    assert (result.completed, result.rolled_back) == ((1, 0) if flip else (0, 1))
    assert free_blocks(area, info)[0] == ab.entry_block(old if flip else new)
    check_consistent(area, info)


class CutAtAFlogWrite(DurableArea):
    """The power fails as recovery writes its ``n``-th flog slot (counting from 0): only what
    was persisted before survives."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.flog = (0, 0)  # where the flog is (set once formatted)
        self.n: int | None = None
        self.cut_at = n

    def _put(self, off: int, data: bytes) -> None:
        if self.n is not None and self.flog[0] <= off < self.flog[1]:
            if self.n == self.cut_at:
                self.n = None
                raise PowerCut
            self.n += 1
        super()._put(off, data)


def test_a_power_cut_in_the_middle_of_recovery_leaves_a_recoverable_durable_copy() -> None:
    """Two finished moves whose map moves were never persisted: the power fails after
    recovery persisted the first lane's settled record. The map entries must have been made
    persistent before it, or the first lane's free block is still mapped after the cut."""
    area = CutAtAFlogWrite(1)
    info = ab.format_area(area, 4096, lanes=4)
    area.durable[:] = area.buf
    for lane, lba in ((0, 5), (1, 6)):
        move(area, info, lane, lba, flip=False)
        area.persist(info.slot_at(lane, 0), ab.FLOG_LANE)
        set_map(area, info, lba, lane_record(area, info, lane).new)  # live only
    area.flog, area.n = (info.flog_offset, info.map_offset), 0
    with pytest.raises(PowerCut):
        ab.recover(area)
    area.power_cut()
    ab.recover(area)
    check_consistent(area, info)

# -- flog sequence numbers across the wrap (the field is 32 bits; 0 means an empty slot) --

TOP = ab.BLOCK_MASK  # the largest sequence number


def set_lane(area: MemArea, info: ab.Info, lane: int, slot: int, seq: int) -> None:
    """Rewrite a lane's settled record as sequence ``seq`` in ``slot`` (the other slot an
    older record of the same free block, ``seq - 1`` across the wrap)."""
    rec = lane_record(area, info, lane)
    area.write(info.slot_at(lane, slot), ab.FlogRecord(rec.lba, rec.old, rec.new, seq).encode())
    prev = seq - 1 if seq > 1 else TOP
    area.write(info.slot_at(lane, 1 - slot),
               ab.FlogRecord(rec.lba, rec.old, rec.new, prev).encode())


def test_sequence_order_wraps_and_skips_zero() -> None:
    assert ab.next_seq(TOP) == 1 and ab.next_seq(TOP - 1) == TOP
    assert ab.newer(1, TOP) and not ab.newer(TOP, 1)
    assert ab.newer(TOP, TOP - 1) and not ab.newer(5, 5)
    top = ab.FlogRecord(0, 7, 7, TOP).encode()
    one = ab.FlogRecord(0, 8, 8, 1).encode()
    for raw, slot in ((top + one, 1), (one + top, 0)):
        cur = ab.current_record(raw)
        assert cur is not None and cur[0] == slot and cur[1].seq == 1


@pytest.mark.parametrize("slot", [0, 1])
@pytest.mark.parametrize("seq", [TOP - 1, TOP])
@pytest.mark.parametrize("flip", [True, False])
def test_a_move_recorded_across_the_wrap_is_recovered(
        durable: tuple[DurableArea, ab.Info], slot: int, seq: int, flip: bool) -> None:
    """A lane whose current record is at (or one before) the last sequence number, in either
    slot: the move's record takes the next number (1 after the last), and recovery reads it
    as the newer, done or not."""
    area, info = durable
    set_lane(area, info, 2, slot, seq)
    old, new = move(area, info, 2, 6, flip=flip)
    rec = lane_record(area, info, 2)
    assert rec.seq == ab.next_seq(seq) and rec.new == new
    result = ab.recover(area)
    assert (result.completed, result.rolled_back) == ((1, 0) if flip else (0, 1))
    assert free_blocks(area, info)[2] == ab.entry_block(old if flip else new)
    assert lane_record(area, info, 2).seq == ab.next_seq(ab.next_seq(seq))
    check_consistent(area, info)


def test_map_sequence_numbers_wrap_past_zero() -> None:
    """A map entry moved for the 2^32nd time keeps its block and restarts its count at 1, so
    a reader comparing entries sees a change."""
    old = ab.entry(77, TOP)
    new = ab.next_entry(old, 99)
    assert ab.entry_block(new) == 99 and new >> 32 == 1 and new != old
    assert ab.next_entry(ab.entry(3, 41), 5) == ab.entry(5, 42)


# -- the map search: whole entries' block halves only, every chunk, to the last entry --

@pytest.mark.parametrize("chunk", [ab.MAP_CHUNK, 16, 24])
def test_the_map_search_never_takes_a_sequence_for_a_block(
        fresh_small: tuple[MemArea, ab.Info], chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "MAP_CHUNK", chunk)
    area, info = fresh_small
    spare = info.external_blocks  # a lane's free block: mapped nowhere
    assert not ab._in_map(area, info, spare)
    set_map(area, info, 4, ab.entry(4, spare))  # its number only as a sequence
    assert not ab._in_map(area, info, spare)
    set_map(area, info, 5, ab.entry(spare, 0))  # the block half of the very next entry
    assert ab._in_map(area, info, spare)


@pytest.mark.parametrize("chunk", [ab.MAP_CHUNK, 16, 24, 8])
@pytest.mark.parametrize("where", ["first", "chunk edge", "last"])
def test_the_map_search_finds_a_block_in_every_chunk(
        fresh_small: tuple[MemArea, ab.Info], chunk: int, where: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "MAP_CHUNK", chunk)
    area, info = fresh_small
    spare = info.external_blocks
    lba = {"first": 0, "chunk edge": min(chunk // ab.ENTRY, info.external_blocks - 1),
           "last": info.external_blocks - 1}[where]
    set_map(area, info, lba, ab.entry(spare, 3))
    assert ab._in_map(area, info, spare)


def test_recovery_does_not_take_a_sequence_in_the_map_for_its_block(
        durable: tuple[DurableArea, ab.Info]) -> None:
    """Lane 0's recorded move of block 4 never happened and another lane moved block 4 since:
    lane 0's new block is mapped nowhere, though some map entry's sequence is its number."""
    area, info = durable
    _, new0 = move(area, info, 0, 4, flip=False)
    move(area, info, 1, 4)
    moved = map_entry(area, info, 4)
    set_map(area, info, 4, ab.entry(ab.entry_block(moved), ab.entry_block(new0)))
    # lane 1 settled (its record persisted as settled), so only the map can tell
    rec = lane_record(area, info, 1)
    cur = ab.current_record(area.read(info.slot_at(1, 0), ab.FLOG_LANE))
    assert cur is not None
    area.write(info.slot_at(1, 1 - cur[0]),
               ab.FlogRecord(rec.lba, rec.old, rec.old, ab.next_seq(rec.seq)).encode())
    ab.recover(area)
    assert free_blocks(area, info)[0] == ab.entry_block(new0)
    check_consistent(area, info)


@pytest.fixture
def fresh_small() -> tuple[MemArea, ab.Info]:
    area = MemArea(64 << 10)  # a map of a few entries: chunk edges within reach
    return area, ab.format_area(area, 512, lanes=2)


@pytest.mark.parametrize("reused", [True, False])
def test_a_block_named_by_a_stale_record_does_not_make_a_lost_move_happen(
        durable: tuple[DurableArea, ab.Info], reused: bool) -> None:
    """Lane 0 moved block 1 into its free block F0; lane 1 moved block 1 on (F0 is lane 1's
    free now) and recorded a move of block 2 into F0, but lane 2 moved block 2 first and then
    block 3 into block 2's old place. Lane 0's record still names F0 (its move's new block):
    that does not mean lane 1's lost move happened. Lane 1's free block is F0; taking block 2's
    old place (mapped at block 3, or lane 2's free block if block 3 did not move) would hand
    a block in use to the next writer."""
    area, info = durable
    f0 = info.external_blocks  # lane 0's free block after format
    ab.recover(area)  # all settled: lane i's free is f0 + i
    e = ab.entry
    moves = [  # lane, lba, old, new, whether the map moved
        (0, 1, e(1, 0), e(f0, 1), True),
        (1, 1, e(f0, 1), e(f0 + 1, 2), True),
        (1, 2, e(2, 0), e(f0, 1), False),  # lost to lane 2's move just below
        (2, 2, e(2, 0), e(f0 + 2, 1), True),
        (2, 3, e(3, 0), e(2, 1), True),
    ][:None if reused else -1]
    record_moves(area, info, moves)
    area.persist(info.flog_offset, info.data_offset - info.flog_offset)  # then the power cut
    ab.recover(area)
    assert free_blocks(area, info) == [1, f0, 3 if reused else 2, f0 + 3]
    check_consistent(area, info)


def record_moves(area: MemArea, info: ab.Info,
                 moves: list[tuple[int, int, int, int, bool]]) -> None:
    """Each move (lane, lba, old entry, new entry, whether the map moved) recorded in its
    lane's next slot, the map moved if it did."""
    for lane, lba, old, new, moved in moves:
        cur = ab.current_record(area.read(info.slot_at(lane, 0), ab.FLOG_LANE))
        assert cur is not None
        slot, rec = cur
        area.write(info.slot_at(lane, 1 - slot),
                   ab.FlogRecord(lba, old, new, ab.next_seq(rec.seq)).encode())
        if moved:
            set_map(area, info, lba, new)


def test_overtaken_lanes_in_a_chain_are_decided_once_one_block_is_left(
        durable: tuple[DurableArea, ab.Info]) -> None:
    """Lane 0 lost its move of block 5 to lane 1, whose move lane 2 overtook: lane 0's
    old block is lane 1's free block, known only once lane 1 is decided (after lane 0)."""
    area, info = durable
    f0, e = info.external_blocks, ab.entry
    record_moves(area, info, [
        (0, 5, e(5, 0), e(f0, 1), False),
        (1, 5, e(5, 0), e(f0 + 1, 1), True),
        (2, 5, e(f0 + 1, 1), e(f0 + 2, 2), True),
    ])
    result = ab.recover(area)
    assert (result.completed, result.rolled_back) == (2, 1)
    assert free_blocks(area, info) == [f0, 5, f0 + 1, f0 + 3]
    check_consistent(area, info)


def test_a_move_whose_blocks_are_both_in_use_is_refused(
        durable: tuple[DurableArea, ab.Info]) -> None:
    area, info = durable
    record_moves(area, info, [(0, 5, ab.entry(1, 0), ab.entry(2, 1), False)])
    set_map(area, info, 5, ab.entry(5, 3))  # neither: overtaken, both blocks mapped
    before = bytes(area.buf)
    with pytest.raises(LayoutError, match="lane 0: both blocks of its last move are in use"):
        ab.recover(area)
    assert bytes(area.buf) == before


def test_lanes_whose_free_block_cannot_be_told_are_refused(
        durable: tuple[DurableArea, ab.Info]) -> None:
    """Two overtaken lanes naming the same two unmapped blocks: either could be either's."""
    area, info = durable
    f0, e = info.external_blocks, ab.entry
    record_moves(area, info, [(0, 5, e(f0 + 1, 0), e(f0, 1), False),
                              (1, 6, e(f0, 0), e(f0 + 1, 1), False)])
    with pytest.raises(LayoutError, match=r"lanes \[0, 1\]: which block .* cannot be told"):
        ab.recover(area)
