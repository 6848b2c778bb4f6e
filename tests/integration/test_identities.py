"""Per-client identities (serve --clients) and reload: real target, real sockets (TCP transport).

The RDMA side of revocation (the rkey dies with the MR) is tests/vm/test_security.py.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import protocol as p
from pmemblk.auth import ClientHandshake, create_secret, load_clients, load_secret
from pmemblk.client import Client
from pmemblk.control import ask_metrics, ask_status
from pmemblk.errors import ConfigError, PmemblkError, RemoteError
from pmemblk.transport.stream import StreamTransport

from ..conftest import roundtrip
from ..procs import PLUGIN, Target, pmemblk, wait_until
from .conftest import needs_nbdkit


class Site:
    """A clients file and one secret per name, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "clients"

    def secret(self, name: str, fresh: bool = False) -> Path:
        path = self.folder / f"{name}.secret"
        if fresh:
            path.unlink(missing_ok=True)
        if not path.exists():
            create_secret(str(path))
        return path

    def write(self, text: str) -> None:
        tmp = self.folder / "clients.new"
        tmp.write_text(text)
        tmp.chmod(0o600)
        tmp.replace(self.path)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path)
    for name in ("alice", "bob", "carol", "dave"):
        s.secret(name)
    s.write("# name mode secret\nalice rw alice.secret\nbob ro bob.secret  # reads only\n"
            "dave rw dave.secret\n")
    return s


@pytest.fixture
def served(region: str, tmp_path: Path, site: Site) -> Iterator[Target]:
    t = Target(region, f"unix:{tmp_path / 'id.sock'}", tmp_path, "--clients", str(site.path),
               "--shared", "--control", str(tmp_path / "control.sock"),
               transport="tcp").start()
    yield t
    t.stop()


def control(t: Target) -> str:
    return str(t.log_path.parent / "control.sock")


def as_(t: Target, site: Site, name: str, readonly: bool = False,
        secret: Path | None = None) -> StreamTransport:
    return StreamTransport(t.listen, readonly=readonly, identity=name,
                           secret=load_secret(str(secret or site.secret(name))))


def test_identities_get_the_modes_their_lines_give(served: Target, site: Site) -> None:
    with Client(as_(served, site, "alice")) as alice:
        roundtrip(alice, 0)
        with pytest.raises(RemoteError, match="identity bob may only read") as exc:
            as_(served, site, "bob")
        assert exc.value.errno == errno.EACCES
        with Client(as_(served, site, "bob", readonly=True), readonly=True) as bob:
            buf = bytearray(4096)
            bob.pread(memoryview(buf), 0)
            st = ask_status(control(served))
            by_identity = {c["identity"]: c["mode"] for c in st["clients"]}
            assert by_identity == {"alice": "read-write", "bob": "read-only"}
            assert st["identities"] == {"alice": "rw", "bob": "ro", "dave": "rw"}
            shown = pmemblk("status", "--target", control(served)).stdout
            assert "(alice): read-write" in shown and "(bob): read-only" in shown, shown
            metrics = ask_metrics(control(served)).decode()
            assert 'identity="alice"' in metrics and 'identity="bob"' in metrics
    # Without a name (the --secret-file way), alice's secret does not let anyone in.
    with pytest.raises(RemoteError, match="authentication failed"):
        StreamTransport(served.listen, secret=load_secret(str(site.secret("alice"))))


def test_an_ro_identity_cannot_write_on_a_read_only_admission(served: Target,
                                                             site: Site) -> None:
    t = as_(served, site, "bob", readonly=True)
    try:
        assert t.info.region_flags & p.REGION_READONLY
        with pytest.raises(RemoteError):  # the target refuses it: not the client's check
            t.write(memoryview(b"x" * 4096), 0)
    finally:
        t.close()


