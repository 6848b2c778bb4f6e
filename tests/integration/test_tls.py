"""TLS on the TCP transport: modes against each other, certificates, and what an eavesdropper
sees (a recording proxy between the plugin's client and the target)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import ssl
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk.client import Client
from pmemblk.errors import ConfigError, ConnectionLost, RemoteError, TransportError
from pmemblk.plugin_instance import PluginConfig, auto_choice
from pmemblk.tls import make_certificates

from ..procs import PY, Nbdkit, Target, pmemblk, run
from .conftest import needs_nbdkit, plugin_client, read
from .test_hostile import free_loopback_port


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server certificate for 127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("tls") / "certs"
    make_certificates(str(folder), server=["127.0.0.1"])
    make_certificates(str(folder), client="alice")
    return folder


def ca_only(certs: Path, where: Path) -> Path:
    """A client's folder: the CA certificate alone (no client certificate)."""
    where.mkdir(mode=0o700)
    (where / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
    return where


def tls_target(region: str, tmp_path: Path, mode: str, certs: Path | None,
               *extra: str) -> Target:
    port = free_loopback_port()
    args = ["--tls", mode, *(["--tls-certificates", str(certs)] if certs else []), *extra]
    return Target(region, f"127.0.0.1:{port}", tmp_path, "--handshake-timeout", "1", *args,
                  transport="tcp").start()


def tls_client(target: Target | str, mode: str, folder: Path | None) -> Client:
    keys = [f"tls={mode}", *([f"tls-certificates={folder}"] if folder else [])]
    if isinstance(target, str):
        cfg = PluginConfig()
        for key, value in (("target", target), ("transport", "tcp"), ("flush", "gpspm"),
                           ("reconnect-timeout", "0"), ("timeout", "10"),
                           *(k.split("=", 1) for k in keys)):
            cfg.set(key, value)
        cfg.complete()
        from pmemblk.plugin_instance import connect

        return connect(cfg, readonly=False)
    return plugin_client(target, "gpspm", 0, 10, *keys)


def roundtrip(c: Client, data: bytes, offset: int = 8192) -> None:
    c.pwrite(memoryview(data), offset)
    c.flush()
    assert read(c, offset, len(data)) == data


# -- modes -----------------------------------------------------------------------------------

def test_require_serves_tls_and_refuses_plaintext_with_the_reason(region: str, tmp_path: Path,
                                                                   certs: Path) -> None:
    t = tls_target(region, tmp_path, "require", certs)
    with contextlib.closing(tls_client(t, "require", certs)) as c:
        roundtrip(c, os.urandom(12288))
    with pytest.raises(RemoteError, match=r"requires TLS \(it serves with --tls require\)"):
        plugin_client(t, "gpspm", 0, 10)
    assert "connected from 127.0.0.1" in t.log() and ", TLS, session" in t.log()
    assert "requires TLS" in t.log()


def test_on_serves_both(region: str, tmp_path: Path, certs: Path) -> None:
    t = tls_target(region, tmp_path, "on", certs)
    data = os.urandom(8192)
    with contextlib.closing(tls_client(t, "require", certs)) as c:
        roundtrip(c, data)
        assert c.transport.tls
    with contextlib.closing(plugin_client(t, "gpspm", 0, 10)) as c:
        assert read(c, 8192, len(data)) == data
        assert not c.transport.tls
    assert t.log().count(", TLS, session") == 1


def test_off_target_a_tls_client_is_refused_or_falls_back(region: str, tmp_path: Path,
                                                          certs: Path) -> None:
    t = tls_target(region, tmp_path, "off", None)
    with pytest.raises(TransportError, match="answered in plaintext, not TLS: it serves with "
                                             "--tls off"):
        tls_client(t, "require", certs)
    assert "does not use TLS" in t.log()
    # tls=on: TLS where the target offers it, plaintext otherwise (nbdkit's meaning).
    with contextlib.closing(tls_client(t, "on", certs)) as c:
        roundtrip(c, os.urandom(4096))
        assert not c.transport.tls


def test_client_tls_on_uses_tls_when_offered(region: str, tmp_path: Path,
                                             certs: Path) -> None:
    t = tls_target(region, tmp_path, "require", certs)
    with contextlib.closing(tls_client(t, "on", certs)) as c:
        roundtrip(c, os.urandom(4096))
        assert c.transport.tls


def test_verify_peer_needs_a_client_certificate(region: str, tmp_path: Path,
                                                certs: Path) -> None:
    t = tls_target(region, tmp_path, "require", certs, "--tls-verify-peer")
    with contextlib.closing(tls_client(t, "require", certs)) as c:  # presents alice's
        roundtrip(c, os.urandom(4096))
    # TLS 1.3: the client's handshake ends before the target checks the (absent) certificate;
    # the target's alert then ends the connection at the first read (the alert itself can be
    # lost when the target's close crosses the client's HELLO: the connection ends all the same).
    with pytest.raises(ConnectionLost) as lost:
        tls_client(t, "require", ca_only(certs, tmp_path / "ca-only"))
    assert "certificate required: the target verifies peers" in str(lost.value) or \
        "EOF occurred" in str(lost.value) or "reset" in str(lost.value), lost.value
    t.wait_log("failed the TLS handshake")


# -- certificates ------------------------------------------------------------------------------

def test_wrong_ca_and_expired_certificates_are_refused(region: str, tmp_path: Path,
                                                       certs: Path) -> None:
    t = tls_target(region, tmp_path, "require", certs)
    other = tmp_path / "other"
    make_certificates(str(other), server=["127.0.0.1"])
    with pytest.raises(RemoteError, match="not the target you configured: its TLS "
                                          "certificate verify failed"):
        tls_client(t, "require", other)
    t.stop()
    expired = tmp_path / "expired"
    make_certificates(str(expired), server=["127.0.0.1"], days=1,
                      not_before=datetime.datetime.now(datetime.UTC)
                      - datetime.timedelta(days=10))
    t2 = tls_target(region, tmp_path, "require", expired)
    with pytest.raises(RemoteError, match="certificate has expired"):
        tls_client(t2, "require", expired)
    # A certificate for another name.
    t2.stop()
    named = tmp_path / "named"
    make_certificates(str(named), server=["db.example"])
    t3 = tls_target(region, tmp_path, "require", named)
    with pytest.raises(RemoteError, match="IP address mismatch"):
        tls_client(t3, "require", named)


def test_tls_certificates_command(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    out = pmemblk("tls-certificates", str(folder), "--server", "192.0.2.1").stdout
    assert "ca-cert.pem" in out and "server-key.pem" in out
    ca = (folder / "ca-cert.pem").read_bytes()
    pmemblk("tls-certificates", str(folder), "--client", "alice")
    assert (folder / "ca-cert.pem").read_bytes() == ca  # the CA is made once, then reused
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    key = (folder / "server-key.pem").read_bytes()
    again = pmemblk("tls-certificates", str(folder), "--server", "x", check=False)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already exists: not overwriting" in again.stderr
    assert (folder / "server-key.pem").read_bytes() == key


def refused_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """``pmemblk serve ARGS``, expected to refuse at once: one that serves instead is stopped
    (subprocess.run kills it at the timeout) and fails the test instead of hanging it."""
    return run(PY, "-m", "pmemblk", "serve", *args, timeout=30, check=False)


def test_bad_certificate_folder_is_one_line(region: str, tmp_path: Path, certs: Path) -> None:
    port = free_loopback_port()
    for args, expect in (
            (["--tls", "require"], "--tls require needs --tls-certificates DIR"),
            (["--tls", "require", "--tls-certificates", str(tmp_path / "none")],
             "not a directory"),
            (["--tls", "maybe"], "use off, on or require"),
            (["--tls-certificates", str(certs)], "need --tls on or require"),
            (["--tls", "require", "--tls-certificates", str(certs), "--transport", "verbs"],
             "RDMA moves data one-sided")):
        transport = [] if "--transport" in args else ["--transport", "tcp"]
        res = refused_serve(region, "--listen", f"127.0.0.1:{port}", *transport, *args)
        assert res.returncode == 1, res.stderr
        assert res.stderr.count("\n") == 1 and expect in res.stderr, res.stderr
    loose = tmp_path / "loose"
    make_certificates(str(loose), server=["127.0.0.1"])
    (loose / "server-key.pem").chmod(0o644)
    res = refused_serve(region, "--listen", f"127.0.0.1:{port}", "--transport", "tcp",
                        "--tls", "on", "--tls-certificates", str(loose))
    assert res.returncode == 1 and "server-key.pem is accessible by group or others" in \
        res.stderr and res.stderr.count("\n") == 1


def test_plugin_keys_are_checked(tmp_path: Path) -> None:
    def complete(*keys: str) -> None:
        cfg = PluginConfig()
        for k in ("target=192.0.2.1:7000", *keys):
            cfg.set(*k.split("=", 1))
        cfg.complete()

    with pytest.raises(ConfigError, match="tls='yes': use off, on or require"):
        complete("tls=yes")
    with pytest.raises(ConfigError, match="needs tls=on or tls=require"):
        complete(f"tls-certificates={tmp_path}")
    with pytest.raises(ConfigError, match="not a directory"):
        complete("tls=require", f"tls-certificates={tmp_path / 'none'}")
    with pytest.raises(ConfigError, match=r"ca-cert\.pem: No such file"):
        complete("tls=require", f"tls-certificates={tmp_path}")
    with pytest.raises(ConfigError, match="tls=require cannot use transport=verbs"):
        complete("tls=require", "transport=verbs")


# -- hostile peers ------------------------------------------------------------------------------

def test_a_stalled_tls_handshake_is_dropped_at_the_handshake_deadline(
        region: str, tmp_path: Path, certs: Path) -> None:
    t = tls_target(region, tmp_path, "require", certs)
    port = t.port
    # A ClientHello's first bytes, and then nothing: the target's TLS waits for more.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01")
        assert s.recv(100) == b""  # closed by the target (the deadline is 1 s), not a hang
    t.wait_log("did not complete the handshake within 1s")
    with contextlib.closing(tls_client(t, "require", certs)) as c:  # and it still serves
        roundtrip(c, os.urandom(4096))


def test_garbage_after_the_tls_byte_is_dropped(region: str, tmp_path: Path,
                                               certs: Path) -> None:
    t = tls_target(region, tmp_path, "on", certs)
    with socket.create_connection(("127.0.0.1", t.port), timeout=30) as s:
        s.sendall(b"\x16" + os.urandom(300))
        with contextlib.suppress(ConnectionResetError):
            while s.recv(4096):
                pass
    t.wait_log("failed the TLS handshake")


def test_a_tls_byte_then_a_reset_is_dropped(region: str, tmp_path: Path, certs: Path) -> None:
    # The ClientHello's first byte, then a reset (SO_LINGER 0) before the target looked:
    # wrapping the socket then fails ("closed before TLS handshake with data in recv buffer"),
    # which killed the target's reactor before it was caught.
    t = tls_target(region, tmp_path, "on", certs)
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", t.port), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"\x16")
        s.close()
    with contextlib.closing(tls_client(t, "require", certs)) as c:  # and it still serves
        roundtrip(c, os.urandom(4096))
    assert t.proc is not None and t.proc.poll() is None


def test_tls_below_1_3_is_refused(region: str, tmp_path: Path, certs: Path) -> None:
    t = tls_target(region, tmp_path, "require", certs)
    ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", t.port), timeout=30) as raw, \
            pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|protocol version"):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    t.wait_log("failed the TLS handshake")


def test_auto_never_picks_rdma_for_tls_require() -> None:
    cfg = PluginConfig()
    cfg.set("target", "192.0.2.1:7000")
    cfg.set("tls", "require")
    kind, why = auto_choice(cfg)
    assert kind == "tcp" and "RDMA traffic cannot be encrypted" in why


# -- what an eavesdropper sees --------------------------------------------------------------------

class RecordingProxy:
    """A TCP proxy on loopback between one client and the target, keeping every byte that
    passes in either direction."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def _run(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self.socks += [down, up]
            for a, b in ((down, up), (up, down)):
                th = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                th.start()
                self.threads.append(th)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()
        for th in self.threads:
            th.join(30)


@contextlib.contextmanager
def proxy(port: int) -> Iterator[RecordingProxy]:
    p = RecordingProxy(port)
    try:
        yield p
    finally:
        p.close()


def pieces_seen(data: bytes, seen: bytes, size: int = 16) -> int:
    """How many of ``data``'s ``size``-byte pieces appear in ``seen``."""
    return sum(data[i:i + size] in seen for i in range(0, len(data), size))


@pytest.mark.parametrize("mode", ["require", "off"])
def test_an_eavesdropper_sees_none_of_the_data_with_tls_and_all_without(
        region: str, tmp_path: Path, certs: Path, mode: str) -> None:
    t = tls_target(region, tmp_path, "on", certs)
    data = os.urandom(192 << 10)  # a multi-frame write: chunk=64K below
    with proxy(t.port) as p:
        c = tls_client(f"127.0.0.1:{p.port}", mode, certs if mode != "off" else None)
        with contextlib.closing(c):
            c.pwrite(memoryview(data), 65536)
            c.flush()
            back = read(c, 65536, len(data))
        seen = bytes(p.seen)
    assert back == data
    pieces = len(data) // 16
    found = pieces_seen(data, seen)
    if mode == "off":
        assert found == pieces  # the write, and the read back: all of it, in the clear
    else:
        assert found == 0, f"{found} of {pieces} 16-byte pieces of the data crossed in the clear"
        assert len(seen) > 2 * len(data)  # it did cross (encrypted), both ways


# -- through nbdkit ----------------------------------------------------------------------------

@needs_nbdkit
def test_nbdkit_plugin_over_tls(region: str, tmp_path: Path, certs: Path) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    t = tls_target(region, tmp_path, "require", certs)
    server = Nbdkit(tmp_path, *t.keys, "transport=tcp", "tls=require",
                    f"tls-certificates={certs}").start()
    try:
        h = nbd.NBD()
        h.connect_uri(server.uri)
        data = os.urandom(65536)
        h.pwrite(data, 4096)
        h.flush()
        assert h.pread(65536, 4096) == data
        h.shutdown()
    finally:
        server.stop()
    assert ", TLS, session" in t.log()


@needs_nbdkit
def test_attach_over_tls(region: str, tmp_path: Path, certs: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    nbd = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    monkeypatch.setenv("PMEMBLK_RUN_DIR", str(tmp_path / "run"))
    t = tls_target(region, tmp_path, "require", certs)
    refused = pmemblk("attach", t.listen, "--no-device", "--name", "plain", check=False)
    assert refused.returncode == 1 and "requires TLS" in refused.stderr, refused.stderr
    uri = pmemblk("attach", t.listen, "--no-device", "--name", "t0", "--transport", "tcp",
                  "--tls", "require", "--tls-certificates", str(certs)).stdout.strip()
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"tls!" * 1024, 0)
        h.flush()
        assert h.pread(4096, 0) == b"tls!" * 1024
        assert json.loads(pmemblk("status", "t0", "--json").stdout)["tls"] is True
        h.shutdown()
    finally:
        pmemblk("detach", "t0")
    assert ", TLS, session" in t.log()
