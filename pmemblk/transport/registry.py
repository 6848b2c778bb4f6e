"""The client transports by ``transport=`` name: a new transport is a module in this package
and a line here. Apart from ``transport/__init__.py`` (what every transport shares), so that
the transports import their base and nothing imports back up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import ConnectOptions, Transport


@dataclass(frozen=True)
class Kind:
    """A transport as ``transport=`` names it."""

    #: How logs and ``describe`` call it.
    label: str
    connect: Callable[[ConnectOptions], Transport]


def _verbs(options: ConnectOptions) -> Transport:
    from .verbs import connect  # pyverbs' wrappers: only when asked for

    return connect(options)


def _stream(options: ConnectOptions) -> Transport:
    from .stream import connect

    return connect(options)


REGISTRY: dict[str, Kind] = {"verbs": Kind("RDMA", _verbs), "tcp": Kind("TCP", _stream)}
