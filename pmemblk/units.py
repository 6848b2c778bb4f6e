"""Sizes as people write them: ``4096``, ``64M``, ``64MiB``, ``1G`` (binary units)."""

from __future__ import annotations

import re

from .errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64M``, ``64MiB``, ``1G``: binary units."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"size {text!r} is not a number with an optional K, M, G or T suffix")
    value = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return value


def human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.6g} {unit}"
    return f"{n} bytes"
