"""A set of byte ranges kept as sorted, disjoint, merged intervals (dirty-range tracking)."""

from __future__ import annotations

import bisect


class RangeSet:
    """Half-open ranges [start, end); adjacent and overlapping ranges merge on insert."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        start, end = offset, offset + length
        # First range whose end reaches start, last range whose start is within end.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def take(self) -> list[tuple[int, int]]:
        """All ranges as (offset, length), and empty the set."""
        out = [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]
        self._starts, self._ends = [], []
        return out

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))
