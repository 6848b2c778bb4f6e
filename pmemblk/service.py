"""The target as a service: ``pmemblk serve`` runs an ``Export``'s servers until a signal.

``Target`` checks the configuration, makes the servers (addresses validated before the region
is touched), opens the export, publishes the pid file and tells systemd it is ready; on
SIGTERM or SIGINT it shuts everything down in order; SIGHUP (like ``pmemblk reload``)
re-reads the clients file. The export itself — the region,
admission, lanes, COMMIT — is ``pmemblk.target``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import threading

from . import files, servers
from .control import ControlServer
from .errors import ConfigError
from .reactor import Reactor
from .servers import Server
from .session import ServeConfig
from .target import Export

log = logging.getLogger(__name__)

#: How long ``pmemblk reload`` waits for the reactor (less than the asker's control.TIMEOUT).
RELOAD_TIMEOUT = 4.0


def check_exposure(config: ServeConfig) -> None:
    """Refuse to serve a network address to anyone who asks, unless told to."""
    if (config.secret is None and config.clients_file is None and not config.insecure_no_auth
            and not config.listen.is_local):
        raise ConfigError(
            f"--listen {config.listen} is reachable from other hosts and no --secret-file was "
            "given: anyone who can connect could read and write the region. Create a secret "
            "(pmemblk secret FILE), pass --secret-file FILE here and secret-file=FILE to the "
            "clients, or pass --insecure-no-auth to serve without authentication")


class Target:
    """Runs an Export's servers until SIGTERM/SIGINT, then shuts down cleanly."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.reactor = Reactor()
        self.export: Export | None = None
        self.servers: list[Server] = []
        self.pid_file: PidFile | None = None
        self.control: ControlServer | None = None

    def _make_servers(self) -> None:
        for name in self.config.transports:
            self.servers.append(servers.REGISTRY[name](self.reactor, self.config.listen,
                                                       self.config.handshake_timeout))

    def run(self) -> None:
        # SIGHUP reloads (the daemon convention), as ``pmemblk reload`` does: it no longer
        # stops the target.
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda signum, frame: self.reactor.stop())
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.post(self._reload_logged))
        try:
            check_exposure(self.config)
            self._make_servers()  # validates addresses before the region is touched
            if self.config.pid_file:
                self.pid_file = PidFile(self.config.pid_file, self.config.path)
            raise_fd_limit()
            self.export = Export(self.config)  # locked; unchanged until begin()
            for server in self.servers:
                server.start(self.export)
            if self.config.control:
                self.control = ControlServer(self.config.control, self.export.status,
                                             self.export.metrics,
                                             f"--control {self.config.control}",
                                             reload=self._reload_asked)
            self.export.begin()
            if self.pid_file is not None:
                self.pid_file.publish()
            notify_systemd("READY=1")
            self.reactor.run()
            notify_systemd("STOPPING=1")
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            self.shutdown()

    def reload(self) -> str:
        """Re-read the clients file (on the reactor's thread): ``ok: ...`` or ``error: ...``;
        on an error the identities in force stay."""
        if self.export is None:
            return "error: the target is not serving yet"
        notify_systemd("RELOADING=1")
        try:
            return f"ok: {self.export.reload()}"
        except ConfigError as exc:
            log.error("reload refused, the identities in force stay: %s", exc)
            return f"error: {exc}"
        except Exception as exc:  # a bug: say so, keep serving the clients
            log.exception("reload failed")
            return f"error: reload failed: {exc}"
        finally:
            notify_systemd("READY=1")

    def _reload_logged(self) -> None:
        """SIGHUP: reload; the outcome is in the log."""
        self.reload()

    def _reload_asked(self) -> bytes:
        """``pmemblk reload`` on the control socket (its thread): the reactor reloads."""
        done = threading.Event()
        answer: list[str] = []

        def run() -> None:
            answer.append(self.reload())
            done.set()

        self.reactor.post(run)
        if not done.wait(RELOAD_TIMEOUT):
            return f"error: the target did not reload within {RELOAD_TIMEOUT:g}s\n".encode()
        return answer[0].encode() + b"\n"

    def shutdown(self) -> None:
        """Servers, then the export, the reactor and the pid file: each one even if an earlier
        one failed (the first error is raised afterwards)."""
        with contextlib.ExitStack() as stack:
            if self.pid_file is not None:
                stack.callback(self.pid_file.close)
            stack.callback(self.reactor.close)
            if self.export is not None:
                stack.callback(self.export.close)
            if self.control is not None:  # stopped before the export it reads is closed
                stack.callback(self.control.close)
            for server in reversed(self.servers):
                stack.callback(server.close)


class PidFile:
    """``--pid-file``: checked and written aside before anything starts, put in place once
    every listener is up (by a rename, so a reader never sees it half-written: ``files.stage``
    and ``files.publish``), removed on exit only if still ours."""

    def __init__(self, path: str, region: str) -> None:
        self.path = path
        if os.path.exists(path) and os.path.exists(region) and os.path.samefile(path, region):
            raise ConfigError(f"--pid-file {path} is the region itself")
        files.check_replaceable(path, "--pid-file")
        self.content = f"{os.getpid()}\n".encode()
        self.tmp = files.stage(path, self.content, 0o644, "--pid-file")
        self.published = False

    def publish(self) -> None:
        files.publish(self.tmp, self.path, "--pid-file")
        self.published = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        if self.published:
            self.published = False
            with contextlib.suppress(OSError), open(self.path, "rb") as f:
                if f.read(64) == self.content:
                    os.unlink(self.path)


def notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify units) how the service is doing; nothing outside one."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where or where[0] not in "@/":
        return
    address = "\0" + where[1:] if where[0] == "@" else where
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one: each client holds descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open files limit raised from %d to %d", soft, hard)


def serve(config: ServeConfig) -> None:
    Target(config).run()
