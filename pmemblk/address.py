"""Addresses, parsed once into a type: ``HOST:PORT``, ``[IPV6]:PORT`` or ``unix:PATH``.

The CLI's ``--listen`` and the plugin's ``target=`` are parsed here, at the boundary, and every
other module asks the value (``isinstance(addr, UnixAddress)``, ``addr.socket_address()``,
``addr.rdma_ip()``) instead of looking at the string again. Shared by the client and the target.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from .errors import ConfigError

#: sun_path holds 108 bytes, the last one a NUL.
UNIX_PATH_MAX = 107
LOOPBACK_HINT = (
    "RDMA CM does not work on the loopback interface: give the RDMA device (e.g. rxe) a real "
    "or dummy interface and use its address (see docs/pmemblk.md, 'Soft-RoCE')"
)


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"

    @property
    def is_local(self) -> bool:
        return True

    def socket_address(self) -> tuple[int, str]:
        return socket.AF_UNIX, self.path


@dataclass(frozen=True)
class TCPAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_local(self) -> bool:
        """Whether the host resolves only to loopback addresses (reachable from this host)."""
        try:
            infos = socket.getaddrinfo(self.host, None, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return False  # whoever uses it reports the resolution error
        return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)

    def socket_address(self) -> tuple[int, tuple[str, int]]:
        try:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise ConfigError(f"cannot resolve {self.host!r}: {exc.strerror}") from None
        return info[0], (str(info[4][0]), self.port)

    def rdma_ip(self, what: str) -> str:
        """The one IP address RDMA CM uses for this host; loopback and wildcards refused."""
        return resolve_ip(self.host, what)


Address = UnixAddress | TCPAddress


def parse_address(text: str, what: str) -> Address:
    """``unix:PATH``, ``HOST:PORT`` or ``[IPV6]:PORT``; ``what`` names the option in errors."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ConfigError(f"{what}: unix: needs a socket path, e.g. unix:/run/pmemblk.sock")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ConfigError(f"{what} unix:{path}: the path is {len(os.fsencode(path))} bytes "
                              f"long; a Unix socket path has at most {UNIX_PATH_MAX}: choose a "
                              "shorter one")
        return UnixAddress(path)
    host, sep, port_s = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT (e.g. 192.0.2.1:7000) or "
                          "unix:PATH")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: port {port_s!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what} {text!r}: port {port} is outside 1..65535")
    return TCPAddress(host, port)


def resolve_ip(host: str, what: str) -> str:
    """Resolve ``host`` to one IP address and refuse addresses RDMA CM cannot use."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"{what}: cannot resolve {host!r}: {exc.strerror}") from None
    ip = ipaddress.ip_address(infos[0][4][0])
    if ip.is_loopback:
        raise ConfigError(f"{what}: {ip} is a loopback address. {LOOPBACK_HINT}")
    if ip.is_unspecified:
        raise ConfigError(
            f"{what}: {ip} is a wildcard address; give the address of the interface the RDMA "
            "device is bound to"
        )
    return str(ip)
