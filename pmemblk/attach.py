"""``pmemblk attach``, ``detach`` and ``list``: a target as /dev/nbdN in one command.

``attach`` checks the target first (reachable, the secret accepted, the flush method
persistent), then starts nbdkit with the plugin in the background on a private Unix socket and
connects the kernel's NBD client to it. Everything it starts lives in one directory per
attachment, ``RUN_DIR/NAME/`` (mode 700):

    attach.json    what was attached, and how (read by detach, list and status)
    nbdkit.pid     nbdkit's PID, written by nbdkit once it listens
    nbdkit.log     nbdkit's and the plugin's messages
    nbd.sock       the NBD socket (the kernel client's, or a libnbd/qemu URI with --no-device)
    control.sock   the plugin's control socket (pmemblk status)

A step that fails undoes the ones before it, so a failed attach leaves nothing running and
nothing behind. ``detach`` flushes the device, disconnects it, stops nbdkit and removes the
directory; it refuses a device that is mounted or held by another device (md, dm).

A directory whose record is torn or wrongly typed, or that a detach left because it held files
pmemblk did not make, is a ``Leftover``: ``list`` shows it as broken, and ``detach NAME`` stops
what it can prove is its own (the nbdkit and the nbd-client whose command lines name its
socket) and says what it left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from . import commands, files, nbdqueue, plugin_instance
from .attachments import (
    FILES,
    NBDKIT_THREADS,
    Attachment,
    Leftover,
    attachments,
    device_busy,
    free_device,
    holders,
    our_nbdkit,
    read_pid,
    read_record,
    run_dir,
    sys_block,
)
from .errors import ConfigError, PmemblkError, ServiceError
from .transport.verbs import DEFAULT_TIMEOUT

log = logging.getLogger(__name__)

#: How long nbdkit may take to listen, and the device to show its size.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
MAX_THREADS = 64


@dataclass(frozen=True)
class AttachOptions:
    target: str
    device: str | None = None  # None: the first free one
    no_device: bool = False  # serve the NBD socket only (libnbd, qemu, fio's nbd engine)
    secret_file: str | None = None
    client: str | None = None  # the identity (serve --clients) to connect as
    flush: str = "auto"
    transport: str = "auto"
    readonly: bool = False
    connections: int = 1
    #: nbdkit worker threads per NBD connection (None: NBDKIT_THREADS shared by them all).
    threads: int | None = None
    name: str | None = None
    reconnect_timeout: float = plugin_instance.DEFAULT_RECONNECT_TIMEOUT
    allow_visibility_only: bool = False
    #: Plugin keys tls= and tls-certificates= (pmemblk.tls).
    tls: str = "off"
    tls_certificates: str | None = None


# -- attach ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One attach or detach at a time chooses devices and names."""
    folder = run_dir()
    try:
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use {folder}: {exc.strerror} (run as root, or set "
                          "PMEMBLK_RUN_DIR)") from None
    # Root keeps sockets, PIDs it will signal and records here: nobody else may write it.
    files.check_folder(str(folder), "the run directory")
    try:
        fd = os.open(folder / ".lock",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot use {folder / '.lock'}: {exc.strerror} (a symlink is "
                          "refused)" if exc.errno == errno.ELOOP else
                          f"cannot use {folder}: {exc.strerror} (run as root, or set "
                          "PMEMBLK_RUN_DIR)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def plugin_keys(opts: AttachOptions) -> list[str]:
    keys = [f"target={opts.target}", f"transport={opts.transport}", f"flush={opts.flush}",
            f"reconnect-timeout={opts.reconnect_timeout:g}"]
    if opts.secret_file:
        keys.append(f"secret-file={os.path.abspath(opts.secret_file)}")
    if opts.client:
        keys.append(f"client={opts.client}")
    if opts.readonly:
        keys.append("readonly=true")
    if opts.allow_visibility_only:
        keys.append("allow-visibility-only=true")
    if opts.tls != "off":
        keys.append(f"tls={opts.tls}")
    if opts.tls_certificates:
        keys.append(f"tls-certificates={os.path.abspath(opts.tls_certificates)}")
    return keys


def check_target(opts: AttachOptions, keys: list[str]) -> None:
    """Parse the keys as the plugin will, and connect once: a wrong address, secret or flush
    method fails here, in one line, before anything is started."""
    cfg = plugin_instance.PluginConfig()
    for key in keys:
        k, _, v = key.partition("=")
        cfg.set(k, v)
    cfg.complete()
    # Read-only: the probe must not hold the writer slot the device is about to take.
    with plugin_instance.connect(cfg, readonly=True):
        pass


def attach(opts: AttachOptions) -> Attachment:
    """Attach ``opts.target``; on failure nothing is left running or behind."""
    if not 1 <= opts.connections <= MAX_CONNECTIONS:
        raise ConfigError(f"--connections must be from 1 to {MAX_CONNECTIONS}")
    threads = opts.threads
    if threads is None:
        threads = max(1, NBDKIT_THREADS // opts.connections)
    if not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be from 1 to {MAX_THREADS}")
    if opts.name is not None and not plugin_instance.NAME_RE.fullmatch(opts.name):
        raise ConfigError(f"--name {opts.name!r}: use letters, digits, '.', '_' and '-' "
                          "(at most 64)")
    if opts.device is not None and opts.no_device:
        raise ConfigError("--device and --no-device contradict each other")
    if not opts.no_device:
        if not os.path.isdir("/sys/module/nbd"):
            raise ConfigError("the kernel's nbd module is not loaded: modprobe nbd (or attach "
                              "with --no-device to get an NBD socket only)")
        if shutil.which("nbd-client") is None:
            raise ConfigError("nbd-client is not installed (apt install nbd-client)")
        if opts.device is not None:
            if not os.path.exists(opts.device):
                raise ConfigError(f"--device {opts.device} does not exist")
            sys_block(opts.device)
    if shutil.which("nbdkit") is None:
        raise ConfigError("nbdkit is not installed (apt install nbdkit nbdkit-plugin-python)")
    keys = plugin_keys(opts)
    check_target(opts, keys)
    with _locked(), contextlib.ExitStack() as undo:
        device = None
        if not opts.no_device:
            device = opts.device or free_device()
            why = device_busy(device)
            if why is not None:
                raise ConfigError(f"--device {device} is busy: {why}")
        name = opts.name or (os.path.basename(device) if device else _free_name())
        folder = run_dir() / name
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            raise ConfigError(f"an attachment named {name} exists already ({folder}): "
                              f"pmemblk detach {name}, or choose another --name") from None
        except OSError as exc:
            raise ConfigError(f"cannot create {folder}: {exc.strerror}") from None
        undo.callback(_remove_folder, folder)
        att = Attachment(name, folder, opts.target, device, opts.connections, opts.readonly,
                         keys, threads=threads)
        att.save()
        pid = _start_nbdkit(att)
        undo.callback(_stop_process, pid)
        if device is not None:
            _connect_device(att, device, opts)
            undo.callback(_disconnect_device, device)
            check_kernel(device, opts.readonly)
        undo.pop_all()
    log.info("attached %s as %s", opts.target, device or att.uri)
    return att


def _free_name() -> str:
    taken = {a.name for a in attachments()}
    return next(f"export{i}" for i in range(len(taken) + 1) if f"export{i}" not in taken)


def plugin_path() -> str:
    """The plugin script nbdkit runs: pmemblk.nbdkit_plugin's file."""
    spec = find_spec("pmemblk.nbdkit_plugin")
    assert spec is not None and spec.origin is not None
    return spec.origin


def package_root() -> str:
    """The directory holding the pmemblk package (for nbdkit's Python to import it)."""
    return str(Path(plugin_path()).parent.parent)


def _start_nbdkit(att: Attachment) -> int:
    """nbdkit in the background (its own daemon mode: with --foreground it dies with its
    parent); its PID once it listens and the plugin's control socket is up."""
    pid_file = att.folder / "nbdkit.pid"
    # Worker threads per NBD connection: with one GIL, about 8 in all did best on the host,
    # 16 (nbdkit's default) or 4 connections of 8 half as well (docs/benchmarks.md).
    command = ["nbdkit", "--unix", str(att.nbd_socket), "--pidfile", str(pid_file),
               "--log=stderr", f"--threads={att.threads}"]
    if att.readonly:
        command.append("--readonly")
    # In the background nbdkit's stderr is gone: the plugin writes its messages itself.
    command += ["python", plugin_path(), *att.keys, f"control={att.control_socket}",
                f"name={att.name}", f"log={att.folder / 'nbdkit.log'}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), env.get("PYTHONPATH"))
                                        if p)
    log.debug("starting %s", " ".join(command))
    with open(att.folder / "nbdkit.log", "ab") as out:
        try:
            status = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    timeout=START_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            status = None
    if status != 0:  # the plugin refused its configuration, or nbdkit could not listen
        pid = read_pid(pid_file)
        if pid is not None:
            _stop_process(pid)
        raise ServiceError(f"nbdkit did not start: {_log_tail(att)}")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        pid = att.nbdkit_pid()
        if pid is not None and att.control_socket.exists():
            return pid
        gone = pid is None and pid_file.exists()
        if gone or time.monotonic() > deadline:
            if pid is not None:
                _stop_process(pid)
            raise ServiceError(f"nbdkit {'exited' if gone else 'did not start'}: "
                                 f"{_log_tail(att)}")
        time.sleep(0.05)


def _log_tail(att: Attachment) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in (att.folder / "nbdkit.log").read_text(errors="replace")
                 .splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        return (errors or lines or ["(no output)"])[-1]
    return "(no log)"


def _connect_device(att: Attachment, device: str, opts: AttachOptions) -> None:
    # The kernel must wait at least as long as the plugin keeps retrying a request
    # (reconnect-timeout plus one completion deadline): it then fails the request itself.
    timeout = int(opts.reconnect_timeout + DEFAULT_TIMEOUT + 30)
    command = ["nbd-client", "-unix", str(att.nbd_socket), device, "-name", "pmemblk",
               "-block-size", "4096", "-timeout", str(timeout)]
    if opts.connections > 1:
        command += ["-connections", str(opts.connections)]
    if opts.readonly:
        command.append("-readonly")
    try:
        res = commands.run(command, timeout=START_TIMEOUT, check=False)
    except ServiceError as exc:  # it hung (and was killed), or is not installed
        _disconnect_device(device)  # whatever it did before it hung
        raise ServiceError(f"nbd-client did not connect {device} within {START_TIMEOUT:g}s "
                           f"({exc}); nbdkit said: {_log_tail(att)}") from None
    if res.returncode != 0:
        said = (res.stderr.strip() or res.stdout.strip()).splitlines()
        raise ServiceError(f"nbd-client could not connect {device}: "
                           f"{said[-1] if said else 'exit ' + str(res.returncode)}; "
                           f"nbdkit said: {_log_tail(att)}")
    size = sys_block(device) / "size"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(OSError, ValueError):
            if int(size.read_text()) > 0:
                return
        if time.monotonic() > deadline:
            _disconnect_device(device)
            raise ServiceError(f"{device} did not get its size within {START_TIMEOUT:g}s")
        time.sleep(0.05)


def check_kernel(device: str, readonly: bool, sys_root: str = "/sys") -> None:
    """Refuse a device whose kernel will not send the FLUSH and FUA the export offers (the
    plugin offers both to a read-write connection, none to a read-only one)."""
    queue = nbdqueue.read_queue(device, sys_root)
    log.info("%s: the kernel's view: %s", device, queue.describe())
    nbdqueue.check(queue, offers_flush=not readonly, offers_fua=not readonly)


def _disconnect_device(device: str) -> None:
    try:
        commands.run(["nbd-client", "-d", device], timeout=STOP_TIMEOUT * 3, check=False)
    except ServiceError as exc:
        log.warning("nbd-client -d %s failed (%s): check it with nbd-client -c %s", device,
                    exc, device)
    pid_path = sys_block(device) / "pid"
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _stop_process(pid: int) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT (nbdkit 1.32 waits for its clients)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            log.warning("nbdkit (PID %d) did not stop within %gs: killing it", pid,
                        STOP_TIMEOUT)
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie child of ours is reaped and counts as gone)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _remove_folder(folder: Path) -> None:
    """Remove what attach made there, and the folder if nothing else is in it."""
    for name in FILES:
        path = folder / name
        with contextlib.suppress(FileNotFoundError):
            if path.is_symlink() or not path.is_dir():
                path.unlink()
    try:
        folder.rmdir()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("left %s in place: it holds files pmemblk did not make", folder)


# -- detach ----------------------------------------------------------------------------------


def detach(att: Attachment, force: bool = False) -> list[str]:
    """Flush, disconnect, stop nbdkit, clean up. Returns warnings for the caller to show."""
    warnings = []
    with _locked():
        if att.device is not None and (att.folder / "attach.json").exists():
            busy = holders(att.device)
            if busy:
                raise ConfigError(f"{att.device} is {', '.join(busy)}: unmount or stop it "
                                  "first; detach would pull the device from under it")
            connected = (sys_block(att.device) / "pid").exists()
            if connected:
                problem = _final_flush(att.device)
                if problem and not force:
                    raise PmemblkError(
                        f"the final flush of {att.device} failed ({problem}): what was "
                        "written may not be persistent. Nothing was detached; check "
                        f"pmemblk status {att.name}, or pmemblk detach --force to detach "
                        "anyway")
                if problem:
                    warnings.append(f"the final flush failed ({problem}); detached anyway")
                _disconnect_device(att.device)
        pid = att.nbdkit_pid()
        if pid is not None:
            _stop_process(pid)
        elif (att.folder / "nbdkit.pid").exists():
            warnings.append("nbdkit was not running any more")
        _remove_folder(att.folder)
    return warnings


def detach_leftover(left: Leftover, force: bool = False) -> list[str]:
    """Stop what ``left`` provably started (its nbd-client's device, its nbdkit), remove
    pmemblk's own files; returns what it could not do or left behind."""
    warnings = []
    with _locked():
        if not isinstance(read_record(left.folder), str):  # an attach finished meanwhile
            raise ConfigError(f"{left.name} is attached again: pmemblk detach {left.name}")
        for device in left.devices():
            busy = holders(device)
            if busy:
                raise ConfigError(f"{device} (served by {left.folder}) is {', '.join(busy)}: "
                                  "unmount or stop it first")
            problem = _final_flush(device)
            if problem and not force:
                raise PmemblkError(f"the final flush of {device} failed ({problem}): nothing "
                                   "was detached; pmemblk detach --force to detach anyway")
            if problem:
                warnings.append(f"the final flush of {device} failed ({problem})")
            _disconnect_device(device)
        pid = our_nbdkit(left.folder)
        if pid is not None:
            _stop_process(pid)
        _remove_folder(left.folder)
        if left.folder.exists():
            kept = ", ".join(sorted(p.name for p in left.folder.iterdir()))
            warnings.append(f"left {left.folder}: it holds files pmemblk did not make "
                            f"({kept}); remove them yourself")
    return warnings


def _final_flush(device: str) -> str | None:
    """fsync the device: the kernel sends every dirty page, then an NBD FLUSH."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc.strerror
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return f"{device} is not a block device"
        os.fsync(fd)
    except OSError as exc:
        return exc.strerror
    finally:
        os.close(fd)
    return None


# -- status ----------------------------------------------------------------------------------


def live_status(att: Attachment) -> dict[str, Any]:
    """The plugin's own status, with what attach recorded; ``state`` says if it is gone."""
    from .control import ask_status

    out: dict[str, Any] = {"name": att.name, "device": att.device, "uri": att.uri,
                           "target": att.target, "nbd_connections": att.connections}
    if att.nbdkit_pid() is None:
        out["state"] = "nbdkit is not running (pmemblk detach cleans up)"
        return out
    try:
        out.update(ask_status(str(att.control_socket)))
    except ServiceError as exc:
        out["state"] = f"not answering: {exc}"
    out["name"] = att.name
    if att.device is not None:
        try:
            out["kernel"] = nbdqueue.read_queue(att.device).as_dict()
        except ServiceError as exc:
            out["kernel"] = str(exc)
    return out