def _refusal(t: Target, name: str, secret: bytes) -> bytes:
    """The bytes the target answers an AUTH with, from its CHALLENGE on (the REJECT)."""
    hs = ClientHandshake("test", secret, readonly=False, identity=name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(t.listen[len("unix:"):])
        s.sendall(hs.hello.encode())
        challenge = p.Challenge.decode(s.recv(p.CHALLENGE.size, socket.MSG_WAITALL))
        s.sendall(hs.answer(challenge).encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_unknown_name_and_wrong_secret_look_the_same_on_the_wire(served: Target,
                                                                 site: Site) -> None:
    wrong = os.urandom(32).hex().encode()
    unknown = _refusal(served, "mallory", wrong)
    bad_secret = _refusal(served, "alice", wrong)
    assert unknown == bad_secret  # byte for byte: no oracle for the names
    assert p.Reject.decode(unknown).errno == errno.EACCES
    # ... and the operator is told which it was.
    served.wait_log("unknown identity 'mallory'")
    served.wait_log("wrong secret for identity 'alice'")


def _dead(t: StreamTransport) -> bool:
    try:
        roundtrip(Client(t), 1 << 20, 4096)
    except PmemblkError:
        return True
    return False


def test_reload_adds_removes_narrows_and_rekeys(served: Target, site: Site) -> None:
    alice = as_(served, site, "alice")
    bob = as_(served, site, "bob", readonly=True)
    dave = as_(served, site, "dave")
    with pytest.raises(RemoteError, match="authentication failed"):
        as_(served, site, "carol")
    old_dave = site.secret("dave")
    kept = site.folder / "dave.old"
    kept.write_bytes(old_dave.read_bytes())
    kept.chmod(0o600)
    site.secret("dave", fresh=True)  # a new key for dave
    site.write("bob rw bob.secret\ncarol ro carol.secret\ndave ro dave.secret\n")
    # alice removed, bob widened, carol added, dave narrowed and re-keyed: SIGHUP
    assert served.proc is not None
    os.kill(served.proc.pid, signal.SIGHUP)
    served.wait_log("reloaded")
    wait_until(lambda: _dead(alice), "alice's connection to be dropped", 30)
    wait_until(lambda: _dead(dave), "dave's read-write connection to be dropped", 30)
    assert served.proc.poll() is None  # SIGHUP no longer stops the target
    served.wait_log("identity 'alice' was removed")
    served.wait_log("identity 'dave' is now read-only")
    buf = bytearray(4096)
    Client(bob, readonly=True).pread(memoryview(buf), 0)  # bob's read-only connection stays
    bob.close()
    with pytest.raises(RemoteError, match="authentication failed"):
        as_(served, site, "alice")
    with pytest.raises(RemoteError, match="authentication failed"):  # dave's old key
        as_(served, site, "dave", readonly=True, secret=kept)
    as_(served, site, "dave", readonly=True).close()  # dave's new key
    with pytest.raises(RemoteError, match="may only read"):
        as_(served, site, "dave")
    as_(served, site, "carol", readonly=True).close()
    with Client(as_(served, site, "bob")) as widened:
        roundtrip(widened, 0)
    alice.close()
    dave.close()


def test_a_rekey_keeps_live_connections(served: Target, site: Site) -> None:
    alice = as_(served, site, "alice")
    try:
        site.secret("alice", fresh=True)
        site.write("alice rw alice.secret\n")
        out = pmemblk("reload", "--target", control(served))
        assert "1 changed" in out.stdout
        roundtrip(Client(alice), 0, 4096)  # its live connection stays
        as_(served, site, "alice").close()  # the new key admits
    finally:
        alice.close()


@pytest.mark.parametrize(("text", "line"), [
    ("alice rw alice.secret\nbob rx bob.secret\n", "line 2: mode 'rx' is not rw or ro"),
    ("alice rw alice.secret\n\n# c\nbob ro\n", "line 4: expected NAME MODE SECRET_FILE"),
    ("alice rw alice.secret\nalice ro bob.secret\n", "line 2: identity alice is named twice"),
    ("al ice rw alice.secret\n", "line 1: expected NAME MODE SECRET_FILE"),
    ("al/ice rw alice.secret\n", "line 1: identity 'al/ice' is not a valid name"),
    ("alice rw missing.secret\n", "line 1: secret file"),
    ("# nobody\n", "names no identity"),
])
def test_a_malformed_file_is_refused_whole_and_the_old_one_stays(
        served: Target, site: Site, text: str, line: str) -> None:
    site.write(text)
    out = pmemblk("reload", "--target", control(served), check=False)
    assert out.returncode == 1
    assert line in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    with Client(as_(served, site, "alice")) as alice:  # the identities in force stay
        roundtrip(alice, 0, 4096)
    with pytest.raises(RemoteError, match="may only read"):
        as_(served, site, "bob")


def test_the_clients_file_and_its_secrets_are_checked_like_a_secret_file(site: Site) -> None:
    assert sorted(load_clients(str(site.path))) == ["alice", "bob", "dave"]
    site.path.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        load_clients(str(site.path))
    site.path.chmod(0o600)
    site.secret("bob").chmod(0o640)
    with pytest.raises(ConfigError, match=r"line 3: secret file .*accessible by group"):
        load_clients(str(site.path))
    fifo = site.folder / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_clients(str(fifo))  # at once: no wait for a writer


def test_serve_refuses_a_bad_clients_file_and_clients_with_secret_file(
        region: str, tmp_path: Path, site: Site) -> None:
    site.write("alice rw alice.secret\nbob maybe bob.secret\n")
    out = pmemblk("serve", region, "--listen", f"unix:{tmp_path / 'x.sock'}", "--transport",
                  "tcp", "--clients", str(site.path), check=False)
    assert out.returncode == 1 and "line 2: mode 'maybe'" in out.stderr
    out = pmemblk("serve", region, "--listen", f"unix:{tmp_path / 'x.sock'}", "--transport",
                  "tcp", "--clients", str(site.path), "--secret-file",
                  str(site.secret("alice")), check=False)
    assert out.returncode == 1 and "give one" in out.stderr


def test_reload_without_a_clients_file_says_so(target: Target, tmp_path: Path) -> None:
    assert target.proc is not None
    os.kill(target.proc.pid, signal.SIGHUP)
    target.wait_log("no clients file to reload")
    assert target.proc.poll() is None


@needs_nbdkit
def test_the_plugin_connects_as_client_name(served: Target, site: Site) -> None:
    keys = [f"target={served.listen}", "client=alice", f"secret-file={site.secret('alice')}"]
    ok = subprocess.run(["nbdkit", "-U", "-", "python", PLUGIN, *keys, "--run",
                         'nbdinfo "$uri"'], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    no_secret = subprocess.run(["nbdkit", "-U", "-", "python", PLUGIN,
                                f"target={served.listen}", "client=alice", "--run",
                                'nbdinfo "$uri"'], capture_output=True, text=True, timeout=120)
    assert no_secret.returncode != 0 and "client=alice needs secret-file=" in no_secret.stderr
    assert "Traceback" not in no_secret.stderr


def test_the_mac_binds_the_identity_name(served: Target, site: Site) -> None:
    """Two names on one secret file (one rw, one ro): a name changed in flight is refused."""
    site.write("viewer ro shared.secret\neditor rw shared.secret\n")
    site.secret("shared")
    pmemblk("reload", "--target", control(served))
    secret = load_secret(str(site.secret("shared")))
    hs = ClientHandshake("test", secret, readonly=False, identity="viewer")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(served.listen[len("unix:"):])
        s.sendall(hs.hello.encode())
        challenge = p.Challenge.decode(s.recv(p.CHALLENGE.size, socket.MSG_WAITALL))
        forged = p.Auth(hs.answer(challenge).mac, "editor")  # viewer's MAC, editor's name
        s.sendall(forged.encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    reject = p.Reject.decode(out)
    assert reject.errno == errno.EACCES and "authentication failed" in reject.reason
    as_(served, site, "editor", secret=site.secret("shared")).close()  # the honest way works


def test_a_client_id_is_not_joined_across_identities(served: Target, site: Site) -> None:
    client_id = os.urandom(16)
    alice = StreamTransport(served.listen, identity="alice", client_id=client_id,
                            secret=load_secret(str(site.secret("alice"))))
    try:
        with pytest.raises(RemoteError, match="belongs to another identity"):
            StreamTransport(served.listen, identity="dave", client_id=client_id,
                            secret=load_secret(str(site.secret("dave"))))
        StreamTransport(served.listen, identity="alice", client_id=client_id,
                        secret=load_secret(str(site.secret("alice")))).close()
    finally:
        alice.close()
