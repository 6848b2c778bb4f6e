"""Exclusive ownership of a region: one process at a time writes it.

``serve``, ``create`` and ``testing-power-cut`` take an exclusive ``flock`` on the region file or
devdax device before they read or write anything in it, and hold it until they are done
(``serve``: for its whole life). A second one is refused with the PID of the holder, read
from ``/proc/locks``. ``info`` only reads, takes no lock, and reports the holder.

The lock is advisory: it binds pmemblk, not other programs (``dd``, ``truncate``), and it is
taken on the path given, so another device node for the same devdax device, or a copy of the
file, is another lock (docs/security.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from .errors import ConfigError
from .resource import Closeable

PROC_LOCKS = "/proc/locks"


def holder_pid(fd: int) -> int | None:
    """The PID that holds a ``flock`` on the file open at ``fd``, if /proc/locks says."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(PROC_LOCKS) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (a blocked waiter has "->")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def path_holder(path: str) -> int | None:
    """The PID holding ``path``'s region lock, or None (also when it cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return holder_pid(fd)
    finally:
        os.close(fd)


class RegionLock(Closeable):
    """A lock on the region at ``path``, held until ``close()`` (safe twice): exclusive, or
    shared among read-only servers (``shared``), which still excludes every writer.

    ``fd`` is an open descriptor of the region (read-write unless ``shared``); callers may use
    it, and must not close it. Given an ``fd``, the lock takes it over.
    """

    def __init__(self, path: str, purpose: str, *, shared: bool = False, fd: int | None = None
                 ) -> None:
        self.path = path
        if fd is None:
            flags = (os.O_RDONLY if shared else os.O_RDWR) | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(path, flags)
            except OSError as exc:
                raise ConfigError(f"cannot open {path}: {exc.strerror}") from None
        self.fd = fd
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            pid = holder_pid(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"cannot lock {path}: {exc.strerror}") from None
            who = f"process {pid}" if pid is not None else "another process"
            raise ConfigError(
                f"{path} is in use by {who} (a pmemblk serve, create or testing-power-cut): "
                f"refusing to {purpose}. Stop that process first (pmemblk info {path} names "
                "it)") from None

    def close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        os.close(fd)  # releases the flock

