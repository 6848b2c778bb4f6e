"""The VM suite's target address; the process helpers live in tests/procs.py."""

from __future__ import annotations

import os
from pathlib import Path

from ..procs import Target

ADDR = os.environ.get("PMEMBLK_VM_ADDR", "192.0.2.1")


def vm_target(region: str, port: int, workdir: Path, *extra: str) -> Target:
    """A verbs target on the VM's Soft-RoCE address."""
    return Target(region, f"{ADDR}:{port}", workdir, *extra)
