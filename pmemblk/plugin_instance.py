"""The plugin instance, without nbdkit: its keys, how it connects, and its state.

(``pmemblk.nbdkit_plugin`` is what nbdkit loads: the callbacks, which only forward here.)

One plugin instance (one nbdkit process) is one client of the target: its NBD connections
share a ``Client`` (one per access mode), whose nbdkit worker threads each get a channel of
their own, and every channel carries the instance's client id (docs/design.md, "Thread
model"). A FLUSH on any connection therefore covers the writes of all of them (multi-conn).

``plugin/pmemblk.py`` is a thin shim that nbdkit loads; it forwards each callback here and maps
errors to ``nbdkit.set_error``. Keeping the logic here lets it be tested on any host.

Keys (``KEY_TABLE`` below: one row per key, its parser and its help; the plugin's help,
this docstring's list and nbdkit-pmemblk-plugin(1) are made from it):
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric

from . import __version__, auth, rdma, stats
from .address import UNIX_PATH_MAX, Address, TCPAddress, UnixAddress, parse_address
from .client import DEFAULT_CHANNELS, OPS, Client
from .control import ControlServer
from .errors import ConfigError, RemoteError, TransportError
from .protocol import FLUSH_METHODS, check_identity
from .tls import ClientTls, client_context, parse_mode
from .transport import ConnectOptions, Transport
from .transport.registry import REGISTRY
from .transport.verbs import DEFAULT_DEPTH, DEFAULT_TIMEOUT
from .units import parse_size

log = logging.getLogger(__name__)

DEFAULT_RECONNECT_TIMEOUT = 60.0
TRANSPORTS = ("auto", *REGISTRY)
#: Names of devices and attachments (also directory names under /run/pmemblk).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{key}={value!r}: expected true or false")


def _seconds(key: str, value: str, allow_zero: bool) -> float:
    try:
        n = float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected seconds, e.g. 30") from None
    if not (0 <= n <= 3600 if allow_zero else 0 < n <= 3600):
        raise ConfigError(f"{key}={value!r}: must be {'at least' if allow_zero else 'more than'}"
                          " 0 and at most 3600")
    return n


def _transport(key: str, value: str) -> str:
    if value not in TRANSPORTS:
        raise ConfigError(f"transport={value!r}: use auto, verbs or tcp")
    return value


def _flush(key: str, value: str) -> str:
    if value != "auto" and value not in FLUSH_METHODS:
        raise ConfigError(f"flush={value!r}: use auto, native, gpspm or apm")
    return value


def _whole(low: int, high: int) -> Callable[[str, str], int]:
    def parse(key: str, value: str) -> int:
        if not value.isdigit() or not low <= int(value) <= high:
            raise ConfigError(f"{key}={value!r}: expected a whole number from {low} to {high}")
        return int(value)
    return parse


def _chunk(key: str, value: str) -> int:
    n = parse_size(value)
    if n & (n - 1) or not 4096 <= n <= 16 << 20:
        raise ConfigError(f"chunk={value!r}: expected a power of two from 4K to 16M")
    return n


def _control(key: str, value: str) -> str:
    if not value or len(value.encode()) > UNIX_PATH_MAX:
        raise ConfigError(f"control={value!r}: expected a socket path of at most "
                          f"{UNIX_PATH_MAX} bytes")
    return value


def _name(key: str, value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ConfigError(f"name={value!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    return value


def _log(key: str, value: str) -> str:
    if not value:
        raise ConfigError("log=: expected a file to append the plugin's messages to")
    return value


def _client(key: str, value: str) -> str:
    if not value:
        raise ConfigError("client=: expected an identity's name")
    return check_identity(value, "client=")


def _tls_certificates(key: str, value: str) -> str:
    if not value:
        raise ConfigError("tls-certificates=: expected a folder")
    return value


@dataclass(frozen=True)
class Key:
    """One configuration key: how its value is written, what it means, how it is parsed (to
    a value or ConfigError, one line) and the PluginConfig field it sets."""

    name: str
    value: str
    help: str
    parse: Callable[[str, str], object]
    field: str

    @property
    def usage(self) -> str:
        return f"{self.name}={self.value}"


#: Every key the plugin takes, in the order its help lists them. A new key is one row here
#: (and its field in PluginConfig); set(), the help and the man page follow.
KEY_TABLE: tuple[Key, ...] = (
    Key("target", "HOST:PORT|unix:PATH",
        "where pmemblk serve listens (required); unix:PATH for a Unix socket (tcp transport)",
        lambda key, value: parse_address(value, "target="), "target"),
    Key("transport", "auto|verbs|tcp",
        "auto (default): verbs when an RDMA device with an active port reaches the target, "
        "otherwise TCP; the choice and its reason are logged. verbs refuses loopback addresses",
        _transport, "transport"),
    Key("flush", "auto|native|gpspm|apm",
        "flush method (default auto: native where the target says native is persistent, then "
        "apm where apm is, otherwise gpspm; see docs/persistence.md)", _flush, "flush"),
    Key("allow-visibility-only", "true|false",
        "accept a flush method that only proves the data reached the target's memory "
        "(survives the target process, not a power cut); default false",
        parse_bool, "allow_visibility_only"),
    Key("readonly", "true|false", "open the export read-only (default false)",
        parse_bool, "readonly"),
    Key("secret-file", "PATH",
        "the shared secret of a target that serves with --secret-file, or this client's own "
        "(with client=; mode 600); the plugin then also refuses a target that cannot prove it "
        "holds the secret", lambda key, value: value, "secret_file"),
    Key("client", "NAME",
        "the identity to connect as: a line of the target's --clients file (its secret in "
        "secret-file=)", _client, "client"),
    Key("reconnect-timeout", "SECONDS",
        "how long to keep reconnecting to a lost target before requests fail with EIO "
        f"(default {DEFAULT_RECONNECT_TIMEOUT:g}; 0: fail at once)",
        lambda key, value: _seconds(key, value, allow_zero=True), "reconnect_timeout"),
    Key("timeout", "SECONDS",
        f"deadline for every completion or reply (default {DEFAULT_TIMEOUT:g}); then the "
        "connection counts as lost",
        lambda key, value: _seconds(key, value, allow_zero=False), "timeout"),
    Key("channels", "N",
        "connections to the target this plugin instance opens at most, as its threads need "
        f"them (default {DEFAULT_CHANNELS}, 1..64): the most requests in flight at once",
        _whole(1, 64), "channels"),
    Key("depth", "N", f"work requests in flight per request (default {DEFAULT_DEPTH}, 1..64)",
        _whole(1, 64), "depth"),
    Key("chunk", "SIZE",
        "bytes per RDMA work request or stream frame (a power of two from 4K to 16M; default "
        "256K over RDMA, 1M over a stream; a stream uses at most 4M)", _chunk, "chunk"),
    Key("control", "PATH",
        "answer pmemblk status (JSON) and Prometheus requests on this Unix socket (mode 600)",
        _control, "control"),
    Key("stats", "true|false", "count requests and their latency (default true)",
        parse_bool, "stats"),
    Key("name", "NAME", "this device's name in status and metrics (default: the target)",
        _name, "name"),
    Key("log", "FILE",
        "also append the plugin's messages (info and up) to FILE: nbdkit in the background "
        "has no stderr", _log, "log"),
    Key("tls", "off|on|require",
        "TLS 1.3 over TCP (default off); on: TLS where the target offers it, plaintext where "
        "it does not; require: refuse a target without it (RDMA is never encrypted)",
        lambda key, value: parse_mode(value, "tls="), "tls"),
    Key("tls-certificates", "DIR",
        "ca-cert.pem checks the target (default: the system's CAs); with client-cert.pem and "
        "client-key.pem, for a target that serves with --tls-verify-peer",
        _tls_certificates, "tls_certificates"),
)
KEYS = tuple(k.name for k in KEY_TABLE)
KEYS_BY_NAME = {k.name: k for k in KEY_TABLE}


def keys_help(width: int = 92) -> str:
    """The keys as plain text, for the docstring and ``--dump-plugin``."""
    lines = []
    for k in KEY_TABLE:
        lines.append(f"    {k.usage}")
        lines += textwrap.wrap(k.help, width, initial_indent=" " * 10,
                               subsequent_indent=" " * 10)
    return "\n".join(lines) + "\n"


@dataclass
class PluginConfig:
    target: Address | None = None
    transport: str = "auto"
    flush: str = "auto"
    allow_visibility_only: bool = False
    readonly: bool = False
    timeout: float = DEFAULT_TIMEOUT
    channels: int = DEFAULT_CHANNELS
    depth: int = DEFAULT_DEPTH
    #: None: each transport's own default (RDMA work requests, stream frames).
    chunk: int | None = None
    secret_file: str = ""
    secret: bytes | None = field(default=None, repr=False)
    client: str = ""
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT
    control: str = ""
    stats: bool = True
    name: str = ""
    log: str = ""
    seen: set[str] = field(default_factory=set)
    tls: str = "off"
    tls_certificates: str = ""
    #: Made by complete() for tls=on|require.
    tls_client: ClientTls | None = field(default=None, repr=False)
    #: Every channel of this plugin instance says it is this one client.
    client_id: bytes = field(default_factory=auth.new_client_id, repr=False)

    def set(self, key: str, value: str) -> None:
        spec = KEYS_BY_NAME.get(key)
        if spec is None:
            raise ConfigError(f"unknown key {key!r}: this plugin takes {', '.join(KEYS)}")
        if key in self.seen:
            raise ConfigError(f"{key} given twice")
        self.seen.add(key)
        setattr(self, spec.field, spec.parse(key, value))

    def complete(self) -> None:
        if self.target is None:
            raise ConfigError("target=HOST:PORT is required (the address pmemblk serve listens on)")
        if self.secret_file:
            self.secret = auth.load_secret(self.secret_file)
        elif self.client:
            raise ConfigError(f"client={self.client} needs secret-file=PATH: that identity's "
                              "secret")
        if self.transport == "verbs":
            if not isinstance(self.target, TCPAddress):
                raise ConfigError("transport=verbs needs target=HOST:PORT, not a unix: socket")
            _ = self.rdma_ip  # refuses loopback and wildcard addresses now
        if self.tls == "off":
            if self.tls_certificates:
                raise ConfigError("tls-certificates= needs tls=on or tls=require")
            return
        if self.tls == "require" and self.transport == "verbs":
            raise ConfigError("tls=require cannot use transport=verbs: RDMA moves data "
                              "one-sided, NIC to memory, where the host cannot encrypt it (see "
                              "docs/security.md: IPsec or MACsec offload on the NIC); use "
                              "transport=tcp or auto")
        self.tls_client = ClientTls(self.tls, client_context(
            self.tls_certificates or None, isinstance(self.target, TCPAddress)))

    @property
    def address(self) -> Address:
        if self.target is None:
            raise ConfigError("target=HOST:PORT is required")
        return self.target

    @functools.cached_property
    def rdma_ip(self) -> str:
        """The target's IP address for RDMA CM, resolved once (ConfigError if unusable)."""
        if not isinstance(self.target, TCPAddress):
            raise ConfigError("RDMA needs target=HOST:PORT, not a unix: socket")
        return self.target.rdma_ip("target")


