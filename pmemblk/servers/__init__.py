"""The target's side of each transport: ``stream`` (TCP and Unix sockets) and ``verbs`` (RDMA
CM and RC queue pairs). Both are driven by the target's reactor and share ``target.Export``;
the client's side is ``pmemblk.transport``. What both sides use lives below both
(``pmemblk.protocol``, ``pmemblk.rdma``, ``pmemblk.address``, ``pmemblk.unixsock``).

``REGISTRY`` maps each ``serve --transport`` name to the factory of its server: a new transport
is a module here and a line there."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..address import Address
    from ..reactor import Reactor
    from ..target import Export


class Server(Protocol):
    """A transport's listening side, driven by the target's reactor."""

    def start(self, export: Export) -> None:
        """Listen; addresses were validated when the server was made."""

    def close(self) -> None:
        """Disconnect every client and stop listening; safe twice."""


#: Makes a server: (the reactor, the address to listen on, the handshake timeout in seconds).
ServerFactory = Callable[["Reactor", "Address", float], Server]


def _verbs(reactor: Reactor, listen: Address, handshake_timeout: float) -> Server:
    from .verbs import VerbsServer  # imports pyverbs' wrappers: only when asked for

    return VerbsServer(reactor, listen, handshake_timeout)


def _stream(reactor: Reactor, listen: Address, handshake_timeout: float) -> Server:
    from .stream import StreamServer

    return StreamServer(reactor, listen, handshake_timeout)


REGISTRY: dict[str, ServerFactory] = {"verbs": _verbs, "tcp": _stream}


def parse_names(value: str) -> tuple[str, ...]:
    """``serve --transport``: names from ``REGISTRY``, comma-separated, each once."""
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [n for n in names if n not in REGISTRY]
    if bad or not names:
        raise ConfigError(f"--transport {value!r}: use {', '.join(REGISTRY)}, or "
                          f"{','.join(REGISTRY)}")
    return names
