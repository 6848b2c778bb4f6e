"""What the kernel decided about an NBD device: its block queue's settings in sysfs.

nbd-client hands the kernel the export's flags; the kernel then sets the queue's write cache
(``/sys/block/nbdN/queue/write_cache``: "write back" means it sends FLUSH for ``fsync``) and
FUA (``.../queue/fua``: 1 means it sends FUA writes). If the export offers FLUSH but the queue
says "write through", ``fsync`` on the device returns without sending anything: acknowledged
data is not persistent, and nothing says so. ``pmemblk attach`` reads these right after the
device is connected and refuses such a device (:func:`check`); ``pmemblk status`` shows them.

The sysfs root is a parameter so that the reading can be tested against built trees.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ServiceError


@dataclass(frozen=True)
class KernelQueue:
    """The kernel's view of one NBD device."""

    device: str
    #: "write back" (the kernel sends FLUSH) or "write through" (it never does).
    write_cache: str
    #: The kernel sends FUA writes.
    fua: bool
    max_sectors_kb: int | None
    logical_block_size: int | None
    #: The request timeout the kernel applies, in seconds (queue/io_timeout is in ms).
    timeout_s: float | None
    #: The device's NBD connections: its hardware queues (``mq/N``), one per connection.
    connections: int | None

    @property
    def sends_flush(self) -> bool:
        return self.write_cache == "write back"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        def num(v: object, unit: str = "") -> str:
            return "?" if v is None else f"{v:g}{unit}" if isinstance(v, float) else f"{v}{unit}"
        return (f"write cache {self.write_cache}, FUA {'on' if self.fua else 'off'}, "
                f"max {num(self.max_sectors_kb, ' KiB')} per request, block "
                f"{num(self.logical_block_size)}, timeout {num(self.timeout_s, ' s')}, "
                f"{num(self.connections)} connection(s)")


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read(256).strip()


def _int(path: str) -> int | None:
    try:
        return int(_read(path))
    except (OSError, ValueError):
        return None


def read_queue(device: str, sys_root: str = "/sys") -> KernelQueue:
    """The queue settings of ``device`` (``/dev/nbdN`` or ``nbdN``); ServiceError, one line, if
    sysfs has no such device or no write_cache for it."""
    name = os.path.basename(device)
    if not name or name in (".", "..") or "/" in name:
        raise ServiceError(f"{device!r} is not a block device name")
    block = os.path.join(sys_root, "block", name)
    queue = os.path.join(block, "queue")
    try:
        write_cache = _read(os.path.join(queue, "write_cache"))
    except OSError as exc:
        raise ServiceError(f"cannot read the kernel's settings of {device} "
                           f"({queue}/write_cache: {exc.strerror})") from None
    if write_cache not in ("write back", "write through"):
        raise ServiceError(f"{queue}/write_cache says {write_cache[:40]!r}: neither "
                           "'write back' nor 'write through'")
    timeout_ms = _int(os.path.join(queue, "io_timeout"))
    try:
        mq = os.listdir(os.path.join(block, "mq"))
        connections: int | None = sum(1 for q in mq if q.isdigit())
    except OSError:
        connections = None
    return KernelQueue(
        device=device, write_cache=write_cache, fua=_int(os.path.join(queue, "fua")) == 1,
        max_sectors_kb=_int(os.path.join(queue, "max_sectors_kb")),
        logical_block_size=_int(os.path.join(queue, "logical_block_size")),
        timeout_s=None if timeout_ms is None else timeout_ms / 1000, connections=connections)


def check(q: KernelQueue, offers_flush: bool, offers_fua: bool) -> None:
    """Refuse a device whose kernel will not send the FLUSH or FUA the export offers: one
    ServiceError line naming the setting and the fix."""
    if offers_flush and not q.sends_flush:
        raise ServiceError(
            f"the kernel will not send FLUSH to {q.device} (queue/write_cache is "
            f"'{q.write_cache}'): fsync would not make data persistent. Use an nbd-client that "
            "passes the export's flags to the kernel (Debian's nbd-client 3.24 does), and make "
            f"sure nothing (a udev rule) writes 'write through' to /sys/block/"
            f"{os.path.basename(q.device)}/queue/write_cache")
    if offers_fua and not q.fua:
        raise ServiceError(
            f"the kernel will not send FUA to {q.device} (queue/fua is 0) though the export "
            "offers it. Use an nbd-client that passes the export's flags to the kernel "
            "(Debian's nbd-client 3.24 does)")
