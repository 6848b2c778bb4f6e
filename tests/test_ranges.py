from __future__ import annotations

import random

from pmemblk.ranges import RangeSet


def model_ranges(bits: list[bool]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(bits):
        if bits[i]:
            j = i
            while j < len(bits) and bits[j]:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def test_merges_overlapping_and_adjacent() -> None:
    s = RangeSet()
    s.add(10, 5)
    s.add(0, 5)
    s.add(5, 5)  # bridges both
    s.add(100, 1)
    s.add(50, 0)  # empty: ignored
    assert s.total() == 16
    assert s.take() == [(0, 15), (100, 1)]
    assert not s and len(s) == 0


def test_matches_a_bitmap_model() -> None:
    rng = random.Random(7)
    for _ in range(200):
        s = RangeSet()
        bits = [False] * 300
        for _ in range(rng.randrange(1, 40)):
            off, n = rng.randrange(0, 280), rng.randrange(0, 20)
            s.add(off, n)
            for k in range(off, off + n):
                bits[k] = True
        expected = model_ranges(bits)
        assert len(s) == len(expected)
        assert s.take() == expected
