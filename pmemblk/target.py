"""The export: a region and the decisions every transport's server shares.

``Export`` is the core every transport shares: the region and its state, the handshake decisions
(HELLO → CHALLENGE, AUTH → WELCOME or REJECT; docs/security.md), COMMIT handling (persist
ranges → status) and, for stream transports, the data operations. Transport servers
(``servers/verbs.py``, ``servers/stream.py``) only move messages; they run on
one ``Reactor`` (one thread, one ``select``), so a slow or hostile peer never blocks the
others (docs/design.md). Running it as a service (servers, signals, pid file, systemd) is
``pmemblk.service``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from . import __version__, atomicblocks, auth, durability, layout, stats
from .errors import ConfigError, LayoutError, PmemblkError, PmemError
from .faults import LostReply, PersistFault
from .lock import RegionLock
from .pmem import PmemRegion, check_backed, is_devdax
from .powercut import DurableImage, FlushTracer
from .protocol import (
    COMMIT_DEPTH,
    MAX_MESSAGE_SIZE,
    REGION_ATOMIC_BLOCKS,
    REGION_ATOMIC_WRITE,
    REGION_IS_PMEM,
    REGION_READONLY,
    REGION_SHARED,
    Auth,
    Commit,
    CommitReply,
    Hello,
    Reject,
    Welcome,
)
from .session import SESSION_COUNTS, Admission, Greeting, ServeConfig, Session

log = logging.getLogger(__name__)



def initial_identities(config: ServeConfig) -> auth.Identities | None:
    """Who may connect at start: the clients file's identities, or the one of a --secret-file,
    or anyone (None)."""
    if config.clients_file is not None:
        if config.secret is not None:
            raise ConfigError("--clients and --secret-file: give one (a clients file names "
                              "a secret file per identity)")
        return auth.load_clients(config.clients_file)
    return auth.anonymous(config.secret) if config.secret is not None else None


class Export:
    """The region being served and the decisions every transport shares."""

    def __init__(self, config: ServeConfig) -> None:
        """Lock and map the region and read its header; nothing in it changes until
        ``begin()``, so a target that fails to start leaves the region as it found it."""
        self.config = config
        self.readonly = config.readonly
        #: Who may connect, by name (None: anyone, without authentication). Replaced whole
        #: by ``reload``.
        self.identities = initial_identities(config)
        #: Each server's way to drop the connections ``revoked`` no longer allows.
        self._revokers: list[Callable[[], None]] = []
        self._stack = contextlib.ExitStack()
        with self._stack as stack:
            stack.enter_context(RegionLock(config.path, "serve it", shared=config.readonly))
            check_backed(config.path)
            region = stack.enter_context(PmemRegion.open(config.path))
            self.header = layout.read_header(region)
            #: The atomic-blocks geometry, or None (pmemblk.atomicblocks).
            self.atomic = layout.read_atomic_info(region, self.header)
            if (self.atomic is not None and config.shared and not config.readonly
                    and len(config.transports) > 1):
                raise ConfigError(
                    f"{config.path} has atomic blocks: its --shared writers update the block "
                    "map by compare-and-swap, and an RDMA one is not atomic with the target's "
                    "own over TCP: serve one --transport")
            self.lost_reply = LostReply.parse(config.lose_reply) if config.lose_reply else None
            if config.fail_persist:
                fault, data_range = PersistFault.parse(config.fail_persist)
                fault.bind(self.header.data_offset, data_range)
                region.persist_fault = fault.check
                log.warning("TESTING ONLY: persist fails as told: %s", config.fail_persist)
            try:
                self.loss_epoch = layout.read_loss_epoch(region)
            except LayoutError as exc:
                if not config.readonly:
                    raise LayoutError(f"{config.path}: {exc}") from None
                # No writer, so nothing to lose: its readers are told an epoch no writer had.
                log.warning("%s: %s (served read-only)", config.path, exc)
                self.loss_epoch = layout.LOSS_EPOCH_MAX
            self.durable: DurableImage | None = None
            if config.durable_image:
                self.durable = stack.enter_context(contextlib.closing(
                    DurableImage(config.durable_image, region)))
            self._stack = stack.pop_all()
        self.region = region
        self.size = self.header.data_size
        #: How many admitted clients (sessions) have a read-write channel.
        self.writers = 0
        #: Guards the admission counts, sessions and totals: stream channels are served by
        #: threads of their own (servers/stream.py), the rest by the reactor.
        self.lock = threading.Lock()
        #: Connections accepted and not yet admitted or gone, on every transport.
        self.handshakes = 0
        self.began = False
        self._closed = False
        self.guarantees = durability.guarantees(region.is_pmem, region.persist_method,
                                                config.apm_durable, memory=region.memory)
        self.durable_methods = durability.durable_mask(self.guarantees)
        #: What the RDMA listener's device and this region allow of the native verbs (set
        #: by the verbs server when it starts; offered to its connections only).
        self.native: durability.NativeOffer | None = None
        #: Tells clients that this is a new start of the target (Welcome.instance).
        self.instance = int.from_bytes(os.urandom(8), "little")
        self.sessions: dict[int, Session] = {}
        #: Atomic blocks: which writer holds each group of lanes, and the groups of writers
        #: that left while others still write (recovered once none does).
        self._lane_owner: dict[int, Session] = {}
        self._quarantined: set[int] = set()
        #: Why the last recovery of those groups failed (a corrupt flog), or None.
        self.recovery_error: str | None = None
        #: The last grant number given (u32, never 0). A client keeps its lanes while its
        #: connections bring the grant it has, so a number must be new across starts of the
        #: target too: counting from a random one, as ``instance`` is random.
        self._lane_grant = int.from_bytes(os.urandom(4), "little")
        self._cas_lock = threading.Lock()
        self._by_client_id: dict[bytes, Session] = {}
        self._session_numbers = 0
        #: Totals over every client since the target started (SESSION_COUNTS and the refusals).
        self.totals: dict[str, int] = dict.fromkeys(
            (*SESSION_COUNTS, "admitted", "refused"), 0)
        self.started = time.time()

    def begin(self) -> None:
        """Every listener is up: record that the region is served (not clean) from now on."""
        for g in self.guarantees:
            log.info("flush %s", g.describe())
        if self.native is not None:
            log.info("%s", self.native.describe())
        else:
            log.info("%s", durability.native_flush_support())
        if self.readonly:
            return
        region, path = self.region, self.config.path
        if self.atomic is not None:
            try:
                self._recover_lanes()
            except LayoutError as exc:
                raise LayoutError(
                    f"{path}: {exc}. Its writes cannot be made safe to continue; its data can "
                    "still be read: serve it --readonly to copy it out") from None
        try:
            opening = layout.open_for_serving(region)
        except LayoutError as exc:
            raise LayoutError(f"{path}: {exc}") from None
        # Only now is the region served: a target refused before this changes nothing of its
        # state (close() marks clean only what it began to serve).
        self.began = True
        self.loss_epoch = opening.loss_epoch
        if not opening.continuity:
            log.warning(
                "%s was not shut down cleanly and the machine has restarted since (a "
                "crash or power cut): data the clients flushed is intact; writes they never "
                "flushed may be lost (loss epoch now %d)", path, self.loss_epoch)
        elif not opening.previous.clean:
            log.warning(
                "%s was not shut down cleanly, but in this same boot (the target process "
                "was killed): every write it took is still in the region", path)

    @property
    def data_addr(self) -> int:
        return self.region.addr + self.header.data_offset

    # -- handshake -------------------------------------------------------------------------

    def start_handshake(self) -> Reject | None:
        """A new connection: counted until ``end_handshake``, or refused when too many
        unauthenticated ones are open (each holds a descriptor and memory)."""
        with self.lock:
            if self.handshakes >= self.config.max_handshakes:
                return Reject(errno.EBUSY, f"{self.handshakes} connections are already in "
                                           "their handshake: try again shortly")
            self.handshakes += 1
            return None

    def end_handshake(self) -> None:
        """A connection counted by ``start_handshake`` was admitted, refused or went away."""
        with self.lock:
            self.handshakes = max(0, self.handshakes - 1)

    def greet(self, raw: bytes) -> Greeting | Reject:
        """Answer a client's HELLO with a CHALLENGE. Nothing about the region is revealed."""
        try:
            hello = Hello.decode(raw)
        except PmemblkError as exc:
            return Reject(errno.EPROTO, f"bad HELLO: {exc}")
        return Greeting(hello, auth.new_challenge(self.identities))

    def admit(self, greeting: Greeting, raw_auth: bytes, transport: str = "tcp",
              peer: str = "") -> Admission | Reject:
        """Check a client's AUTH, then its access mode. An admitted client counts until
        ``client_left``.

        A client is every connection whose HELLO carries the same client id (a plugin
        instance's channels and NBD connections). Access modes: any number of read-only
        clients; one read-write client at a time unless the export is ``--shared`` (then the
        clients must coordinate, e.g. a cluster filesystem); the read-write client may open
        any number of read-write channels, up to ``max_channels``.
        """
        with self.lock:
            verdict = self._admit(greeting, raw_auth, transport, peer)
            self.totals["refused" if isinstance(verdict, Reject) else "admitted"] += 1
            return verdict

    def _admit(self, greeting: Greeting, raw_auth: bytes, transport: str,
               peer: str) -> Admission | Reject:
        try:
            proof = Auth.decode(raw_auth)
        except PmemblkError as exc:
            return Reject(errno.EPROTO, f"bad AUTH: {exc}")
        identity, why = auth.verify_auth(self.identities, greeting.hello, greeting.challenge,
                                         proof)
        if identity is None:
            # The operator is told which; the peer is told the same either way (no oracle).
            log.warning("authentication failed for %s (%s): %s", peer or transport,
                        transport, why)
            return Reject(errno.EACCES, "authentication failed: the client's identity or "
                                        "secret is not the target's (check client= and "
                                        "secret-file=)")
        if identity.readonly and not greeting.hello.readonly and not self.readonly:
            return Reject(errno.EACCES, f"identity {identity.name} may only read (its line in "
                                        "the clients file says ro): connect read-only")
        client_id = greeting.hello.client_id
        # All zeros: a client of its own (never joined to another connection's session).
        session = self._by_client_id.get(client_id) if any(client_id) else None
        if session is not None and session.identity != identity.name:
            return Reject(errno.EACCES, "this client id belongs to another identity's client")
        if session is None and self.clients >= self.config.max_clients:
            return Reject(errno.EBUSY,
                          f"the target already serves {self.config.max_clients} clients")
        if session is not None and session.channels >= self.config.max_channels:
            return Reject(errno.EBUSY, f"this client already has {session.channels} "
                                       "connections open (serve --max-channels)")
        readonly = greeting.hello.readonly or self.readonly
        if (not readonly and self.writers and not self.config.shared
                and (session is None or not session.writers)):
            return Reject(
                errno.EBUSY, "another client has this export open read-write: connect "
                "read-only, or serve with --shared if the clients coordinate their writes")
        lanes: tuple[int, int, int] | None = None
        if not readonly and self.atomic is not None and (session is None or not session.writers):
            granted = self._grant_lanes()
            if isinstance(granted, Reject):
                return granted
            lanes = granted
        if session is None:
            self._session_numbers += 1
            session = Session(self._session_numbers, transport, peer, client_id,
                              identity.name)
            self.sessions[session.number] = session
            if any(client_id):
                self._by_client_id[client_id] = session
        session.channels += 1
        if not readonly:
            self.writers += not session.writers
            session.writers += 1
            if lanes is not None:
                session.lanes = lanes
                self._lane_owner[lanes[0] // atomicblocks.LANES_PER_WRITER] = session
        return Admission(greeting, proof, identity, writer=not readonly, readonly=readonly,
                         session=session)

    # -- identities: reload and revocation -------------------------------------------------

    def on_revoke(self, revoke: Callable[[], None]) -> None:
        """A server's way to drop its connections that ``revoked`` names; called by
        ``reload`` on the reactor's thread."""
        self._revokers.append(revoke)

    def revoked(self, admission: Admission) -> str | None:
        """Why an admitted connection may no longer stay, or None: its identity was removed,
        or narrowed to read-only while this connection writes. A new secret alone keeps it
        (the secret is checked at admission, so it applies to new connections)."""
        if self.identities is None:
            return None
        name = admission.identity.name
        now = self.identities.get(name)
        if now is None:
            return f"identity {name!r} was removed from the clients file"
        if now.readonly and admission.writer:
            return f"identity {name!r} is now read-only"
        return None

    def reload(self) -> str:
        """Re-read the clients file; drop every connection it no longer allows (over RDMA,
        with its client's MR when it was the last: its rkey dies). A file that cannot be read
        or parsed is refused whole (ConfigError) and the identities in force stay. Runs on the
        reactor's thread. Returns a line saying what changed."""
        path = self.config.clients_file
        if path is None:
            raise ConfigError("the target was started without --clients: there is no clients "
                              "file to reload")
        new = auth.load_clients(path)
        with self.lock:
            old, self.identities = self.identities or {}, new
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(n for n in set(old) & set(new)
                         if (old[n].readonly, old[n].secret) != (new[n].readonly, new[n].secret))
        for revoke in self._revokers:
            revoke()
        summary = (f"reloaded {path}: {len(new)} identities ({len(added)} added, "
                   f"{len(removed)} removed, {len(changed)} changed)")
        log.info("%s%s%s%s", summary, f"; added {', '.join(added)}" if added else "",
                 f"; removed {', '.join(removed)}" if removed else "",
                 f"; changed {', '.join(changed)}" if changed else "")
        return summary

    # -- atomic blocks ---------------------------------------------------------------------

    def _grant_lanes(self) -> tuple[int, int, int] | Reject:
        """A group of lanes no writer holds, for a new writer (under the lock)."""
        assert self.atomic is not None
        per = atomicblocks.LANES_PER_WRITER
        groups = max(1, self.atomic.lanes // per)
        for group in range(groups):
            if group not in self._lane_owner and group not in self._quarantined:
                self._lane_grant = self._lane_grant % 0xFFFFFFFF + 1
                first = group * per
                return first, min(per, self.atomic.lanes - first), self._lane_grant
        if self.recovery_error is not None:  # more lanes would not help: say what would
            # The reason's end may be cut (REJECT_REASON_MAX): the way out comes first.
            return Reject(errno.EIO, "no free lanes, recovery failed (serve it --readonly to "
                                     f"copy the data out): {self.recovery_error}")
        waiting = (f" ({len(self._quarantined)} wait for their writers' recovery, when no "
                   "writer is connected)" if self._quarantined else "")
        return Reject(errno.EBUSY, f"every one of the {groups} lane groups of this atomic-"
                                   f"blocks region is held by a writer{waiting}: recreate it "
                                   "with more --lanes for more writers")

    def _release_lanes(self, session: Session) -> None:
        """A writer left (under the lock): its lanes are settled once no writer is connected,
        so that no live writer's moves are in flight while they are decided."""
        if session.lanes is not None:
            group = session.lanes[0] // atomicblocks.LANES_PER_WRITER
            self._lane_owner.pop(group, None)
            self._quarantined.add(group)
            session.lanes = None
        if self.writers == 0 and self._quarantined:
            try:
                self._recover_lanes()
            except PmemblkError as exc:
                if str(exc) != self.recovery_error:
                    log.error("%s: atomic-blocks recovery failed (%s): no writer can have the "
                              "lanes of the writers that left; serve it --readonly to copy "
                              "the data out", self.region.path, exc)
                self.recovery_error = str(exc)
                return
            self._quarantined.clear()
            self.recovery_error = None

    def _recover_lanes(self) -> None:
        assert self.atomic is not None
        area = layout.data_area(self.region, self.header.data_offset, self.size)
        atomicblocks.recover(area, self.atomic)

    def compare_store(self, offset: int, expected: int, new: int) -> int:
        """A stream client's CAS: store ``new`` at export ``offset`` (8-aligned) if it holds
        ``expected``; the value found. One aligned 8-byte store: all or nothing."""
        at = self.header.data_offset + offset
        with self._cas_lock:
            found = int.from_bytes(self.region.read(at, 8), "little")
            if found == expected:
                self.region.store_u64(at, new)
        return found

    def offer_native(self, offer: durability.NativeOffer) -> None:
        """The verbs server's probe: its connections may use these native verbs."""
        self.native = offer
        if self.durable is not None and offer.flush == "persistent":
            # TESTING ONLY: the power-cut emulation must see FLUSHes the CPU never does.
            self._stack.enter_context(contextlib.closing(FlushTracer(self.durable)))
        self.guarantees = durability.guarantees(self.region.is_pmem, self.region.persist_method,
                                                self.config.apm_durable, offer,
                                                self.region.memory)

    def welcome(self, admission: Admission, rkey: int = 0, remote_addr: int = 0,
                native: bool = False) -> Welcome:
        """The WELCOME for an admitted client, with the target's proof when authenticating.
        ``native``: the client's rkey allows the native verbs the probe found (RDMA)."""
        flags = (REGION_IS_PMEM if self.region.is_pmem else 0) | (
            REGION_READONLY if admission.readonly else 0) | (
            REGION_ATOMIC_BLOCKS if self.atomic is not None else 0) | (
            REGION_SHARED if self.config.shared else 0)
        lanes = admission.session.lanes if admission.writer else None
        first, count, grant = lanes if lanes is not None else (0, 0, 0)
        declared = durability.declare(self.durable_methods, self.native, native,
                                      admission.readonly)
        flags |= REGION_ATOMIC_WRITE if declared.atomic_write else 0
        methods, durable = declared.flush_methods, declared.durable_methods
        if not self.region.memory.persistent:  # not even a native FLUSH_PERSISTENT
            durable = 0
        welcome = Welcome(
            export_size=self.size, block_size=self.header.block_size, region_flags=flags,
            flush_methods=methods, rkey=rkey, remote_addr=remote_addr,
            region_uuid=self.header.uuid, max_message_size=MAX_MESSAGE_SIZE,
            commit_depth=COMMIT_DEPTH, durable_methods=durable,
            loss_epoch=self.loss_epoch, instance=self.instance, lane_first=first,
            lane_count=count, lane_grant=grant,
        )
        if self.identities is None:
            return welcome
        g = admission.greeting
        return dataclasses.replace(
            welcome, proof=auth.target_proof(admission.identity.secret, g.hello, g.challenge,
                                             admission.auth, welcome))

    def lose_reply(self, kind: str) -> bool:
        """TESTING ONLY: whether this reply of ``kind`` is to be lost (pmemblk.faults)."""
        if self.lost_reply is None:
            return False
        with self.lock:
            return self.lost_reply.lose(kind)

    @property
    def clients(self) -> int:
        """Admitted clients: a session lasts from its first channel to its last."""
        return len(self.sessions)

    def client_left(self, admission: Admission) -> None:
        """One admitted connection is gone; its client goes with its last one."""
        session = admission.session
        with self.lock:
            if admission.writer:
                session.writers -= 1
                self.writers -= not session.writers
                if not session.writers and self.atomic is not None:
                    self._release_lanes(session)
            session.channels -= 1
            if session.channels == 0:
                self.sessions.pop(session.number, None)
                if self._by_client_id.get(session.client_id) is session:
                    del self._by_client_id[session.client_id]

    def count(self, session: Session, op: str, nbytes: int) -> None:
        """A stream client's READ, WRITE or ZERO (verbs data never reaches the target)."""
        with self.lock:
            session.count(op, nbytes)
            self.totals[f"{op}s"] += 1
            self.totals[f"{op}_bytes"] += nbytes

    # -- persistence -----------------------------------------------------------------------

    def commit(self, commit: Commit, session: Session | None = None) -> CommitReply:
        """Persist the ranges of a (validated) COMMIT; the reply carries 0 or an errno. Several
        channels may commit at once: persisting holds no lock."""
        nbytes = sum(length for _, length in commit.ranges)
        with self.lock:
            for counts in [self.totals] + ([session.counts] if session is not None else []):
                counts["commits"] += 1
                counts["commit_bytes"] += nbytes
        status = 0
        if not self.readonly:  # a read-only export has nothing to persist
            try:
                for off, length in commit.ranges:
                    self.region.persist(self.header.data_offset + off, length)
            except PmemError as exc:
                log.error("persisting for a COMMIT failed: %s", exc)
                status = exc.errno
                with self.lock:
                    self.totals["commit_errors"] += 1
                    if session is not None:
                        session.counts["commit_errors"] += 1
        return CommitReply(commit.request_id, status)

    # -- data (stream transports; RDMA moves data without the target's CPU) -----------------

    def view(self, offset: int, length: int) -> memoryview:
        """The export's bytes themselves: a READ is sent from here, a WRITE received here."""
        return self.region.view(self.header.data_offset + offset, length)

    def zero(self, offset: int, length: int) -> None:
        view = self.region.view(self.header.data_offset + offset, length)
        step = 1 << 20
        zeros = bytes(min(step, length))
        for pos in range(0, length, step):
            n = min(step, length - pos)
            view[pos:pos + n] = zeros[:n]

    # -- status (pmemblk status --target) ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What the target is doing; read from the control thread, so only copies are read."""
        region, header = self.region, self.header
        with self.lock:
            sessions = [dataclasses.replace(c, counts=dict(c.counts))
                        for c in self.sessions.values()]
            totals, handshakes = dict(self.totals), self.handshakes
            atomic = None if self.atomic is None else {
                "sector_size": self.atomic.sector_size, "sectors": self.atomic.external_blocks,
                "lanes": self.atomic.lanes,
                "lane_groups": max(1, self.atomic.lanes // atomicblocks.LANES_PER_WRITER),
                "lane_groups_held": len(self._lane_owner),
                "lane_groups_waiting_for_recovery": len(self._quarantined),
                "lane_recovery_error": self.recovery_error,
            }
        return {
            "pid": os.getpid(), "version": __version__, "region": region.path,
            "kind": "devdax" if is_devdax(region.path) else "file",
            "region_uuid": str(header.uuid), "export_size": self.size,
            "block_size": header.block_size, "is_pmem": region.is_pmem,
            "persistence": region.persist_method, "memory": region.memory.describe(),
            "memory_persistent": region.memory.persistent, "readonly": self.readonly,
            "shared": self.config.shared, "listen": str(self.config.listen),
            "transports": list(self.config.transports),
            "authentication": self.identities is not None,
            "identities": None if self.identities is None else {
                i.name: i.mode for i in self.identities.values()},
            "loss_epoch": self.loss_epoch, "uptime_s": round(time.time() - self.started, 1),
            "flush": {g.method: g.describe() for g in self.guarantees},
            "clients": [{
                "client": c.number, "identity": c.identity, "transport": c.transport,
                "address": c.peer,
                "mode": "read-only" if c.readonly else "read-write", "channels": c.channels,
                "connected_s": round(time.time() - c.since, 1), **c.counts,
            } for c in sessions],
            "handshakes": handshakes,
            "totals": totals,
            "atomic_blocks": atomic,
        }

    def metrics(self) -> bytes:
        def collect() -> Iterator[Metric]:
            st = self.status()
            labels = {"region": st["region"]}
            yield stats.info("pmemblk_target", "The region this target serves",
                             {"region": st["region"], "uuid": st["region_uuid"],
                              "listen": st["listen"], "version": __version__})
            yield stats.gauge("pmemblk_target_clients", "Clients connected now",
                              len(st["clients"]), labels)
            yield stats.gauge("pmemblk_target_loss_epoch",
                              "Restarts after a reboot or power cut that found it unclean",
                              st["loss_epoch"], labels)
            yield stats.gauge("pmemblk_target_is_pmem", "1 if the region is persistent memory",
                              int(st["is_pmem"]), labels)
            yield stats.gauge("pmemblk_target_writers", "Read-write clients connected now",
                              sum(c["mode"] == "read-write" for c in st["clients"]), labels)
            persistent = GaugeMetricFamily(
                "pmemblk_target_flush_persistent",
                "1 if an acknowledged FLUSH by this method survives a power cut",
                labels=["region", "method"])
            for g in self.guarantees:
                persistent.add_metric([st["region"], g.method], int(g.persistent))
            yield persistent
            per_client = GaugeMetricFamily("pmemblk_target_client_channels",
                                           "Connections each client has open, by identity",
                                           labels=["region", "client", "identity"])
            for c in st["clients"]:
                per_client.add_metric([st["region"], str(c["client"]), c["identity"]],
                                      c["channels"])
            yield per_client
            for key, value in st["totals"].items():
                yield stats.counter(f"pmemblk_target_{key}", f"Total {key.replace('_', ' ')}",
                                    value, labels)

        return stats.prometheus_text(collect)

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Persist the whole data area and mark the region clean (once it was served), unmap,
        unlock. Safe twice."""
        if self._closed:
            return
        self._closed = True
        with self._stack:
            if self.began and not self.readonly:
                try:
                    self.region.persist(self.header.data_offset, self.size)
                except PmemError as exc:
                    log.error("%s is NOT marked clean: persisting its data area failed (%s)",
                              self.region.path, exc)
                    raise
                state = layout.read_state(self.region)
                layout.write_state(self.region, layout.State(True, state.times_served))
                log.info("persisted %d bytes and marked %s clean", self.size, self.region.path)
