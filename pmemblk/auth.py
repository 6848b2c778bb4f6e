"""Authentication: a secret per identity, proven by HMAC-SHA256 challenge-response both ways.

A target knows its clients either by one shared secret (``--secret-file``: one anonymous
identity, named "") or by a clients file (``--clients``: one line per identity, ``NAME MODE
SECRET_FILE``, MODE ``rw`` or ``ro``). The handshake (every transport)::

    client → HELLO      read-only flag, client nonce (16 random bytes)
    target → CHALLENGE  method (none | hmac-sha256), target nonce (32 random bytes)
    client → AUTH       identity name, mac = HMAC(secret, "pmemblk-v2 client" | HELLO |
                        CHALLENGE | AUTH with the mac zeroed)
    target → WELCOME    region, rkey, ..., proof = HMAC(secret, "pmemblk-v2 target" | HELLO |
                        CHALLENGE | AUTH | WELCOME with the proof zeroed)   — or REJECT

Both nonces are fresh, so a recorded AUTH is useless against another CHALLENGE and a recorded
WELCOME is useless against another HELLO. The MACs cover the messages as encoded, so the
read-only flag and the identity's name cannot be changed in flight. An unknown name is
checked against a random secret, so it is refused exactly as a wrong secret is (no oracle).
The secret never crosses the wire. What this does and does not protect against is in
docs/security.md.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import os
import stat
from dataclasses import dataclass

from . import files
from .errors import ConfigError, RemoteError
from .protocol import (
    AUTH_HMAC_SHA256,
    AUTH_NONE,
    CLIENT_ID_SIZE,
    CLIENT_NONCE_SIZE,
    MAC_SIZE,
    TARGET_NONCE_SIZE,
    Auth,
    Challenge,
    Hello,
    Welcome,
    check_identity,
)

MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
_CLIENT_LABEL = b"pmemblk-v2 client\0"
_TARGET_LABEL = b"pmemblk-v2 target\0"


#: Largest clients file (--clients): a line is short, and a file is read whole.
MAX_CLIENTS_FILE = 1 << 20


def read_private(path: str, what: str, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of ``path``, a regular file only its owner can access
    (like ssh's private keys; a FIFO is refused without waiting for a writer)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{what} {path} is accessible by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):o}): run chmod 600 {path}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def load_secret(path: str) -> bytes:
    """The shared secret in ``path``: its bytes without trailing whitespace.

    Refused when the file is missing, too short, too long, or readable by anyone but its owner
    (like ssh does with private keys).
    """
    raw = read_private(path, "secret file", MAX_SECRET_BYTES)
    secret = raw.rstrip()
    if len(raw) > MAX_SECRET_BYTES:
        raise ConfigError(f"secret file {path} is longer than {MAX_SECRET_BYTES} bytes")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"secret file {path} holds {len(secret)} bytes; a secret needs at least "
            f"{MIN_SECRET_BYTES}. Make one with: pmemblk secret {path}")
    return secret


@dataclass(frozen=True)
class Identity:
    """Who a client is: its name ("" for the one of a --secret-file), whether it may only read,
    and the secret it proves it holds."""

    name: str
    readonly: bool
    secret: bytes = dataclasses.field(repr=False)

    @property
    def mode(self) -> str:
        return "ro" if self.readonly else "rw"


#: The identities a target admits, by name (None: it does not authenticate).
Identities = dict[str, Identity]


def anonymous(secret: bytes) -> Identities:
    """The one identity of a target serving with ``--secret-file``: any mode the client asks."""
    return {"": Identity("", False, secret)}


def load_clients(path: str) -> Identities:
    """The identities of a clients file: ``NAME MODE SECRET_FILE`` a line (``#`` comments,
    blank lines). A relative SECRET_FILE is relative to the clients file's directory. Refused
    as a whole, with one line naming the line, if anything in it is wrong."""
    raw = read_private(path, "clients file", MAX_CLIENTS_FILE)
    if len(raw) > MAX_CLIENTS_FILE:
        raise ConfigError(f"clients file {path} is longer than {MAX_CLIENTS_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"clients file {path} is not UTF-8 text") from None
    base = os.path.dirname(os.path.abspath(path))
    identities: Identities = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"clients file {path} line {number}"
        if len(fields) != 3:
            raise ConfigError(f"{where}: expected NAME MODE SECRET_FILE, got {len(fields)} "
                              "fields")
        name, mode, secret_file = fields
        try:
            if not name:
                raise ConfigError("empty")
            check_identity(name)
            if mode not in ("rw", "ro"):
                raise ConfigError(f"mode {mode!r} is not rw or ro")
            if name in identities:
                raise ConfigError(f"identity {name} is named twice")
            secret = load_secret(os.path.join(base, secret_file))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        identities[name] = Identity(name, mode == "ro", secret)
    if not identities:
        raise ConfigError(f"clients file {path} names no identity: add a line NAME rw|ro "
                          "SECRET_FILE")
    return identities


def create_secret(path: str) -> None:
    """Write a new random secret (32 bytes, as 64 hex digits) to ``path``, mode 0600."""
    files.create_exclusive(path, os.urandom(32).hex().encode() + b"\n", 0o600, "secret")


def client_mac(secret: bytes, hello: Hello, challenge: Challenge, identity: str = "") -> bytes:
    msg = (_CLIENT_LABEL + hello.encode() + challenge.encode()
           + Auth(bytes(MAC_SIZE), identity).encode())
    return hmac.new(secret, msg, hashlib.sha256).digest()


def target_proof(secret: bytes, hello: Hello, challenge: Challenge, auth: Auth,
                 welcome: Welcome) -> bytes:
    msg = _TARGET_LABEL + hello.encode() + challenge.encode() + auth.encode() + welcome.unproven()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def new_client_id() -> bytes:
    """A fresh client identity: every channel of one client carries it in its HELLO."""
    return os.urandom(CLIENT_ID_SIZE)


def new_challenge(identities: Identities | None) -> Challenge:
    return Challenge(AUTH_HMAC_SHA256 if identities is not None else AUTH_NONE,
                     os.urandom(TARGET_NONCE_SIZE))


#: Checked against when a client names an identity the target does not know: the same work
#: as for a known one, and a refusal that looks the same.
_NOBODY = os.urandom(32)


def verify_auth(identities: Identities | None, hello: Hello, challenge: Challenge,
                auth: Auth) -> tuple[Identity | None, str]:
    """The identity ``auth`` proves, or None and why not (for the target's log only: the peer
    is told the same for every failure)."""
    if identities is None:
        return Identity(auth.identity, False, b""), ""
    identity = identities.get(auth.identity)
    expected = client_mac(identity.secret if identity else _NOBODY, hello, challenge,
                          auth.identity)
    if not hmac.compare_digest(auth.mac, expected) or identity is None:
        if identity is None:
            return None, f"unknown identity {auth.identity!r}"
        return None, f"wrong secret for identity {auth.identity!r}"
    return identity, ""


class ClientHandshake:
    """The client's side of the handshake, shared by every transport."""

    def __init__(self, peer: str, secret: bytes | None, readonly: bool,
                 client_id: bytes | None = None, identity: str = "") -> None:
        self.peer = peer
        self.secret = secret
        self.identity = identity
        # Without an id of its own (one channel alone) a random one: a client of its own.
        self.hello = Hello(readonly=readonly, nonce=os.urandom(CLIENT_NONCE_SIZE),
                           client_id=client_id or new_client_id())
        self.challenge: Challenge | None = None
        self.auth: Auth | None = None

    def answer(self, challenge: Challenge) -> Auth:
        """The AUTH for the target's CHALLENGE; refuses a target that cannot prove itself."""
        self.challenge = challenge
        if challenge.method == AUTH_NONE:
            if self.secret is not None:
                raise RemoteError(
                    f"target {self.peer} does not authenticate (it was started without "
                    "--secret-file), but this client has a secret: refusing to trust it. "
                    "Serve with --secret-file, or drop secret-file= here", errno.EACCES)
            self.auth = Auth(bytes(MAC_SIZE), self.identity)
        else:
            if self.secret is None:
                raise ConfigError(
                    f"target {self.peer} requires authentication: give the client the "
                    "target's secret (plugin key secret-file=PATH)")
            self.auth = Auth(client_mac(self.secret, self.hello, challenge, self.identity),
                             self.identity)
        return self.auth

    def check(self, welcome: Welcome) -> Welcome:
        """Verify the target's proof in its WELCOME."""
        assert self.challenge is not None and self.auth is not None
        if self.secret is not None:
            expected = target_proof(self.secret, self.hello, self.challenge, self.auth, welcome)
            if not hmac.compare_digest(welcome.proof, expected):
                raise RemoteError(
                    f"target {self.peer} failed to prove it holds the secret: it is not the "
                    "target you configured (or its secret differs)", errno.EACCES)
        return welcome