def auto_choice(cfg: PluginConfig) -> tuple[str, str]:
    """(transport, why) for transport=auto, before trying to connect."""
    if isinstance(cfg.target, UnixAddress):
        return "tcp", "the target is a Unix socket"
    if cfg.tls == "require":
        return "tcp", "tls=require, and RDMA traffic cannot be encrypted by the host"
    if not rdma.HAVE_PYVERBS:
        return "tcp", "pyverbs is not importable"
    devices = rdma.active_rdma_devices()
    if not devices:
        return "tcp", "no RDMA device with an active port on this host"
    try:
        _ = cfg.rdma_ip
    except ConfigError as exc:
        return "tcp", str(exc).split(". ")[0]
    return "verbs", f"RDMA device {', '.join(devices)} has an active port"


def connect_transport(cfg: PluginConfig, readonly: bool) -> tuple[Transport, str]:
    """A connection, and the transport kind it uses (verbs or tcp)."""
    kind, why = auto_choice(cfg) if cfg.transport == "auto" else (cfg.transport, "")
    if kind == "verbs":
        try:
            transport = _connect_kind(cfg, "verbs", readonly)
        except RemoteError:
            raise  # a pmemblk target answered over RDMA and refused: that is the answer
        except (TransportError, ConfigError) as exc:
            if cfg.transport != "auto":
                raise
            why = f"RDMA could not reach the target ({exc})"
        else:
            if cfg.transport == "auto":
                log.info("transport=auto: using RDMA verbs: %s", why)
            return transport, "verbs"
    if cfg.transport == "auto":
        log.info("transport=auto: using TCP: %s", why)
    return _connect_kind(cfg, "tcp", readonly), "tcp"


