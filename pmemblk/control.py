"""The control socket: ``pmemblk status`` asks a running target or plugin what it is doing.

A Unix stream socket, mode 600 (only its owner, normally root, may ask: the same privilege the
region or the device needs). The asker sends one line naming a request and reads the answer
until the server closes; requests are ``status`` (JSON), ``metrics`` (the Prometheus text
format) and, for a target, ``reload`` (re-read its clients file: a line starting ``ok:`` or
``error:``). Served by one thread that answers one asker at a time with deadlines on both sides, so
a silent asker delays the next one by at most ``REQUEST_TIMEOUT`` (less than an asker waits,
``TIMEOUT``), and none of them touches the data path. Each deadline is for the whole request or
answer, not for each receive: an asker (or a server) that sends a byte at a time gets no more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import ServiceError
from .resource import Closeable
from .unixsock import listen_unix, unlink_if_ours

log = logging.getLogger(__name__)

TIMEOUT = 5.0
#: How long the server waits for an asker's request line (then serves the next asker).
REQUEST_TIMEOUT = 1.0
MAX_REQUEST = 64
MAX_ANSWER = 16 << 20
REQUESTS = ("status", "metrics", "reload")


class ControlServer(Closeable):
    """Answers ``status`` and ``metrics`` on a Unix socket from its own thread. A context
    manager; ``close()`` is safe twice and removes the socket if it is still ours."""

    def __init__(self, path: str, status: Callable[[], dict[str, Any]],
                 metrics: Callable[[], bytes], what: str = "",
                 reload: Callable[[], bytes] | None = None) -> None:
        self.path = path
        self._answers: dict[str, Callable[[], bytes]] = {
            "status": lambda: json.dumps(status(), indent=2).encode() + b"\n",
            "metrics": metrics,
        }
        if reload is not None:
            self._answers["reload"] = reload
        self.sock, self._ident = listen_unix(path, what or f"control socket {path}")
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="pmemblk-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    self._answer(conn)
                except OSError as exc:
                    log.debug("control: an asker went away: %s", exc)
                except Exception:  # a bug: keep serving, never take the data path down
                    log.exception("control: internal error")

    def _answer(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + REQUEST_TIMEOUT
        request = b""
        while b"\n" not in request and len(request) <= MAX_REQUEST:
            conn.settimeout(_left(deadline))
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            request += chunk
        conn.settimeout(TIMEOUT)
        name = request.split(b"\n", 1)[0].strip().decode("ascii", "replace")
        answer = self._answers.get(name)
        if answer is None:
            conn.sendall(f"error: unknown request {name[:MAX_REQUEST]!r}: ask "
                         f"{' or '.join(self._answers)}\n".encode())
            return
        conn.sendall(answer())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        unlink_if_ours(self.path, self._ident)



def _left(deadline: float) -> float:
    """Seconds to ``deadline``; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def ask(path: str, request: str, timeout: float = TIMEOUT) -> bytes:
    """Send ``request`` to the control socket at ``path``; the answer within ``timeout``
    seconds in all (ServiceError if no one answers, never a RemoteError: an unknown request
    comes back as text)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(request.encode() + b"\n")
            parts, size = [], 0
            while True:
                sock.settimeout(_left(deadline))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise ServiceError(f"{path}: the answer is over {MAX_ANSWER} bytes")
        except (FileNotFoundError, ConnectionRefusedError):
            raise ServiceError(f"nothing answers on {path} (not running?)") from None
        except TimeoutError:
            raise ServiceError(f"{path} did not answer within {timeout:g}s") from None
        except OSError as exc:
            raise ServiceError(f"{path}: {exc.strerror or exc}") from None
    return b"".join(parts)


def ask_metrics(path: str) -> bytes:
    """The Prometheus text ``path`` answers to ``metrics``; ServiceError if the answer is
    not that format (a socket that is not ours must not reach stdout or a --textfile)."""
    from prometheus_client.parser import text_string_to_metric_families

    raw = ask(path, "metrics")
    try:
        families = text_string_to_metric_families(raw.decode())  # type: ignore[no-untyped-call]
        names = [family.name for family in families]
    except ValueError:
        names = []
    if not any(name.startswith("pmemblk_") for name in names):
        raise ServiceError(f"{path} answered something that is not pmemblk metrics: "
                             f"{raw[:80]!r}")
    return raw


def ask_status(path: str) -> dict[str, Any]:
    raw = ask(path, "status")
    try:
        value = json.loads(raw)
    except ValueError:
        raise ServiceError(f"{path} answered something that is not pmemblk status: "
                             f"{raw[:80]!r}") from None
    if not isinstance(value, dict):
        raise ServiceError(f"{path} answered something that is not pmemblk status")
    return value
