"""Authentication and rkey scope over real verbs (rxe): what one-sided access a client keeps."""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import rdma
from pmemblk.auth import create_secret, load_secret
from pmemblk.client import Client
from pmemblk.errors import ConfigError, RemoteError
from pmemblk.protocol import AUTH_HMAC_SHA256, CHALLENGE, Challenge, Hello
from pmemblk.transport.verbs import VerbsTransport

from ..conftest import report
from ..procs import Target, pmemblk, region_info, wait_until
from .harness import ADDR, raw_connect, verbs, vm_target

SIZE = 16 << 20
PROBE = 1 << 20  # where the forged writes aim


@pytest.fixture
def target(shm_region: Path, workdir: Path) -> Iterator[Target]:
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    t = vm_target(str(shm_region), 7600, workdir, "--shared", "--handshake-timeout", "2").start()
    yield t
    t.stop()


def forged_write(t: VerbsTransport, rkey: int, remote_addr: int) -> int:
    """A one-sided WRITE of 4 KiB of 0xEE from ``t``'s buffer with someone's rkey; its status."""
    assert t.ep is not None and t.buffers is not None
    t.buffers.view[:4096] = b"\xee" * 4096
    t.ep.post(99, rdma.e.IBV_WR_RDMA_WRITE, t.buffers.addr, 4096, t.buffers.lkey,
              remote_addr + PROBE, rkey)
    wcs = t.ep.wait(time.monotonic() + 30)
    return int(wcs[0].status)


def admitted(t: Target) -> tuple[VerbsTransport, str]:
    """A new read-write connection and its client number in the target's log."""
    seen = t.log().count("connected over RDMA")
    conn = verbs(t)
    wait_until(lambda: t.log().count("connected over RDMA") > seen, "the admission")
    return conn, re.findall(r"client (\d+) connected over RDMA", t.log())[-1]


def region_probe(t: Target) -> bytes:
    with Client(verbs(t, readonly=True), readonly=True) as c:
        buf = bytearray(4096)
        c.pread(memoryview(buf), PROBE)
        return bytes(buf)


def test_wrong_or_missing_secret_is_refused_over_rdma(target: Target, workdir: Path) -> None:
    other = workdir / "other-secret"
    create_secret(str(other))
    with pytest.raises(RemoteError, match="authentication failed") as exc:
        VerbsTransport(ADDR, target.port, secret=load_secret(str(other)))
    assert exc.value.errno == errno.EACCES
    with pytest.raises(ConfigError, match="requires authentication"):
        VerbsTransport(ADDR, target.port)
    target.wait_log("authentication failed")
    with Client(verbs(target), "gpspm") as good:  # and the right one still works
        good.pwrite(memoryview(b"ok"), 0, fua=True)


def test_rkey_dies_with_its_connection(target: Target) -> None:
    """After a client is evicted (or leaves), a WRITE with its rkey fails remotely and the
    region is unchanged."""
    before = region_probe(target)
    results = []
    for how in ("evicted", "disconnected"):
        old, number = admitted(target)
        rkey, addr = old.info.rkey, old.info.remote_addr
        assert forged_write(old, rkey, addr) == rdma.e.IBV_WC_SUCCESS  # valid while connected
        # (that write was legitimate: put the bytes back with a clean client)
        with Client(verbs(target), "gpspm") as fix:
            fix.pwrite(memoryview(before), PROBE, fua=True)
        if how == "evicted":  # a protocol violation makes the target drop it
            junk = b"PMBK\x02\x00\x04\x00" + b"\xff" * 40
            assert old.ep is not None and old.buffers is not None
            old.buffers.view[:len(junk)] = junk
            old.ep.post(1, rdma.e.IBV_WR_SEND, old.buffers.addr, len(junk), old.buffers.lkey)
            target.wait_log("disconnecting it")
        old.close()
        if how == "disconnected":
            target.wait_log(f"client {number} disconnected")
        attacker = verbs(target)  # an authenticated client holding someone else's old rkey
        try:
            assert attacker.info.rkey != rkey
            status = forged_write(attacker, rkey, addr)
        finally:
            attacker.close()
        assert status == rdma.e.IBV_WC_REM_ACCESS_ERR, rdma.WC_STATUS_NAMES.get(status, status)
        assert region_probe(target) == before
        results.append(f"{how}: remote access error")
    report(f"old rkey after its client was {', '.join(results)}; region unchanged")


