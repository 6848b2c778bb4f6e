"""Hostile input on the TCP wire: each bad peer is logged and dropped; the others are served."""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from pmemblk import protocol as p
from pmemblk.auth import ClientHandshake
from pmemblk.client import Client
from pmemblk.errors import RemoteError
from pmemblk.transport.stream import StreamTransport

from ..conftest import roundtrip
from ..procs import Target

V = p.PROTOCOL_VERSION

HELLO = p.Hello().encode()


def raw(target: Target) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(target.listen[len("unix:"):])
    return s


def handshake(s: socket.socket, readonly: bool = False) -> p.Welcome:
    """HELLO, CHALLENGE, AUTH, WELCOME by hand (a target without a secret)."""
    hs = ClientHandshake("test", None, readonly)
    s.sendall(hs.hello.encode())
    challenge = p.Challenge.decode(s.recv(p.CHALLENGE.size, socket.MSG_WAITALL))
    s.sendall(hs.answer(challenge).encode())
    return hs.check(p.Welcome.decode(s.recv(p.WELCOME.size, socket.MSG_WAITALL)))


def welcomed(target: Target) -> socket.socket:
    s = raw(target)
    handshake(s)
    return s


def closed_by_peer(s: socket.socket) -> bool:
    """True once the target has closed the connection (reads EOF, possibly after replies)."""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def io(kind: int, offset: int, length: int, reserved: int = 0) -> bytes:
    return p.IO.pack(p.MAGIC, V, kind, 1, offset, length, reserved)


EXPORT = (64 << 20) - 4096
CASES = {
    "bad magic": (True, b"XXXX" + HELLO[4:], "bad magic"),
    "bad version": (True, HELLO[:4] + struct.pack("<H", 9) + HELLO[6:], "protocol version 9"),
    "not HELLO first": (True, io(p.MSG_READ, 0, 10), "expected HELLO first"),
    "not AUTH after HELLO": (True, HELLO + io(p.MSG_WRITE, 0, 10), "expected AUTH first"),
    "bad AUTH": (True, HELLO + p.AUTH.pack(p.MAGIC, V, p.MSG_AUTH, 0, 1, bytes(32), bytes(32)),
                 "bad AUTH"),
    "truncated then gone": (True, HELLO[:11], "middle of a frame"),
    "read past the end": (False, io(p.MSG_READ, EXPORT - 10, 11), "past the end"),
    "write past the end": (False, io(p.MSG_WRITE, EXPORT, 1) + b"x", "past the end"),
    "length past the sane maximum": (False, io(p.MSG_READ, 0, p.MAX_IO + 1), "out of range"),
    "zero-length read": (False, io(p.MSG_READ, 0, 0), "out of range"),
    "reserved bits": (False, io(p.MSG_ZERO, 0, 10, reserved=1), "reserved"),
    "COMMIT past the end": (False, p.COMMIT.pack(p.MAGIC, V, p.MSG_COMMIT, 1, 0, 5)
                            + p.RANGE.pack(EXPORT, 1), "past the end"),
    "COMMIT with 60000 ranges": (False, p.COMMIT.pack(p.MAGIC, V, p.MSG_COMMIT, 60000, 0, 5),
                                 "range count"),
    "HELLO twice": (False, HELLO, "HELLO after the handshake"),
    "AUTH twice": (False, p.Auth(bytes(32)).encode(), "AUTH after the handshake"),
    "unknown type": (False, p.PREAMBLE.pack(p.MAGIC, V, 77) + bytes(24), "unexpected message"),
    "reply-type frame": (False, p.CommitReply(1, 0).encode(), "unexpected message"),
    "truncated mid-write": (False, io(p.MSG_WRITE, 0, 1 << 20) + b"x" * 1000,
                            "middle of a frame"),
    "CAS on an unaligned word": (False, io(p.MSG_CAS, 4, 16) + bytes(16), "aligned 8-byte"),
    "CAS past the end": (False, io(p.MSG_CAS, EXPORT - 4, 16) + bytes(16), "aligned 8-byte"),
    "CAS of the wrong size": (False, io(p.MSG_CAS, 0, 8) + bytes(8), "aligned 8-byte"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_peer_is_dropped_and_others_served(target: Target, name: str) -> None:
    before_handshake, payload, reason = CASES[name]
    good = Client(StreamTransport(target.listen), "gpspm")
    try:
        roundtrip(good, 0)
        bad = raw(target) if before_handshake else welcomed(target)
        bad.sendall(payload)
        if "middle of a frame" in reason:
            bad.shutdown(socket.SHUT_WR)  # vanish mid-frame
        assert closed_by_peer(bad), f"the target kept a peer that sent {name}"
        bad.close()
        target.wait_log(reason)
        roundtrip(good, 1 << 20)  # the client it already had
        with Client(StreamTransport(target.listen)) as fresh:  # and a new one
            roundtrip(fresh, 2 << 20)
    finally:
        good.close()


def test_silent_peer_hits_the_handshake_deadline(target: Target) -> None:
    silent = raw(target)
    assert closed_by_peer(silent)
    target.wait_log("did not complete the handshake within 1s")
    with Client(StreamTransport(target.listen), "gpspm") as c:
        roundtrip(c, 0)


def test_garbage_flood_then_good_clients(target: Target) -> None:
    for _ in range(50):
        s = raw(target)
        s.sendall(os.urandom(4096))
        assert closed_by_peer(s)
        s.close()
    with Client(StreamTransport(target.listen), "gpspm") as c:
        roundtrip(c, 0)


def test_too_many_clients_get_a_reason(region: str, tmp_path: Path) -> None:
    t = Target(region, f"unix:{tmp_path / 'one.sock'}", tmp_path, "--max-clients", "1",
               transport="tcp").start()
    try:
        with Client(StreamTransport(t.listen), "gpspm") as first:
            with pytest.raises(RemoteError, match="already serves 1 clients"):
                StreamTransport(t.listen)
            roundtrip(first, 0)
        with Client(StreamTransport(t.listen), "gpspm") as again:  # the slot was freed
            roundtrip(again, 0)
    finally:
        t.stop()


def test_one_writer_unless_shared(region: str, tmp_path: Path) -> None:
    t = Target(region, f"unix:{tmp_path / 'single.sock'}", tmp_path, transport="tcp").start()
    try:
        with Client(StreamTransport(t.listen)) as first:
            with pytest.raises(RemoteError, match="open read-write") as exc:
                StreamTransport(t.listen)
            assert "--shared" in str(exc.value)
            with Client(StreamTransport(t.listen, readonly=True), readonly=True) as reader:
                buf = bytearray(10)
                reader.pread(memoryview(buf), 0)
            # The target, not only the client, holds a read-only client to its mode.
            s = raw(t)
            assert handshake(s, readonly=True).readonly
            s.sendall(p.IORequest(p.MSG_WRITE, 7, 0, 4).encode() + b"evil")
            reply = p.Reply.decode(s.recv(p.REPLY.size, socket.MSG_WAITALL))
            assert (reply.tag, reply.status) == (7, errno.EPERM)
            s.close()
            check = bytearray(4)  # read before anything else writes there
            first.pread(memoryview(check), 0)
            assert check != b"evil"
            roundtrip(first, 0)
        t.wait_log("client 1 (unix socket) disconnected")
        with Client(StreamTransport(t.listen)) as second:  # the writer's slot is free again
            roundtrip(second, 4096)
    finally:
        t.stop()
