"""What the target is asked to serve, and who it has admitted: ``ServeConfig`` (``pmemblk
serve``'s options, parsed), the handshake so far (``Greeting``), an admitted client's
``Session`` (all its channels, as ``status --target`` shows it) and one channel's
``Admission``. The decisions that make them are ``target.Export``'s; the servers of each
transport carry them."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .address import Address
from .auth import Identity
from .protocol import Auth, Challenge, Hello


@dataclass(frozen=True)
class ServeConfig:
    path: str
    listen: Address  # a Unix socket only for the tcp (stream) transport
    transports: tuple[str, ...] = ("verbs",)
    readonly: bool = False
    max_clients: int = 64
    #: Connections (channels) one client may have open at once: a plugin instance opens one
    #: per nbdkit worker thread and NBD connection.
    max_channels: int = 64
    #: Connections that may be in their handshake (not yet authenticated) at once.
    max_handshakes: int = 64
    #: Admitted stream (TCP, unix:) connections at once, over every client: each is served by
    #: a thread of its own, and a tasks limit (TasksMax=, pids.max) must not be reached.
    max_threads: int = 512
    #: TCP: probe a silent client after this many seconds; one that does not answer three
    #: probes (KEEPALIVE_PROBES) a third of this apart is dropped.
    keepalive: float = 15.0
    pid_file: str | None = None
    handshake_timeout: float = 10.0
    #: The operator asserts that incoming writes reach the persistence domain (docs/persistence.md).
    apm_durable: bool = False
    #: TESTING ONLY: keep a durable image for power-cut emulation (pmemblk.powercut).
    durable_image: str | None = None
    #: Allow several read-write clients at once (they must coordinate their writes).
    shared: bool = False
    #: The shared secret clients must prove they hold (None: no authentication).
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    #: The clients file (--clients): an identity per client, re-read by ``Export.reload``.
    clients_file: str | None = None
    #: Serve a non-loopback address without authentication anyway.
    insecure_no_auth: bool = False
    #: TESTING ONLY: fault injection (pmemblk.faults).
    fail_persist: str | None = None
    lose_reply: str | None = None
    #: A Unix socket answering ``pmemblk status --target`` (pmemblk.control).
    control: str | None = None
    #: TLS on the stream transport (pmemblk.tls): off, on or require; the certificates
    #: folder; whether clients must present a certificate the folder's CA signed.
    tls: str = "off"
    tls_certificates: str | None = None
    tls_verify_peer: bool = False


@dataclass(frozen=True)
class Greeting:
    """A valid HELLO and the CHALLENGE sent back: the handshake so far."""

    hello: Hello
    challenge: Challenge


#: What is counted per session and in the export's totals.
SESSION_COUNTS = ("reads", "read_bytes", "writes", "write_bytes", "zeros", "zero_bytes",
                  "commits", "commit_bytes", "commit_errors")


@dataclass
class Session:
    """An admitted client, with all its channels (the connections whose HELLO carries its
    client id), as ``pmemblk status --target`` shows it. Over verbs the data moves without the
    target, so only its COMMITs are counted."""

    number: int
    transport: str
    peer: str
    client_id: bytes
    #: The identity it proved ("" for a target with one --secret-file, or none).
    identity: str = ""
    since: float = dataclasses.field(default_factory=time.time)
    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(SESSION_COUNTS, 0))
    #: Its connections open now, and how many of them are read-write.
    channels: int = 0
    writers: int = 0
    #: The atomic-blocks lanes it writes through: (first, count, grant), or None.
    lanes: tuple[int, int, int] | None = None

    @property
    def readonly(self) -> bool:
        return not self.writers

    def count(self, op: str, nbytes: int) -> None:
        self.counts[f"{op}s"] += 1
        self.counts[f"{op}_bytes"] += nbytes


@dataclass(frozen=True)
class Admission:
    """An authenticated client, admitted; it counts until ``client_left``."""

    greeting: Greeting
    auth: Auth
    identity: Identity
    writer: bool
    readonly: bool
    session: Session
