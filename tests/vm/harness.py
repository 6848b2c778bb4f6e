"""The VM suite's target address and helpers: targets with a secret, verbs connections, raw CM."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pmemblk import rdma
from pmemblk.auth import create_secret, load_secret
from pmemblk.endpoint import Endpoint
from pmemblk.transport.verbs import VerbsTransport

from ..procs import Target

ADDR = os.environ.get("PMEMBLK_VM_ADDR", "192.0.2.1")


def secret_file(workdir: Path) -> Path:
    """A shared secret in ``workdir`` (made once): the VM's address is not loopback."""
    path = workdir / "secret"
    if not path.exists():
        create_secret(str(path))
    return path


def vm_target(region: str, port: int, workdir: Path, *extra: str) -> Target:
    """A verbs target on the VM's Soft-RoCE address, with authentication."""
    return Target(region, f"{ADDR}:{port}", workdir, *extra, secret=secret_file(workdir))


def verbs(t: Target, **kw: object) -> VerbsTransport:
    """A verbs connection to ``t`` that authenticates with its secret."""
    secret = load_secret(str(t.secret)) if t.secret else None
    return VerbsTransport(ADDR, t.port, secret=secret, **kw)  # type: ignore[arg-type]


def raw_connect(port: int, private: bytes, silent_for: float = 0.0) -> tuple[int, bytes]:
    """Connect with arbitrary private data; return the CM event type and its private data.

    With ``silent_for``, an accepted connection is established and then kept, saying nothing,
    until the target disconnects it (at most ``silent_for`` seconds).
    """
    with rdma.EventChannel() as events:
        cmid = rdma.new_cmid(events)
        try:
            cmid.resolve_addr(rdma.AddrInfo(dst=ADDR, dst_service=str(port),
                                            port_space=rdma.ce.RDMA_PS_TCP), 5000)
            deadline = time.monotonic() + 20
            events.wait_for(rdma.ce.RDMA_CM_EVENT_ADDR_RESOLVED, deadline, "address")
            cmid.resolve_route(5000)
            events.wait_for(rdma.ce.RDMA_CM_EVENT_ROUTE_RESOLVED, deadline, "route")
            with rdma.Device(cmid.dev_name) as dev, Endpoint(dev.ctx, dev.pd, 2, 2) as ep:
                param = rdma.ConnParam(qp_num=ep.qp_num, data_len=len(private))
                param.set_private_data(private)
                cmid.connect(param)
                answer = events.wait_for(rdma.ce.RDMA_CM_EVENT_CONNECT_RESPONSE, deadline,
                                         "answer")
                if silent_for and answer[0] == rdma.ce.RDMA_CM_EVENT_CONNECT_RESPONSE:
                    ep.connect_qp(cmid)
                    cmid.establish()
                    until = time.monotonic() + silent_for
                    while events.wait_for(rdma.ce.RDMA_CM_EVENT_DISCONNECTED, until,
                                          "the target to disconnect")[0] != \
                            rdma.ce.RDMA_CM_EVENT_DISCONNECTED:
                        pass  # ConnectionLost once ``until`` has passed
                return answer
        finally:
            cmid.close()
