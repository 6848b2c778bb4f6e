"""The target: owns a region and serves it through one or more transports.

``Export`` is the core every transport shares: the region and its state, the handshake decision
(HELLO → WELCOME or REJECT), COMMIT handling (persist ranges → status) and, for stream
transports, the data operations. Transport servers (``transport/verbs_server.py``,
``transport/stream_server.py``) only move messages; they run on one ``Reactor`` (one thread, one
``select``), so a slow or hostile peer never blocks the others (docs/design.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from dataclasses import dataclass
from typing import Protocol

from . import durability, layout
from .errors import ConfigError, PmemblkError, PmemError
from .pmem import PmemRegion
from .powercut import DurableImage
from .protocol import (
    FLUSH_APM,
    FLUSH_GPSPM,
    MAX_MESSAGE_SIZE,
    REGION_IS_PMEM,
    REGION_READONLY,
    Commit,
    CommitReply,
    Hello,
    Reject,
    Welcome,
)
from .reactor import Reactor

log = logging.getLogger(__name__)

#: COMMIT messages one client may have outstanding.
COMMIT_DEPTH = 8
TRANSPORTS = ("verbs", "tcp")


@dataclass(frozen=True)
class ServeConfig:
    path: str
    listen: str  # HOST:PORT, or unix:PATH for the tcp (stream) transport
    transports: tuple[str, ...] = ("verbs",)
    readonly: bool = False
    max_clients: int = 64
    pid_file: str | None = None
    handshake_timeout: float = 10.0
    #: The operator asserts that incoming writes reach the persistence domain (docs/persistence.md).
    apm_durable: bool = False
    #: TESTING ONLY: keep a durable image for power-cut emulation (pmemblk.powercut).
    durable_image: str | None = None
    #: Allow several read-write clients at once (they must coordinate their writes).
    shared: bool = False


@dataclass(frozen=True)
class Admission:
    """The answer to a HELLO, and whether the client was admitted as a writer."""

    answer: Welcome | Reject
    writer: bool = False
    readonly: bool = True


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{value!r}: expected HOST:PORT, e.g. 192.0.2.1:7000")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{value!r}: port {port_s!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{value!r}: port {port} is outside 1..65535")
    return host, port


def parse_transports(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [n for n in names if n not in TRANSPORTS]
    if bad or not names:
        raise ConfigError(f"--transport {value!r}: use verbs, tcp, or verbs,tcp")
    return names


class Server(Protocol):
    """A transport's listening side, driven by the target's reactor."""

    def start(self, export: Export) -> None:
        """Listen; addresses were validated when the server was made."""

    def close(self) -> None:
        """Disconnect every client and stop listening; safe twice."""


class Export:
    """The region being served and the decisions every transport shares."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.readonly = config.readonly
        region = PmemRegion.open(config.path)
        try:
            try:
                self.header = layout.read_header(region)
            except PmemblkError as exc:
                raise PmemblkError(
                    f"{config.path} holds no valid pmemblk region: {exc}. Create one with: "
                    f"pmemblk create {config.path} --size SIZE (this erases what it holds)"
                ) from None
        except BaseException:
            region.close()
            raise
        self.region = region
        self.size = self.header.data_size
        self.clients = 0
        self.writers = 0
        self._closed = False
        self.image: DurableImage | None = None
        if config.durable_image:
            self.image = DurableImage(config.durable_image, region)
        self.guarantees = durability.guarantees(region.is_pmem, region.persist_method,
                                                config.apm_durable)
        self.durable_methods = durability.durable_mask(self.guarantees)
        for g in self.guarantees:
            log.info("flush %s", g.describe())
        log.info("%s", durability.native_flush_support())
        state = layout.read_state(region)
        if not state.clean:
            log.warning(
                "%s was not shut down cleanly (the target crashed or was killed): data the "
                "clients flushed is intact; writes they never flushed may be lost", config.path)
        if not self.readonly:
            layout.write_state(region, layout.State(clean=False,
                                                    times_served=state.times_served + 1))

    @property
    def data_addr(self) -> int:
        return self.region.addr + self.header.data_offset

    # -- handshake -------------------------------------------------------------------------

    def answer_hello(self, raw: bytes, rkey: int = 0, remote_addr: int = 0) -> Admission:
        """Decide on a client's HELLO. An admitted client counts until ``client_left``.

        Access modes: any number of read-only clients; one read-write client at a time unless
        the export is ``--shared`` (then the clients must coordinate, e.g. a cluster
        filesystem).
        """
        try:
            hello = Hello.decode(raw)
        except PmemblkError as exc:
            return Admission(Reject(errno.EPROTO, f"bad HELLO: {exc}"))
        if self.clients >= self.config.max_clients:
            return Admission(Reject(errno.EBUSY,
                                    f"the target already serves {self.config.max_clients} "
                                    "clients"))
        readonly = hello.readonly or self.readonly
        if not readonly and self.writers and not self.config.shared:
            return Admission(Reject(
                errno.EBUSY, "another client has this export open read-write: connect "
                "read-only, or serve with --shared if the clients coordinate their writes"))
        self.clients += 1
        self.writers += not readonly
        flags = (REGION_IS_PMEM if self.region.is_pmem else 0) | (
            REGION_READONLY if readonly else 0)
        return Admission(Welcome(
            export_size=self.size, block_size=self.header.block_size, region_flags=flags,
            flush_methods=FLUSH_APM | FLUSH_GPSPM, rkey=rkey, remote_addr=remote_addr,
            region_uuid=self.header.uuid, max_message_size=MAX_MESSAGE_SIZE,
            commit_depth=COMMIT_DEPTH, durable_methods=self.durable_methods,
        ), writer=not readonly, readonly=readonly)

    def client_left(self, writer: bool) -> None:
        self.clients = max(0, self.clients - 1)
        self.writers = max(0, self.writers - writer)

    # -- persistence -----------------------------------------------------------------------

    def commit(self, commit: Commit) -> CommitReply:
        """Persist the ranges of a (validated) COMMIT; the reply carries 0 or an errno."""
        status = 0
        if not self.readonly:  # a read-only export has nothing to persist
            try:
                for off, length in commit.ranges:
                    self.region.persist(self.header.data_offset + off, length)
            except PmemError as exc:
                log.error("persisting for a COMMIT failed: %s", exc)
                status = errno.EIO
        return CommitReply(commit.request_id, status)

    # -- data (stream transports; RDMA moves data without the target's CPU) -----------------

    def read(self, offset: int, length: int) -> memoryview:
        return self.region.view(self.header.data_offset + offset, length)

    def write(self, offset: int, data: memoryview) -> None:
        self.region.view(self.header.data_offset + offset, len(data))[:] = data

    def zero(self, offset: int, length: int) -> None:
        view = self.region.view(self.header.data_offset + offset, length)
        step = 1 << 20
        zeros = bytes(min(step, length))
        for pos in range(0, length, step):
            n = min(step, length - pos)
            view[pos:pos + n] = zeros[:n]

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Persist the whole data area, mark the region clean, unmap. Safe twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.readonly:
                self.region.persist(self.header.data_offset, self.size)
                state = layout.read_state(self.region)
                layout.write_state(self.region, layout.State(True, state.times_served))
                log.info("persisted %d bytes and marked %s clean", self.size, self.region.path)
        finally:
            if self.image is not None:
                self.image.close()
            self.region.close()


class Target:
    """Runs an Export's servers until SIGTERM/SIGINT, then shuts down cleanly."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.reactor = Reactor()
        self.export: Export | None = None
        self.servers: list[Server] = []

    def _make_servers(self) -> None:
        for name in self.config.transports:
            if name == "verbs":
                from .transport.verbs_server import VerbsServer

                self.servers.append(VerbsServer(self.reactor, self.config.listen))
            else:
                from .transport.stream_server import StreamServer

                self.servers.append(StreamServer(self.reactor, self.config.listen,
                                                 self.config.handshake_timeout))

    def run(self) -> None:
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, lambda signum, frame: self.reactor.stop())
        try:
            self._make_servers()  # validates addresses before the region is touched
            self.export = Export(self.config)
            for server in self.servers:
                server.start(self.export)
            if self.config.pid_file:
                with open(self.config.pid_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
            self.reactor.run()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            self.shutdown()

    def shutdown(self) -> None:
        for server in self.servers:
            server.close()
        if self.export is not None:
            self.export.close()
        self.reactor.close()
        if self.config.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(self.config.pid_file)


def serve(config: ServeConfig) -> None:
    Target(config).run()