def _connect_kind(cfg: PluginConfig, kind: str, readonly: bool) -> Transport:
    return REGISTRY[kind].connect(ConnectOptions(
        cfg.address, readonly=readonly, timeout=cfg.timeout, depth=cfg.depth,
        chunk_size=cfg.chunk, secret=cfg.secret, client_id=cfg.client_id, tls=cfg.tls_client,
        identity=cfg.client))


def connect(cfg: PluginConfig, readonly: bool, io_stats: stats.IoStats | None = None) -> Client:
    """A client of the target, read-only if nbdkit asks or ``readonly=true``; it opens a
    pool of channels as its threads need them."""
    readonly = readonly or cfg.readonly
    transport, kind = connect_transport(cfg, readonly)
    try:
        # New channels and reconnects use the transport the first connection chose.
        return Client(transport, cfg.flush, readonly, cfg.allow_visibility_only,
                      reconnect=lambda: _connect_kind(cfg, kind, readonly),
                      reconnect_timeout=cfg.reconnect_timeout, stats=io_stats,
                      max_channels=cfg.channels)
    except BaseException:
        transport.close()
        raise


class PluginState:
    """One plugin instance (one nbdkit process): its configuration, the clients its NBD
    connections share, the statistics they share and the control socket that reports them."""

    def __init__(self) -> None:
        self.config = PluginConfig()
        self.stats = stats.IoStats(OPS)
        #: Each client and how many NBD connections use it; a new connection joins the one
        #: for its access mode (``shared``) unless that one has failed for good.
        self.clients: dict[Client, int] = {}
        self.shared: dict[bool, Client] = {}
        self.opened = 0
        self.failed_opens = 0
        self.last_error = ""
        self.control: ControlServer | None = None
        #: What the newest connection found: transport, flush method, the region.
        self.link: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()

    def start_control(self) -> None:
        self.stats.enabled = self.config.stats
        if self.config.control and self.control is None:
            self.control = ControlServer(self.config.control, self.status, self.metrics,
                                         f"control={self.config.control}")

    def open(self, readonly: bool) -> Client:
        """The client for a new NBD connection: the shared one for its access mode, or a new
        one (the first, or when the shared one fails every request or every flush)."""
        readonly = readonly or self.config.readonly
        with self._open_lock:  # one open at a time; status() is not held up by a connect
            with self._lock:
                client = self.shared.get(readonly)
                if client is not None and client.broken is None and client.lost is None:
                    self.clients[client] += 1
                    self.opened += 1
                    return client
            # A failed client's connections may still write: one that replaces it is a client
            # of its own (its own id, its own session and lanes), never a channel of the old.
            config = self.config if client is None else dataclasses.replace(
                self.config, client_id=auth.new_client_id())
            try:
                client = connect(config, readonly, self.stats)
            except Exception as exc:
                with self._lock:
                    self.failed_opens += 1
                    self.last_error = str(exc)
                raise
            with self._lock:
                self.shared[readonly] = client
                self.clients[client] = 1
                self.opened += 1
        info = client.transport.info
        link = {
            "transport": client.transport.kind, "tls": client.transport.tls,
            "flush": client.flush_method, "persistent": client.persistent,
            "readonly": client.readonly, "export_size": client.size,
            "block_size": client.block_size, "region_uuid": str(info.region_uuid),
            "target_is_pmem": info.is_pmem, "loss_epoch": info.loss_epoch,
        }
        with self._lock:
            self.link = link
        return client

    def closed(self, client: Client) -> None:
        """An NBD connection closed; its client closes with the last connection using it."""
        with self._lock:
            refs = self.clients.get(client, 0) - 1
            if refs > 0:
                self.clients[client] = refs
                return
            self.clients.pop(client, None)
            for mode, shared in list(self.shared.items()):
                if shared is client:
                    del self.shared[mode]
        client.close()

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None

    @property
    def name(self) -> str:
        return self.config.name or str(self.config.target)

    def status(self) -> dict[str, Any]:
        with self._lock:
            clients = list(self.clients)
            connections = sum(self.clients.values())
            opened, failed, last_error = self.opened, self.failed_opens, self.last_error
        out: dict[str, Any] = {
            "name": self.name, "pid": os.getpid(), "version": __version__,
            "target": str(self.config.target), "uptime_s": round(time.time()
                                                                   - self.stats.started, 1),
            "connections": connections, "channels": sum(c.channels for c in clients),
            "connections_opened": opened,
            "connections_failed": failed, "last_error": last_error,
            "reconnects": self.stats.reconnects, "stats": self.stats.enabled,
        }
        out.update(self.link)
        broken = [c.broken or c.lost for c in clients if c.broken or c.lost]
        if broken:
            out["state"] = f"failing: {broken[0]}"
        else:
            out["state"] = "connected" if clients else "no connection open"
        out["ops"] = self.stats.summary()
        return out

    def metrics(self) -> bytes:
        labels = {"device": self.name}

        def collect() -> Iterator[Metric]:
            status = self.status()
            yield stats.info("pmemblk_client", "What this device is connected to",
                             {"device": self.name, "target": status["target"],
                              "transport": status.get("transport", ""),
                              "flush": status.get("flush", ""),
                              "version": __version__})
            yield stats.gauge("pmemblk_client_connections", "NBD connections open",
                              status["connections"], labels)
            yield stats.gauge("pmemblk_client_persistent",
                              "1 if an acknowledged FLUSH survives a power cut",
                              int(bool(status.get("persistent"))), labels)
            yield stats.counter("pmemblk_client_reconnects", "Reconnections to the target",
                                status["reconnects"], labels)
            yield stats.gauge("pmemblk_client_failing",
                              "1 if requests now fail (target lost for good, or data loss)",
                              int(status["state"].startswith("failing")), labels)
            yield from self.stats.metrics("pmemblk_client", labels)

        return stats.prometheus_text(collect)


def describe(client: Client) -> str:
    info = client.transport.info
    kind = REGISTRY[client.transport.kind].label
    mode = "persistent" if client.persistent else "visibility only"
    return (f"pmemblk region {info.region_uuid} over {kind}: flush={client.flush_method} "
            f"({mode}), target is_pmem={int(info.is_pmem)}")


__doc__ = (__doc__ or "") + "\n" + keys_help()
