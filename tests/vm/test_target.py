"""The target against several, hostile and vanishing peers, over real verbs (rxe)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import rdma
from pmemblk.client import Client
from pmemblk.errors import ConnectionLost, RemoteError, TransportError
from pmemblk.protocol import Reject

from ..conftest import ROOT, report
from ..conftest import roundtrip as shared_roundtrip
from ..procs import PY, Target, pmemblk, rss_kib
from .harness import ADDR, raw_connect, verbs, vm_target

SIZE = 16 << 20


@pytest.fixture
def target(shm_region: Path, workdir: Path, request: pytest.FixtureRequest) -> Iterator[Target]:
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    port = 7200 + zlib.crc32(request.node.name.encode()) % 500
    t = vm_target(str(shm_region), port, workdir, "--shared").start()  # several writers
    yield t
    t.stop()


def connect(t: Target, **kw: object) -> Client:
    return Client(verbs(t, **kw), "gpspm")


def roundtrip(c: Client, offset: int) -> None:
    shared_roundtrip(c, offset, 300_000)


def test_several_clients_at_once(target: Target) -> None:
    clients = [connect(target) for _ in range(3)]
    try:
        blobs = [os.urandom(1 << 20) for _ in clients]
        for i, (c, blob) in enumerate(zip(clients, blobs, strict=True)):
            c.pwrite(memoryview(blob), i << 22)
        for c in clients:
            c.flush()
        for i, blob in enumerate(blobs):  # each client reads what another wrote
            buf = bytearray(len(blob))
            clients[(i + 1) % 3].pread(memoryview(buf), i << 22)
            assert buf == blob
    finally:
        for c in clients:
            c.close()
    target.wait_log("client 3 disconnected")


def test_connections_opened_from_several_threads_at_once(target: Target) -> None:
    """Four threads connect and disconnect at once, as a client's pool opens channels: each
    finds its own completion channel's descriptor (librdmacm opening a device context, with
    a descriptor of the same kind, in another thread made that fail once in a while)."""
    import threading

    failures: list[str] = []

    def cycle() -> None:
        for _ in range(8):
            try:
                verbs(target).close()
            except TransportError as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=cycle) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures
    report("RDMA connect/disconnect from 4 threads at once, 32 connections: each found its "
           "completion channel's descriptor")


@pytest.mark.parametrize("junk", [b"GARBAGE-HELLO-" * 3, b"PMBK\x07\x00\x01\x00" + bytes(8), b""])
def test_bad_hello_is_rejected_with_a_reason(target: Target, junk: bytes) -> None:
    good = connect(target)
    etype, data = raw_connect(target.port, junk)
    assert etype == rdma.ce.RDMA_CM_EVENT_REJECTED
    reason = Reject.decode(data).reason
    assert "bad HELLO" in reason
    target.wait_log("refusing a client")
    roundtrip(good, 0)  # the target kept serving the client it had
    good.close()
    with connect(target) as again:
        roundtrip(again, 1 << 20)


def test_malformed_commit_disconnects_only_that_peer(target: Target) -> None:
    good = connect(target)
    bad = verbs(target)
    try:
        assert bad.ep is not None and bad.buffers is not None
        junk = b"PMBK\x01\x00\x04\x00" + b"\xff" * 40  # a COMMIT whose ranges are garbage
        bad.buffers.view[:len(junk)] = junk
        bad.ep.post(1, rdma.e.IBV_WR_SEND, bad.buffers.addr, len(junk), bad.buffers.lkey)
        target.wait_log("disconnecting it")
        with pytest.raises(TransportError):  # its connection is gone: a clear error, no hang
            bad.commit([(0, 4096)])
    finally:
        bad.close()
    roundtrip(good, 0)
    good.close()


def test_one_sided_write_past_the_region_fails_remotely(target: Target) -> None:
    """The MR bounds the export: a forged address gets a remote access error."""
    good = connect(target)
    bad = verbs(target, timeout=20)
    before = bytearray(4096)
    good.pread(memoryview(before), SIZE - 4096 - 4096)
    try:
        assert bad.ep is not None and bad.buffers is not None
        bad.buffers.view[:4096] = b"\xee" * 4096
        end = bad.info.remote_addr + bad.info.export_size
        bad.ep.post(9, rdma.e.IBV_WR_RDMA_WRITE, bad.buffers.addr, 4096, bad.buffers.lkey,
                    end - 2048, bad.info.rkey)
        wcs = bad.ep.wait(time.monotonic() + 30)
        assert wcs[0].status == rdma.e.IBV_WC_REM_ACCESS_ERR
    finally:
        bad.close()
    after = bytearray(4096)
    good.pread(memoryview(after), SIZE - 4096 - 4096)
    assert after == before
    roundtrip(good, 0)
    good.close()


CLIENT_SCRIPT = """
import sys, time
from pmemblk.auth import load_secret
from pmemblk.transport.verbs import VerbsTransport
t = VerbsTransport(sys.argv[1], int(sys.argv[2]), secret=load_secret(sys.argv[3]))
print("connected", flush=True)
time.sleep(600)
"""


def test_killed_client_is_noticed(target: Target) -> None:
    proc = subprocess.Popen([PY, "-c", CLIENT_SCRIPT, ADDR, str(target.port), str(target.secret)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        target.wait_log("client 1 connected")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        target.wait_log("client 1 disconnected")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    with connect(target) as c:
        roundtrip(c, 0)


def test_client_of_a_killed_target_gets_an_error_not_a_hang(target: Target) -> None:
    c = connect(target, timeout=10)
    roundtrip(c, 0)
    target.kill()
    started = time.monotonic()
    with pytest.raises((ConnectionLost, TransportError, RemoteError)):
        c.pread(memoryview(bytearray(4096)), 0)
    report(f"client of a killed target: error after {time.monotonic() - started:.1f}s, no hang")
    c.close()


def test_readonly_client_cannot_write(target: Target) -> None:
    c = Client(verbs(target, readonly=True), "gpspm", readonly=True)
    with c, pytest.raises(Exception, match="read-only"):
        c.pwrite(memoryview(b"x"), 0)


def test_target_memory_is_flat_over_200_rdma_connections(target: Target) -> None:
    assert target.proc is not None
    pid = target.proc.pid

    def cycle(i: int) -> None:
        with connect(target) as c:
            data = i.to_bytes(4, "little") * 1024
            c.pwrite(memoryview(data), (i % 64) * 4096, fua=True)
            buf = bytearray(4096)
            c.pread(memoryview(buf), (i % 64) * 4096)
            assert buf == data

    for i in range(20):
        cycle(i)
    target.wait_log("client 20 disconnected")
    before = rss_kib(pid)
    for i in range(200):
        cycle(i)
    target.wait_log("client 220 disconnected")
    after = rss_kib(pid)
    report(f"verbs target RSS over 200 RDMA connect/write/read/disconnect cycles: {before} KiB "
           f"-> {after} KiB ({after - before:+d} KiB)")
    assert after - before < 2048, f"RSS grew by {after - before} KiB: a leak per connection"


def test_one_writer_unless_shared(shm_region: Path, workdir: Path) -> None:
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    t = vm_target(str(shm_region), 7190, workdir).start()
    try:
        with connect(t) as first:
            with pytest.raises(RemoteError, match="open read-write"):
                connect(t)
            reader = Client(verbs(t, readonly=True), readonly=True)
            with reader:
                buf = bytearray(16)
                reader.pread(memoryview(buf), 0)
            roundtrip(first, 0)
        t.wait_log("client 1 disconnected")
        with connect(t) as second:  # the writer's slot is free again
            roundtrip(second, 4096)
    finally:
        t.stop()


def test_a_failed_persist_fails_the_flush_over_rdma_and_a_later_flush_retries(
        shm_region: Path, workdir: Path) -> None:
    """Fault injection on the verbs COMMIT path (the host suite covers TCP)."""
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    data_size = SIZE - 4096
    t = vm_target(str(shm_region), 7790, workdir, "--testing-fail-persist",
                  f"errno=ENOSPC,times=1,range=0:{data_size}").start()
    try:
        with connect(t) as c:
            c.pwrite(memoryview(os.urandom(65536)), 0)
            with pytest.raises(RemoteError, match="No space left") as exc:
                c.flush()
            assert exc.value.errno == errno.EIO
            c.flush()  # the ranges were kept: persisted now
        assert t.log().count("injected ENOSPC") == 1
        report("verbs COMMIT with an injected ENOSPC: FLUSH failed with EIO, the next one "
               "persisted the kept ranges")
    finally:
        t.stop()


SILENT_PEER = """
import sys
from pmemblk import protocol
from tests.vm.harness import raw_connect
raw_connect(int(sys.argv[1]), protocol.Hello().encode(), silent_for=30)
"""


def test_connections_in_their_handshake_are_capped_over_rdma(shm_region: Path,
                                                             workdir: Path) -> None:
    pmemblk("create", str(shm_region), "--size", str(SIZE))
    t = vm_target(str(shm_region), 7791, workdir, "--max-handshakes", "1",
                  "--handshake-timeout", "6").start()
    # A peer that sends HELLO and then nothing holds the one place for 6 s: a client that
    # comes meanwhile is refused with EBUSY, and admitted once the silent one is dropped.
    silent = subprocess.Popen([PY, "-c", SILENT_PEER, str(t.port)], cwd=ROOT)
    try:
        # Only then connect: a client in its own handshake when the silent peer arrives would
        # take the place first (the peer, refused, leaves; seen under load).
        t.wait_log("CM event ESTABLISHED")
        deadline = time.monotonic() + 30
        refused: RemoteError | None = None
        while time.monotonic() < deadline and refused is None:
            try:
                verbs(t).close()
            except RemoteError as exc:
                refused = exc
        assert refused is not None and refused.errno == errno.EBUSY, t.log()
        assert "already in their handshake" in str(refused)
        silent.wait(timeout=60)
        t.wait_log("did not complete the handshake")
        with connect(t) as c:
            roundtrip(c, 0)
    finally:
        if silent.poll() is None:
            silent.kill()
            silent.wait()
        t.stop()
