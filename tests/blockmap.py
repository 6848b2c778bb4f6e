"""The check every atomic-blocks test ends with: the block map and the lanes are whole."""

from __future__ import annotations

import struct

from pmemblk import atomicblocks as ab
from pmemblk import layout
from pmemblk.pmem import PmemRegion


def check_map(region: str) -> int:
    """With its target stopped (so every lane settled): every physical block is mapped once
    or is one lane's free block, never both, none lost. Returns how many logical blocks sit
    elsewhere than where ``create`` put them (blocks moved)."""
    with PmemRegion.open(region) as r:
        header = layout.read_header(r)
        area = layout.data_area(r, header.data_offset, header.data_size)
        info = ab.read_info(area)
        raw = area.read(info.map_offset, info.external_blocks * ab.ENTRY)
        mapped = [ab.entry_block(v) for v in struct.unpack(f"<{info.external_blocks}Q", raw)]
        frees = []
        for lane in range(info.lanes):
            cur = ab.current_record(area.read(info.slot_at(lane, 0), ab.FLOG_LANE))
            assert cur is not None and cur[1].settled, f"lane {lane} is not settled"
            frees.append(ab.entry_block(cur[1].new))
    assert sorted(mapped + frees) == list(range(info.internal_blocks))
    return sum(1 for lba, block in enumerate(mapped) if block != lba)
