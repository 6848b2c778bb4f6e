"""Unix sockets we listen on: made mode 600, never over anything but a stale socket, and
removed on exit only while still ours. Shared by the target's stream server and the control
sockets."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat

from .errors import ConfigError

log = logging.getLogger(__name__)


def remove_stale_socket(path: str, what: str) -> None:
    """Make room for a Unix socket at ``path``: only a socket nobody listens on (left by a
    killed process) is removed; anything else there is refused. ``what`` names it in errors
    (e.g. ``--listen unix:PATH``)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what}: {path} exists and is not a socket; pmemblk "
                          "removes nothing but a stale socket. Choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: nothing listens on it
    except OSError as exc:
        raise ConfigError(f"{what}: cannot tell whether the socket there is in "
                          f"use ({exc.strerror or exc}); remove it if it is stale") from None
    else:
        raise ConfigError(f"{what}: another process is listening on it; stop it or "
                          "choose another path")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.info("removed the stale socket %s (nothing was listening on it)", path)


def listen_unix(path: str, what: str, backlog: int = 8) -> tuple[socket.socket, tuple[int, int]]:
    """A listening Unix socket at ``path``, mode 600, and its (st_dev, st_ino) for removal."""
    remove_stale_socket(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 600: no window where others may connect
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{what}: cannot listen there: {exc.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(backlog)
    st = os.stat(path)
    return sock, (st.st_dev, st.st_ino)


def unlink_if_ours(path: str, ident: tuple[int, int]) -> None:
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
