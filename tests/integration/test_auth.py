"""Authentication over the stream transport: real target, real sockets, hostile handshakes."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import protocol as p
from pmemblk.auth import ClientHandshake, create_secret, load_secret
from pmemblk.client import Client
from pmemblk.errors import ConfigError, RemoteError
from pmemblk.transport.stream import StreamTransport

from ..conftest import roundtrip
from ..procs import PLUGIN, Target, region_info
from .conftest import SIZE, needs_nbdkit


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    create_secret(str(path))
    return path


@pytest.fixture
def authed(region: str, tmp_path: Path, secret: Path) -> Iterator[Target]:
    t = Target(region, f"unix:{tmp_path / 'auth.sock'}", tmp_path, transport="tcp",
               secret=secret).start()
    yield t
    t.stop()


def sock(target: Target) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(target.listen[len("unix:"):])
    return s


def until_eof(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_right_secret_is_admitted_wrong_or_missing_refused(authed: Target, secret: Path,
                                                         tmp_path: Path) -> None:
    with Client(StreamTransport(authed.listen, secret=load_secret(str(secret)))) as good:
        roundtrip(good, 0)
    other = tmp_path / "other-secret"
    create_secret(str(other))
    with pytest.raises(RemoteError, match="authentication failed") as exc:
        StreamTransport(authed.listen, secret=load_secret(str(other)))
    assert exc.value.errno == errno.EACCES
    with pytest.raises(ConfigError, match=r"requires authentication.*secret-file="):
        StreamTransport(authed.listen)
    authed.wait_log("authentication failed")


def test_a_client_with_a_secret_refuses_a_target_without_one(target: Target) -> None:
    with pytest.raises(RemoteError, match="does not authenticate"):
        StreamTransport(target.listen, secret=b"k" * 32)


def test_nothing_about_the_region_is_sent_before_authentication(authed: Target,
                                                                region: str) -> None:
    info = region_info(region)
    export = int(info["data_size"])  # type: ignore[call-overload]
    secrets = [uuid.UUID(str(info["uuid"])).bytes, str(info["uuid"]).encode(),
               export.to_bytes(8, "little")]
    s = sock(authed)
    s.sendall(p.Hello().encode())
    challenge = s.recv(p.CHALLENGE.size, socket.MSG_WAITALL)
    assert p.Challenge.decode(challenge).method == p.AUTH_HMAC_SHA256
    s.sendall(p.Auth(os.urandom(32)).encode())  # a guess
    rest = until_eof(s)
    s.close()
    reject = p.Reject.decode(rest)
    assert reject.errno == errno.EACCES and "authentication failed" in reject.reason
    transcript = challenge + rest
    assert len(transcript) == p.CHALLENGE.size + p.REJECT.size + len(reject.reason.encode())
    for needle in secrets:
        assert needle not in transcript


def test_a_recorded_auth_cannot_be_replayed(authed: Target, secret: Path) -> None:
    hs = ClientHandshake("test", load_secret(str(secret)), readonly=False)
    s = sock(authed)
    s.sendall(hs.hello.encode())
    first = p.Challenge.decode(s.recv(p.CHALLENGE.size, socket.MSG_WAITALL))
    recorded = hs.answer(first).encode()
    s.sendall(recorded)
    hs.check(p.Welcome.decode(s.recv(p.WELCOME.size, socket.MSG_WAITALL)))
    s.close()
    # An eavesdropper replays the same HELLO and AUTH on a new connection.
    s = sock(authed)
    s.sendall(hs.hello.encode())
    second = p.Challenge.decode(s.recv(p.CHALLENGE.size, socket.MSG_WAITALL))
    assert second.nonce != first.nonce
    s.sendall(recorded)
    assert p.Reject.decode(until_eof(s)).errno == errno.EACCES
    s.close()


def test_the_mac_binds_the_read_only_flag(authed: Target, secret: Path) -> None:
    hs = ClientHandshake("test", load_secret(str(secret)), readonly=True)
    s = sock(authed)
    s.sendall(p.Hello(readonly=False, nonce=hs.hello.nonce).encode())  # flag changed in flight
    challenge = p.Challenge.decode(s.recv(p.CHALLENGE.size, socket.MSG_WAITALL))
    s.sendall(hs.answer(challenge).encode())
    assert p.Reject.decode(until_eof(s)).errno == errno.EACCES
    s.close()


def test_a_fake_target_cannot_prove_it_holds_the_secret(tmp_path: Path, secret: Path) -> None:
    """A target that accepts any AUTH (it does not know the secret) is caught by the client."""
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def fake() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(p.HELLO.size, socket.MSG_WAITALL)
            conn.sendall(p.Challenge(p.AUTH_HMAC_SHA256, os.urandom(32)).encode())
            conn.recv(p.AUTH.size, socket.MSG_WAITALL)
            conn.sendall(p.Welcome(SIZE - 4096, 4096, 0, p.FLUSH_GPSPM, 0, 0, uuid.uuid4(),
                                   4096, 8, p.FLUSH_GPSPM, 0, proof=os.urandom(32)).encode())
            conn.recv(1)

    thread = threading.Thread(target=fake)
    thread.start()
    try:
        with pytest.raises(RemoteError, match="failed to prove it holds the secret"):
            StreamTransport(f"unix:{path}", secret=load_secret(str(secret)))
    finally:
        thread.join(timeout=30)
        listener.close()


@needs_nbdkit
def test_the_plugin_authenticates_with_secret_file(authed: Target) -> None:
    ok = subprocess.run(["nbdkit", "-U", "-", "python", PLUGIN, *authed.keys,
                         "--run", 'nbdinfo "$uri"'], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "pmemblk region" in ok.stdout
    missing = subprocess.run(["nbdkit", "-U", "-", "python", PLUGIN, f"target={authed.listen}",
                              "--run", 'nbdinfo "$uri"'], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode != 0
    assert "requires authentication" in missing.stderr
    assert "Traceback" not in missing.stderr
