"""What is attached: the run directory's records (``RUN_DIR/NAME/attach.json``, one folder per
attachment, mode 700), read back as ``Attachment`` or, when broken or left behind, as a
``Leftover``; and the kernel's NBD devices, free or busy. ``pmemblk.attach`` makes and undoes
attachments; ``list``, ``status`` and ``detach`` find them here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import files
from .errors import ConfigError

#: Where attachments live; PMEMBLK_RUN_DIR (or --run-dir) moves it, e.g. for tests.
DEFAULT_RUN_DIR = "/run/pmemblk"
#: nbdkit worker threads in all, shared by the NBD connections unless attach --threads says how
#: many each: with one GIL, more of them only wait for each other (docs/benchmarks.md).
NBDKIT_THREADS = 8
DEVICE_RE = re.compile(r"/dev/(nbd\d+)")
#: What an attachment's folder holds, all made by pmemblk.
FILES = ("attach.json", "nbdkit.pid", "nbdkit.log", "nbd.sock", "control.sock")


def run_dir() -> Path:
    return Path(os.environ.get("PMEMBLK_RUN_DIR") or DEFAULT_RUN_DIR)


@dataclass
class Attachment:
    name: str
    folder: Path
    target: str
    device: str | None
    connections: int
    readonly: bool
    keys: list[str]
    created: float = dataclasses.field(default_factory=time.time)
    threads: int = NBDKIT_THREADS

    @property
    def nbd_socket(self) -> Path:
        return self.folder / "nbd.sock"

    @property
    def control_socket(self) -> Path:
        return self.folder / "control.sock"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.nbd_socket}"

    def save(self) -> None:
        record = {k: v for k, v in dataclasses.asdict(self).items() if k != "folder"}
        files.write_atomic(str(self.folder / "attach.json"),
                           (json.dumps(record, indent=2) + "\n").encode(), 0o644,
                           "the attachment's record")

    def nbdkit_pid(self) -> int | None:
        """nbdkit's PID if it is running and is this attachment's (checked by its command
        line naming our socket), else None."""
        return our_nbdkit(self.folder)


#: attach.json's fields and their types (a record with others, or other types, is broken).
_RECORD: dict[str, tuple[type, ...]] = {
    "name": (str,), "target": (str,), "device": (str, type(None)), "connections": (int,),
    "readonly": (bool,), "keys": (list,), "created": (int, float), "threads": (int,)}


#: attach.json is a few hundred bytes: more is not a record of ours.
MAX_RECORD = 1 << 16


def read_record(folder: Path) -> dict[str, Any] | str:
    """``folder``'s attach.json, or what is wrong with it."""
    try:
        record = json.loads(files.read_regular(folder / "attach.json", MAX_RECORD))
    except FileNotFoundError:
        left = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        return "no record; it holds " + (", ".join(left) or "nothing")
    except (OSError, ValueError) as exc:
        return f"its record cannot be read: {exc}"
    why = _record_problem(record)
    return record if why is None else why


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "its record is not a JSON object"
    missing = sorted(set(_RECORD) - set(record) - {"created", "threads"})
    extra = sorted(set(record) - set(_RECORD))
    if missing or extra:
        return f"its record lacks {missing} or has unknown fields {extra}"
    for key, value in record.items():
        types = _RECORD[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"its record's {key} is {value!r}"
    if not all(isinstance(k, str) for k in record["keys"]):
        return "its record's keys are not all strings"
    return None


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def our_nbdkit(folder: Path) -> int | None:
    """The PID in ``folder``'s nbdkit.pid if that process names ``folder``'s socket."""
    pid = read_pid(folder / "nbdkit.pid")
    if pid is None:
        return None
    return pid if str(folder / "nbd.sock").encode() in _cmdline(pid) else None


@dataclass(frozen=True)
class Leftover:
    """A folder in the run directory that holds no readable attachment record."""

    name: str
    folder: Path
    why: str

    def devices(self) -> list[str]:
        """The NBD devices whose nbd-client names this folder's socket (provably ours)."""
        found = []
        sock = str(self.folder / "nbd.sock").encode()
        for sysfs in Path("/sys/block").glob("nbd*"):
            pid = read_pid(sysfs / "pid")
            if pid is not None and any(sock in arg for arg in _cmdline(pid)):
                found.append(f"/dev/{sysfs.name}")
        return sorted(found)


# -- finding attachments and devices ---------------------------------------------------------


def scan() -> tuple[list[Attachment], list[Leftover]]:
    """The run directory read once: its attachments, and the folders with no readable record
    (torn, wrongly typed, or left by a detach because they held files pmemblk did not make)."""
    found: list[Attachment] = []
    left: list[Leftover] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(run_dir().iterdir()):
            if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue
            record = read_record(entry)
            if isinstance(record, str):
                left.append(Leftover(entry.name, entry, record))
            else:
                found.append(Attachment(folder=entry, **record))
    return found, left


def attachments() -> list[Attachment]:
    return scan()[0]


def leftovers() -> list[Leftover]:
    return scan()[1]


def find(name_or_device: str) -> Attachment:
    """The attachment called NAME, or the one holding DEVICE (/dev/nbdN)."""
    atts, lefts = scan()
    for att in atts:
        if name_or_device in (att.name, att.device):
            return att
    for left in lefts:
        if left.name == name_or_device:
            raise ConfigError(f"attachment {left.name} is broken ({left.why}) in "
                              f"{left.folder}: pmemblk detach {left.name} cleans up what is "
                              "provably its own")
    known = ", ".join(f"{a.name} ({a.device or a.uri})" for a in atts) or "none"
    raise ConfigError(f"no attachment is called {name_or_device!r} or holds that device "
                      f"(attached: {known}; see pmemblk list)")


def sys_block(dev: str) -> Path:
    m = DEVICE_RE.fullmatch(dev)
    if not m:
        raise ConfigError(f"--device {dev}: expected an NBD device, e.g. /dev/nbd0")
    return Path("/sys/block") / m.group(1)


def device_busy(dev: str) -> str | None:
    """Why ``dev`` cannot be attached (connected, or claimed by an attachment), or None."""
    sysfs = sys_block(dev)
    if (sysfs / "pid").exists():
        return "it is connected (nbd-client -c says by whom)"
    with contextlib.suppress(OSError, ValueError):
        if int((sysfs / "size").read_text()) > 0:
            return "it is in use"
    for att in attachments():
        if att.device == dev:
            return f"attachment {att.name} holds it"
    return None


def free_device() -> str:
    candidates = sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:] or 0))
    for sysfs in candidates:
        dev = f"/dev/{sysfs.name}"
        if os.path.exists(dev) and device_busy(dev) is None:
            return dev
    raise ConfigError(f"all {len(candidates)} NBD devices are in use: detach one, or load "
                      "the module with more (modprobe nbd nbds_max=32)")


def holders(dev: str) -> list[str]:
    """What keeps ``dev`` busy: mount points of it or its partitions, md/dm holders."""
    sysfs = sys_block(dev)
    numbers = set()
    for node in [sysfs, *sysfs.glob(f"{sysfs.name}p*")]:
        with contextlib.suppress(OSError):
            numbers.add((node / "dev").read_text().strip())
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[2] in numbers:
                found.append(f"mounted on {fields[4]}")
    with contextlib.suppress(OSError):
        for node in [sysfs, *sysfs.glob(f"{sysfs.name}p*")]:
            found += [f"held by {h.name}" for h in (node / "holders").iterdir()]
    return found


def read_pid(path: Path) -> int | None:
    try:
        pid = int(files.read_regular(path, 32).strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None
