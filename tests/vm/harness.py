"""The VM suite's target address; the process helpers live in tests/procs.py."""

from __future__ import annotations

import os
from pathlib import Path

from pmemblk.auth import create_secret, load_secret
from pmemblk.transport.verbs import VerbsTransport

from ..procs import Target

ADDR = os.environ.get("PMEMBLK_VM_ADDR", "192.0.2.1")


def secret_file(workdir: Path) -> Path:
    """A shared secret in ``workdir`` (made once): the VM's address is not loopback."""
    path = workdir / "secret"
    if not path.exists():
        create_secret(str(path))
    return path


def vm_target(region: str, port: int, workdir: Path, *extra: str) -> Target:
    """A verbs target on the VM's Soft-RoCE address, with authentication."""
    return Target(region, f"{ADDR}:{port}", workdir, *extra, secret=secret_file(workdir))


def verbs(t: Target, **kw: object) -> VerbsTransport:
    """A verbs connection to ``t`` that authenticates with its secret."""
    secret = load_secret(str(t.secret)) if t.secret else None
    return VerbsTransport(ADDR, t.port, secret=secret, **kw)  # type: ignore[arg-type]
