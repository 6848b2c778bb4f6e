"""Per-client identities over real verbs (rxe): an ``ro`` identity's rkey does not write, and a
revoked identity's rkey dies with the reload (its MR is deregistered)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import rdma
from pmemblk.auth import create_secret, load_secret
from pmemblk.client import Client
from pmemblk.errors import PmemblkError, RemoteError
from pmemblk.transport.verbs import VerbsTransport

from ..conftest import report
from ..procs import Target, pmemblk
from .harness import ADDR

SIZE = 16 << 20
PROBE = 1 << 20  # where the one-sided writes aim


@pytest.fixture
def target(shm_region: Path, workdir: Path) -> Iterator[Target]:
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    for name in ("alice", "bob", "carol"):
        create_secret(str(workdir / f"{name}.secret"))
    clients = workdir / "clients"
    clients.write_text("alice rw alice.secret\nbob ro bob.secret\ncarol rw carol.secret\n")
    clients.chmod(0o600)
    t = Target(str(shm_region), f"{ADDR}:7610", workdir, "--shared", "--clients",
               str(clients), "--control", str(workdir / "control.sock")).start()
    yield t
    t.stop()


def as_(t: Target, name: str, readonly: bool = False) -> VerbsTransport:
    secret = load_secret(str(t.log_path.parent / f"{name}.secret"))
    return VerbsTransport(ADDR, t.port, readonly=readonly, secret=secret, identity=name)


def one_sided_write(t: VerbsTransport, rkey: int, remote_addr: int, fill: int) -> int | str:
    """A one-sided 4 KiB WRITE of ``fill`` bytes from ``t`` with ``rkey``: its completion
    status, or why it could not even be posted (the QP is in error)."""
    assert t.ep is not None and t.buffers is not None
    t.buffers.view[:4096] = bytes([fill]) * 4096
    try:
        t.ep.post(99, rdma.e.IBV_WR_RDMA_WRITE, t.buffers.addr, 4096, t.buffers.lkey,
                  remote_addr + PROBE, rkey)
        wcs = t.ep.wait(time.monotonic() + 60)
    except PmemblkError as exc:
        return str(exc)
    return int(wcs[0].status)


def probe(t: Target) -> bytes:
    with Client(as_(t, "bob", readonly=True), readonly=True) as c:
        buf = bytearray(4096)
        c.pread(memoryview(buf), PROBE)
        return bytes(buf)


def test_an_ro_identitys_write_fails_with_a_remote_access_error(target: Target) -> None:
    with pytest.raises(RemoteError, match="identity bob may only read"):
        as_(target, "bob")
    before = probe(target)
    reader = as_(target, "bob", readonly=True)
    try:
        assert reader.info.readonly
        status = one_sided_write(reader, reader.info.rkey, reader.info.remote_addr, 0xEE)
    finally:
        reader.close()
    assert status == rdma.e.IBV_WC_REM_ACCESS_ERR, status
    assert probe(target) == before
    report("ro identity's one-sided WRITE with its own rkey: remote access error")


def test_revocation_kills_a_live_rdma_clients_rkey(target: Target, workdir: Path) -> None:
    alice = as_(target, "alice")
    rkey, addr = alice.info.rkey, alice.info.remote_addr
    assert one_sided_write(alice, rkey, addr, 0xAA) == rdma.e.IBV_WC_SUCCESS  # live: works
    assert probe(target) == b"\xaa" * 4096
    clients = workdir / "clients"
    clients.write_text("bob ro bob.secret\ncarol rw carol.secret\n")  # alice is revoked
    started = time.monotonic()
    out = pmemblk("reload", "--target", str(workdir / "control.sock"))
    took = time.monotonic() - started
    assert "1 removed" in out.stdout
    target.wait_log("revoking its rkey")
    try:
        # alice's own next one-sided WRITE fails (its QP's peer and MR are gone) ...
        status = one_sided_write(alice, rkey, addr, 0xBB)
        assert status != rdma.e.IBV_WC_SUCCESS, "a revoked client's WRITE succeeded"
    finally:
        alice.close()
    # ... and its rkey is dead for anyone: another identity's live QP using it is refused.
    carol = as_(target, "carol")
    try:
        assert carol.info.rkey != rkey
        stolen = one_sided_write(carol, rkey, addr, 0xCC)
    finally:
        carol.close()
    assert stolen == rdma.e.IBV_WC_REM_ACCESS_ERR, stolen
    assert probe(target) == b"\xaa" * 4096  # neither write landed
    with pytest.raises(RemoteError, match="authentication failed"):
        as_(target, "alice")
    status_name = rdma.WC_STATUS_NAMES.get(status, str(status)) if isinstance(status, int) \
        else status
    report(f"revoked identity: its next one-sided WRITE: {status_name}; its rkey on another "
           f"QP: remote access error; pmemblk reload took {took * 1000:.0f} ms")
