"""The closed error hierarchy of pmemblk.

Every error a user can meet is one of these classes. Messages say what was wrong and, where
there is one, what to do about it. The class tells the caller what to do next:

- ``ConfigError``: bad user input (command line, plugin keys, a file named there). The user
  fixes it; nothing to retry.
- ``PmemError``: the region could not be mapped or persisted.
- ``LayoutError``: the region's header is missing, corrupt or incompatible.
- ``ProtocolError``: a peer sent something that is not valid protocol. Drop that peer.
- ``TransportError``: the connection (RDMA or stream) failed and is unusable: reconnect, or
  fail the request. ``ConnectionLost`` is the peer gone.
- ``RequestError``: one block request is invalid; the connection is fine.
- ``RemoteError``: the target refused a connection or failed a request, and said why; the
  connection is fine (a refused one was never made).
- ``GaveUp``: the client stopped trying (its target did not come back, came back as something
  else, or may have lost acknowledged writes): every request fails until it is made again.
- ``ServiceError``: a process or local service pmemblk starts or asks (nbdkit, nbd-client, a
  control socket) did not start, failed or did not answer: its log or state says why.
"""

from __future__ import annotations

import errno as _errno


class PmemblkError(Exception):
    """Base class: every error pmemblk raises on purpose."""

    #: errno reported to an NBD client when this error ends a request.
    errno: int = _errno.EIO


class ConfigError(PmemblkError):
    errno = _errno.EINVAL


class PmemError(PmemblkError):
    def __init__(self, message: str, errno_value: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno_value


class LayoutError(PmemblkError):
    pass


class ProtocolError(PmemblkError):
    pass


class TransportError(PmemblkError):
    pass


class ConnectionLost(TransportError):
    """The peer went away (disconnect event, QP in error, deadline passed)."""


class RequestError(PmemblkError):
    """A block request is invalid (out of range, write to a read-only export)."""

    def __init__(self, message: str, errno_value: int = _errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno_value


class RemoteError(PmemblkError):
    """The target refused or failed a request and said why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.errno = status if status > 0 else _errno.EIO


class GaveUp(PmemblkError):
    """The client has stopped trying its target; the message says why. Requests fail at once
    (EIO) from now on: detach and attach again (or restart the plugin) once the cause is known."""


class ServiceError(PmemblkError):
    """A process or local service pmemblk runs or asks did not start, failed, or did not
    answer (nbdkit, nbd-client, a target's or plugin's control socket)."""