def test_read_only_client_cannot_write_one_sidedly(target: Target) -> None:
    before = region_probe(target)
    reader = verbs(target, readonly=True)
    try:
        assert reader.info.readonly
        status = forged_write(reader, reader.info.rkey, reader.info.remote_addr)
    finally:
        reader.close()
    assert status == rdma.e.IBV_WC_REM_ACCESS_ERR, rdma.WC_STATUS_NAMES.get(status, status)
    assert region_probe(target) == before
    report("read-only client's one-sided WRITE with its own rkey: remote access error, "
           "region unchanged")


def test_cost_of_a_registration_per_client(shm_region: Path, workdir: Path) -> None:
    size = 256 << 20
    pmemblk("create", str(shm_region), "--size", str(size))
    t = vm_target(str(shm_region), 7601, workdir).start()
    try:
        connects = []
        for _ in range(10):
            started = time.monotonic()
            with Client(verbs(t), "gpspm"):
                connects.append(time.monotonic() - started)
            t.wait_log(f"client {len(connects)} disconnected")
        regs = [float(m) for m in re.findall(r"MR registered in ([0-9.]+) ms", t.log())]
    finally:
        t.stop()
    assert len(regs) == 10
    report(f"per-client MR over a {size >> 20} MiB region: registration median "
           f"{statistics.median(regs):.1f} ms (max {max(regs):.1f}); whole connect + "
           f"authenticate median {statistics.median(connects) * 1000:.0f} ms")


def test_an_unauthenticated_rdma_peer_learns_nothing_and_is_dropped(target: Target,
                                                                   shm_region: Path) -> None:
    """A peer that sends a valid HELLO gets only a CHALLENGE (no rkey, no address, no size),
    and is disconnected when it never answers it."""
    info = region_info(str(shm_region))
    etype, data = raw_connect(target.port, Hello().encode(), silent_for=60)
    assert etype == rdma.ce.RDMA_CM_EVENT_CONNECT_RESPONSE
    challenge = Challenge.decode(data)
    assert challenge.method == AUTH_HMAC_SHA256
    assert data[CHALLENGE.size:] == bytes(len(data) - CHALLENGE.size)  # CM padding only
    assert uuid.UUID(str(info["uuid"])).bytes not in data
    target.wait_log("did not complete the handshake within 2s")
    with Client(verbs(target), "gpspm") as good:
        good.pwrite(memoryview(b"still serving"), 0, fua=True)


def test_a_write_the_device_refuses_is_reported_once_with_its_work_request(
        target: Target, caplog: pytest.LogCaptureFixture) -> None:
    """A WRITE with an rkey the target never gave (here: its own, altered) fails at the
    remote NIC; the error names the work request (opcode, remote address, rkey, length),
    and it is logged once: by the client, which decides to reconnect, not also where the
    completion was taken. The write then goes through on the new connection."""
    first = verbs(target)
    bad = first.info.rkey ^ 0x5A5A0000
    remote = first.info.remote_addr + PROBE
    first.info = dataclasses.replace(first.info, rkey=bad)
    caplog.set_level(logging.INFO, logger="pmemblk")
    with Client(first, "gpspm", reconnect=lambda: verbs(target), reconnect_timeout=20) as c:
        c.pwrite(memoryview(b"\x5a" * 4096), PROBE, fua=True)
        assert c.reconnects == 1
        buf = bytearray(4096)
        c.pread(memoryview(buf), PROBE)
    assert bytes(buf) == b"\x5a" * 4096
    told = [r for r in caplog.records if "REM_ACCESS_ERR" in r.getMessage()]
    assert len(told) == 1, [f"{r.name}: {r.getMessage()}" for r in told]
    line = told[0].getMessage()
    for field in ("RDMA WRITE failed", f"remote address 0x{remote:x}", f"rkey 0x{bad:x}",
                  "length 4096"):
        assert field in line, (field, line)
    assert told[0].name == "pmemblk.client", told[0].name
    report(f"refused WRITE logged once, by {told[0].name}: {line}")
