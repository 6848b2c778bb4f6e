"""Processes the integration suites start: a target, nbdkit with the plugin, /dev/nbd*.

Every process is started here and ended here, by PID. Waits poll with a deadline; nothing
asserts on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, ClassVar

from .conftest import ROOT

PLUGIN = str(ROOT / "plugin" / "pmemblk.py")
PY = sys.executable


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def run(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def pmemblk(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(PY, "-m", "pmemblk", *args, check=check)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def region_info(path: str) -> dict[str, object]:
    info = json.loads(pmemblk("info", path, "--json").stdout)
    assert isinstance(info, dict)
    return info


def our_nbdkits(folder: Path) -> list[int]:
    """Live (not zombie) nbdkit processes whose command line names a socket under ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and cmdline.startswith(b"nbdkit\0") and str(folder).encode() in cmdline:
            pids.append(int(proc.name))
    return pids



class Target:
    """``pmemblk serve`` in the background; its log is kept for assertions.

    Every target started and not yet stopped is in ``Target.running``: tests/conftest.py stops
    them after each test, so a failing test leaves no target (and no region lock) behind.
    """

    count = 0
    running: ClassVar[set[Target]] = set()

    def __init__(self, region: str, listen: str, workdir: Path, *extra: str,
                 transport: str = "verbs", secret: Path | None = None,
                 wrapper: tuple[str, ...] = ()) -> None:
        Target.count += 1
        self.region, self.listen, self.extra, self.transport = region, listen, extra, transport
        self.secret = secret
        #: A command the target runs under (it must exec it: prlimit, ip netns exec).
        self.wrapper = wrapper
        self.port = int(listen.rpartition(":")[2]) if not listen.startswith("unix:") else 0
        self.pid_file = workdir / f"target-{Target.count}.pid"
        self.log_path = workdir / f"target-{Target.count}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Target:
        self.pid_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*self.wrapper, PY, "-m", "pmemblk", "-v", "serve", self.region, "--listen",
             self.listen, "--transport", self.transport, "--pid-file", str(self.pid_file),
             *self.extra,
             *(["--secret-file", str(self.secret)] if self.secret else [])],
            stdout=self._log, stderr=subprocess.STDOUT)
        Target.running.add(self)
        proc = self.proc
        wait_until(lambda: self.pid_file.exists() or proc.poll() is not None, "the target")
        if proc.poll() is not None:
            raise AssertionError(f"the target exited {proc.returncode}:\n{self.log()}")
        return self

    @property
    def keys(self) -> list[str]:
        """The plugin keys that reach this target."""
        return [f"target={self.listen}", *([f"secret-file={self.secret}"] if self.secret else [])]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 60) -> None:
        wait_until(lambda: text in self.log(), f"{text!r} in the target log", timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        rc = 0
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            rc = self.proc.wait(timeout=120)
        elif self.proc is not None:
            rc = self.proc.returncode
        self.proc = None
        Target.running.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Target:
        """A new process for the same region and address (after stop or kill)."""
        return Target(self.region, self.listen, self.log_path.parent, *self.extra,
                      transport=self.transport, secret=self.secret,
                      wrapper=self.wrapper).start()


class Nbdkit:
    """``nbdkit -f`` serving the plugin on a fresh Unix socket."""

    count = 0

    def __init__(self, workdir: Path, *keys: str, filters: tuple[str, ...] = ()) -> None:
        Nbdkit.count += 1
        self.sock = workdir / f"nbd-{Nbdkit.count}.sock"
        self.log_path = workdir / f"nbdkit-{Nbdkit.count}.log"
        self.pid_path = workdir / f"nbdkit-{Nbdkit.count}.pid"
        self.keys = keys
        self.filters = [f"--filter={f}" for f in filters]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> Nbdkit:
        # The plugin imports an installed pmemblk first, and nbdkit's Python is the venv's when
        # its bin/ is on PATH (an activated venv): this checkout's pmemblk must come first,
        # or a copy of the tree (scripts/mutants) would test the installed code instead.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["nbdkit", "-f", "-U", str(self.sock), "-P", str(self.pid_path),
                 *self.filters, "python", PLUGIN, *self.keys],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        proc = self.proc
        # The pid file is written once nbdkit listens; the socket file exists from bind() on,
        # and a client that came in between was refused (seen in the crash suite).
        wait_until(lambda: self.pid_path.exists() or proc.poll() is not None,
                   "nbdkit's pid file")
        if proc.poll() is not None:
            raise AssertionError(f"nbdkit exited {proc.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        # nbdkit 1.32 waits on SIGTERM for connected clients to leave; after a bounded wait
        # the test's own nbdkit is killed.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None


class NbdDevice:
    """The kernel NBD client attached to an nbdkit socket."""

    def __init__(self, dev: str = "/dev/nbd0") -> None:
        self.dev = dev
        self.name = os.path.basename(dev)

    def connected(self) -> bool:
        return Path(f"/sys/block/{self.name}/pid").exists()

    def attach(self, server: Nbdkit, connections: int = 1) -> NbdDevice:
        wait_until(lambda: not self.connected(), f"{self.dev} to be free")
        run("nbd-client", "-N", "pmemblk", "-u", str(server.sock), self.dev, "-b", "4096",
            *(["-C", str(connections)] if connections > 1 else []))
        wait_until(self.connected, f"{self.dev} to connect")
        return self

    def detach(self) -> None:
        if self.connected():
            run("nbd-client", "-d", self.dev, check=False)
            wait_until(lambda: not self.connected(), f"{self.dev} to disconnect")


@contextlib.contextmanager
def served(target: Target, workdir: Path, *keys: str) -> Iterator[NbdDevice]:
    """nbdkit + /dev/nbd0 in front of a running target, torn down afterwards."""
    server = Nbdkit(workdir, *target.keys, *keys).start()
    dev = NbdDevice()
    try:
        dev.attach(server)
        yield dev
    finally:
        dev.detach()
        server.stop()


@contextlib.contextmanager
def mounted(dev: NbdDevice, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    run("mount", dev.dev, str(mnt))
    try:
        yield mnt
    finally:
        run("umount", str(mnt))
