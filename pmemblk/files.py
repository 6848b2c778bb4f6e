"""Files pmemblk writes, written one way: replaced whole (a reader sees the old file or the
new one, never half of one), through a temporary name nobody can plant a link at, in folders
nobody else can write.

``write_atomic`` (or ``stage`` now and ``publish`` later) makes its temporary file with
``mkstemp`` beside the destination (O_EXCL: it never opens what is already there, a symlink
included), ``fchmod``s and ``fsync``s the descriptor and renames it over the destination. On
any failure (a full disk, a read-only place) the temporary file is removed and one
``ConfigError`` says what could not be written and why. ``check_folder`` refuses a folder that
another user could write: root writing there would otherwise follow what that user planted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile

from .errors import ConfigError


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The first ``limit`` bytes of the regular file at ``path``: OSError if it is anything
    else, found without waiting (a FIFO planted where a record or pid file is expected
    would otherwise block its reader for ever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return os.read(fd, limit)
    finally:
        os.close(fd)


def check_folder(folder: str, what: str) -> None:
    """Refuse ``folder`` unless it is a directory that only we (or root) can write."""
    try:
        st = os.lstat(folder)
    except OSError as exc:
        raise ConfigError(f"{what} {folder}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {folder} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{what} {folder} belongs to user {st.st_uid}, who could replace "
                          "what pmemblk writes there: use a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{what} {folder} can be written by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):o}): chmod go-w {folder}, or use "
                          "another folder")


def check_replaceable(path: str, what: str) -> None:
    """Refuse ``path`` if something other than a regular file is there (a symlink, FIFO,
    socket, device or directory): a file pmemblk replaces and later removes, such as a pid
    file, must never take the place of what someone else put there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a directory"
                if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise ConfigError(f"{what} {path} is {kind}: pmemblk replaces only a regular file "
                          "there. Choose another path")


def write_atomic(path: str, data: bytes, mode: int, what: str = "") -> None:
    """Replace ``path`` by ``data`` with permissions ``mode``; ConfigError on failure, with
    nothing left behind and ``path`` as it was."""
    publish(stage(path, data, mode, what), path, what)


def stage(path: str, data: bytes, mode: int, what: str = "") -> str:
    """The first half of ``write_atomic``: ``data`` written whole to a new temporary file
    beside ``path`` (returned), for ``publish`` to rename over it later — as a pid file is,
    once the service it names is ready. ConfigError, with nothing left behind, on failure."""
    label = f"{what} {path}" if what else path
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=folder)
    except OSError as exc:
        raise ConfigError(f"cannot write {label}: {exc.strerror} (in {folder})") from None
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"cannot write {label}: {exc.strerror}") from None
    return tmp


def publish(tmp: str, path: str, what: str = "") -> None:
    """The second half: ``tmp`` (from ``stage``) renamed over ``path``; on failure it is
    removed and ``path`` is as it was (ConfigError)."""
    try:
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        label = f"{what} {path}" if what else path
        raise ConfigError(f"cannot write {label}: {exc.strerror}") from None


def create_exclusive(path: str, data: bytes, mode: int, what: str) -> None:
    """Create ``path`` holding ``data`` only if nothing is there (not even a dangling link);
    whole or not at all: a failed write removes what it created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists: not overwriting a {what}") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ConfigError(f"cannot write {what} {path}: {exc.strerror} (nothing was left "
                          "there)") from None


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data``, then fsync: a file is whole on the disk before it is used."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
