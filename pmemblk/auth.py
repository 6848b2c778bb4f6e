"""Authentication: a shared secret, proven by HMAC-SHA256 challenge-response in both directions.

The handshake (every transport)::

    client → HELLO      read-only flag, client nonce (16 random bytes)
    target → CHALLENGE  method (none | hmac-sha256), target nonce (32 random bytes)
    client → AUTH       mac = HMAC(secret, "pmemblk-v2 client" | HELLO | CHALLENGE)
    target → WELCOME    region, rkey, ..., proof = HMAC(secret, "pmemblk-v2 target" | HELLO |
                        CHALLENGE | AUTH | WELCOME with the proof zeroed)   — or REJECT

Both nonces are fresh, so a recorded AUTH is useless against another CHALLENGE and a recorded
WELCOME is useless against another HELLO. The MACs cover the messages as encoded, so the
read-only flag cannot be changed in flight. The secret never crosses the wire. What this does
and does not protect against is in docs/security.md.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import stat

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
)

MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
_CLIENT_LABEL = b"pmemblk-v2 client\0"
_TARGET_LABEL = b"pmemblk-v2 target\0"


def load_secret(path: str) -> bytes:
    """The shared secret in ``path``: its bytes without trailing whitespace.

    Refused when the file is missing, too short, too long, or readable by anyone but its owner
    (like ssh does with private keys).
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"secret file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"secret file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"secret file {path} is accessible by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):o}): run chmod 600 {path}")
        raw = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    secret = raw.rstrip()
    if len(raw) > MAX_SECRET_BYTES:
        raise ConfigError(f"secret file {path} is longer than {MAX_SECRET_BYTES} bytes")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"secret file {path} holds {len(secret)} bytes; a secret needs at least "
            f"{MIN_SECRET_BYTES}. Make one with: pmemblk secret {path}")
    return secret


def create_secret(path: str) -> None:
    """Write a new random secret (32 bytes, as 64 hex digits) to ``path``, mode 0600."""
    files.create_exclusive(path, os.urandom(32).hex().encode() + b"\n", 0o600, "secret")


def client_mac(secret: bytes, hello: Hello, challenge: Challenge) -> bytes:
    msg = _CLIENT_LABEL + hello.encode() + challenge.encode()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def target_proof(secret: bytes, hello: Hello, challenge: Challenge, auth: Auth,
                 welcome: Welcome) -> bytes:
    msg = _TARGET_LABEL + hello.encode() + challenge.encode() + auth.encode() + welcome.unproven()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def new_client_id() -> bytes:
    """A fresh client identity: every channel of one client carries it in its HELLO."""
    return os.urandom(CLIENT_ID_SIZE)


def new_challenge(secret: bytes | None) -> Challenge:
    return Challenge(AUTH_HMAC_SHA256 if secret is not None else AUTH_NONE,
                     os.urandom(TARGET_NONCE_SIZE))


def verify_auth(secret: bytes | None, hello: Hello, challenge: Challenge, auth: Auth) -> bool:
    if secret is None:
        return True
    return hmac.compare_digest(auth.mac, client_mac(secret, hello, challenge))


class ClientHandshake:
    """The client's side of the handshake, shared by every transport."""

    def __init__(self, peer: str, secret: bytes | None, readonly: bool,
                 client_id: bytes | None = None) -> None:
        self.peer = peer
        self.secret = secret
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
            self.auth = Auth(bytes(MAC_SIZE))
        else:
            if self.secret is None:
                raise ConfigError(
                    f"target {self.peer} requires authentication: give the client the "
                    "target's secret (plugin key secret-file=PATH)")
            self.auth = Auth(client_mac(self.secret, self.hello, challenge))
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
