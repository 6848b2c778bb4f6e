"""``pmemblk status --watch``: a device's (or a target's) rates, refreshed in place.

Each refresh asks the same status the one-shot ``pmemblk status`` shows and prints, per
operation, the requests and bytes per second since the previous refresh, the p99 latency the
status reports, and the reconnects. It ends, with status 0 and one line, on Ctrl-C or when the
source stops answering (the device was detached, its nbdkit or the target stopped).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from .errors import ServiceError

#: Clear the screen and home the cursor: each frame replaces the last one on a terminal.
_HOME = "\x1b[H\x1b[2J"


@dataclass(frozen=True)
class Sample:
    """What one status answer counts: per operation (requests, bytes, p99 µs or None)."""

    ops: dict[str, tuple[int, int, float | None]]
    reconnects: int | None
    title: str


class Gone(Exception):
    """The source stopped answering; the message says how."""


def sample(st: dict[str, Any]) -> Sample:
    """Read a client's status (``ops``) or a target's (``totals``); Gone if it is not live."""
    if "totals" in st:
        t = st["totals"]
        ops: dict[str, tuple[int, int, float | None]] = {
            op: (int(t[f"{op}s"]), int(t[f"{op}_bytes"]), None)
            for op in ("read", "write", "zero", "commit")}
        return Sample(ops, None, f"target {st.get('region', '?')}, {len(st['clients'])} "
                      "client(s)")
    if "connections" not in st:  # live_status without the plugin's answer
        raise Gone(str(st.get("state", "it does not answer")))
    ops = {op: (int(s["requests"]), int(s["bytes"]),
                None if s.get("p99_us") is None else float(s["p99_us"]))
           for op, s in (st.get("ops") or {}).items()}
    return Sample(ops, int(st["reconnects"]),
                  f"{st['name']}: {st.get('device') or st.get('uri', '')}, state "
                  f"{st.get('state', '?')}")


def frame(prev: Sample | None, cur: Sample, seconds: float) -> str:
    """The table for ``cur``, with rates over the ``seconds`` since ``prev``."""
    lines = [cur.title + (f", {cur.reconnects} reconnects" if cur.reconnects is not None
                          else ""),
             f"  {'op':<7} {'ops/s':>10} {'MB/s':>10} {'p99 µs':>10}"]
    for op, (requests, nbytes, p99) in cur.ops.items():
        if prev is not None and op in prev.ops and seconds > 0:
            was = prev.ops[op]
            rate = f"{max(0, requests - was[0]) / seconds:.0f}"
            mbs = f"{max(0, nbytes - was[1]) / seconds / 1e6:.2f}"
        else:
            rate = mbs = "-"
        lines.append(f"  {op:<7} {rate:>10} {mbs:>10} "
                     f"{'-' if p99 is None else f'{p99:.1f}':>10}")
    return "\n".join(lines)


def watch(ask: Callable[[], dict[str, Any]], what: str, count: int | None = None,
          interval: float = 1.0, out: TextIO | None = None) -> str:
    """Refresh until Ctrl-C, the source goes, or ``count`` frames; the closing line."""
    out = out if out is not None else sys.stdout
    home = _HOME if out.isatty() else ""
    prev: Sample | None = None
    when = 0.0
    shown = 0
    try:
        while count is None or shown < count:
            try:
                cur = sample(ask())
            except (ServiceError, Gone) as exc:
                return f"{what} is gone: {exc}"
            except (KeyError, TypeError, ValueError) as exc:
                raise ServiceError(f"{what} answered a status pmemblk cannot show "
                                   f"({type(exc).__name__}: {exc})") from None
            now = time.monotonic()
            out.write(f"{home}{frame(prev, cur, now - when)}\n" + ("" if home else "\n"))
            out.flush()
            prev, when = cur, now
            shown += 1
            if count is None or shown < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        return "stopped"
    return f"{shown} refreshes"
