"""What a crash may and may not do to the data, as a model the crash suite checks against."""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 4096


@dataclass
class Verdict:
    checked: int  # bytes compared
    durable_written: int  # bytes written and acknowledged durable (flush or FUA) before the crash
    lost: int  # bytes that were durable and untouched since, but changed
    foreign: int  # bytes holding neither their durable value nor any value written since


class CrashModel:
    """Tracks the acknowledged-durable image and the writes since, byte for byte.

    A FLUSH acknowledges every write completed before it; FUA acknowledges its own range.
    After a crash, a byte with no write since its last durable point must hold its durable
    value; a byte written since may hold its durable value or any value written since.
    """

    def __init__(self, initial: bytes) -> None:
        self.durable = bytearray(initial)
        self.current = bytearray(initial)
        self.pending: list[tuple[int, bytes]] = []
        self.unflushed_bytes = 0
        self.durable_written = 0

    def before_write(self, offset: int, data: bytes) -> None:
        """Record a write (or zero) before it is issued: from now on it may be on media."""
        self.pending.append((offset, data))
        self.current[offset:offset + len(data)] = data
        self.unflushed_bytes += len(data)

    def fua_acked(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        self.durable[offset:end] = data
        self.durable_written += len(data)
        trimmed: list[tuple[int, bytes]] = []
        for off, d in self.pending:  # earlier writes can no longer show through this range
            e = off + len(d)
            if e <= offset or off >= end:
                trimmed.append((off, d))
                continue
            if off < offset:
                trimmed.append((off, d[:offset - off]))
            if e > end:
                trimmed.append((end, d[end - off:]))
        self.pending = trimmed

    def flush_acked(self) -> None:
        self.durable[:] = self.current
        self.durable_written += self.unflushed_bytes
        self.unflushed_bytes = 0
        self.pending = []

    def check(self, after: bytes) -> Verdict:
        assert len(after) == len(self.durable)
        lost = foreign = 0
        durable = bytes(self.durable)
        for b in range(0, len(after), BLOCK):
            if after[b:b + BLOCK] == durable[b:b + BLOCK]:
                continue
            for p in range(b, min(b + BLOCK, len(after))):
                if after[p] == durable[p]:
                    continue
                candidates = [d[p - off] for off, d in self.pending if off <= p < off + len(d)]
                if not candidates:
                    lost += 1
                elif after[p] not in candidates:
                    foreign += 1
        return Verdict(len(after), self.durable_written, lost, foreign)
