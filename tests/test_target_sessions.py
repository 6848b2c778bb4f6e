"""Channels coming and going (issue 23), at the target core: one client's channels opened
and closed in every order, read-write and read-only, while others of its channels are open.

The writer slot, the client's lanes (atomic blocks) and its client id belong to the client
until its *last* channel goes: an outsider is refused the slot while any read-write channel
of the client is open, the client's own next channel is always admitted and gets the lanes
its open channels have, and the status counts every channel. Lanes come back (recovered)
only when no writer is connected; a client that reconnects gets a valid grant that no other
writer holds, never a quarantined one, and never a grant number it saw before, even from an
earlier start of the target (the client keeps its lanes while the grant number is the same).
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import atomicblocks, layout
from pmemblk.address import parse_address
from pmemblk.pmem import PmemRegion
from pmemblk.protocol import CLIENT_NONCE_SIZE, MAC_SIZE, Auth, Hello, Reject, Welcome
from pmemblk.session import Admission, Greeting, ServeConfig
from pmemblk.target import Export


def make_region(tmp_path: Path, groups: int) -> str:
    path = str(tmp_path / f"atomic{groups}.img")
    with PmemRegion.create(path, 4 << 20) as r:
        layout.format_region(r, 4096, groups * atomicblocks.LANES_PER_WRITER)
    return path


@pytest.fixture
def atomic_path(tmp_path: Path) -> str:
    """Three lane groups: three writers at once."""
    return make_region(tmp_path, 3)


def serve(path: str, shared: bool = False) -> Export:
    ex = Export(ServeConfig(path=path, listen=parse_address("unix:/nonexistent/s", "--listen"),
                            transports=("tcp",), shared=shared))
    ex.begin()
    return ex


def connect(export: Export, client_id: bytes, readonly: bool = False) -> Admission | Reject:
    hello = Hello(readonly=readonly, nonce=os.urandom(CLIENT_NONCE_SIZE), client_id=client_id)
    greeting = export.greet(hello.encode())
    assert isinstance(greeting, Greeting)
    return export.admit(greeting, Auth(bytes(MAC_SIZE)).encode())


def channel(export: Export, client_id: bytes, readonly: bool = False) -> Admission:
    admission = connect(export, client_id, readonly)
    assert isinstance(admission, Admission), f"refused: {admission}"
    return admission


def lanes(export: Export, admission: Admission) -> tuple[int, int, int]:
    w: Welcome = export.welcome(admission)
    return w.lane_first, w.lane_count, w.lane_grant


def group(grant: tuple[int, int, int]) -> int:
    return grant[0] // atomicblocks.LANES_PER_WRITER


def interleavings(n: int) -> Iterator[tuple[tuple[str, int], ...]]:
    """Every order of opening and closing ``n`` channels (each opened before it is closed)."""
    events = [(kind, i) for i in range(n) for kind in ("open", "close")]
    seen = set()
    for order in itertools.permutations(events):
        if order in seen:
            continue
        seen.add(order)
        if all(order.index(("open", i)) < order.index(("close", i)) for i in range(n)):
            yield order


MODES = {"all read-write": (False, False, False), "one read-only": (False, True, False)}


@pytest.mark.parametrize("shared", [False, True], ids=["single-writer", "shared"])
@pytest.mark.parametrize("modes", list(MODES.values()), ids=list(MODES))
def test_channels_come_and_go_in_every_order(tmp_path: Path, shared: bool,
                                             modes: tuple[bool, ...]) -> None:
    # Eight lane groups: with --shared, each outsider's group waits for recovery while ours
    # writes (a step each, six at most).
    export = serve(make_region(tmp_path, 8), shared)
    try:
        orders = list(interleavings(len(modes)))
        assert len(orders) == 90
        for order in orders:
            run_order(export, order, modes, shared)
    finally:
        export.close()


def run_order(export: Export, order: tuple[tuple[str, int], ...], modes: tuple[bool, ...],
              shared: bool) -> None:
    me = os.urandom(16)
    open_: dict[int, Admission] = {}
    grant: tuple[int, int, int] | None = None  # the lanes while a writer channel is open
    grants_seen: set[int] = set()
    for step, (kind, i) in enumerate(order):
        where = f"{order[:step + 1]}"
        if kind == "open":
            open_[i] = channel(export, me, modes[i])  # the client's next channel: admitted
            if not modes[i]:
                mine = lanes(export, open_[i])
                if grant is None:
                    assert mine[1] > 0 and mine[2] not in grants_seen, where
                    grant = mine
                    grants_seen.add(mine[2])
                assert mine == grant, f"{where}: a channel got other lanes than its client"
        else:
            export.client_left(open_.pop(i))
        writers = [a for a in open_.values() if a.writer]
        if not writers:
            grant = None
        # Every open channel still holds the client's lanes; a reader none.
        for a in open_.values():
            assert lanes(export, a) == (grant if a.writer else (0, 0, 0)), where
        # The target counts one client with every open channel, or none.
        clients = export.status()["clients"]
        assert [(c["channels"], c["mode"]) for c in clients] == (
            [(len(open_), "read-write" if writers else "read-only")] if open_ else []), where
        assert export.writers == (1 if writers else 0), where
        # An outsider: refused the writer slot while one of ours writes (unless --shared);
        # given other lanes than ours when admitted.
        other = connect(export, os.urandom(16))
        if writers and not shared:
            assert isinstance(other, Reject) and other.errno == errno.EBUSY, where
            assert "another client has this export open read-write" in other.reason
        else:
            assert isinstance(other, Admission), f"{where}: {other}"
            theirs = lanes(export, other)
            assert theirs[1] > 0 and (grant is None or group(theirs) != group(grant)), where
            assert theirs[2] not in grants_seen, f"{where}: a grant number came back"
            export.client_left(other)
        # Held lane groups: ours while we write, none else (the outsider's were given back).
        assert export.status()["atomic_blocks"]["lane_groups_held"] == (1 if writers else 0)
    assert export.clients == 0 and export.writers == 0 and not export.sessions
    atomic = export.status()["atomic_blocks"]
    assert atomic["lane_groups_held"] == 0 and atomic["lane_groups_waiting_for_recovery"] == 0


def test_a_writer_that_left_beside_another_gets_other_lanes_and_its_own_come_back(
        atomic_path: str) -> None:
    """--shared: A and B write; all of A's channels go (a lost connection); its lanes wait
    for recovery, which needs no writer connected: A's reconnect gets a group no one holds and
    that is not quarantined, with a new grant number. Once everyone has left, every group is
    recovered and can be granted again."""
    export = serve(atomic_path, shared=True)
    try:
        a_id, b_id = os.urandom(16), os.urandom(16)
        a1, a2 = channel(export, a_id), channel(export, a_id)
        b = channel(export, b_id)
        first_a, first_b = lanes(export, a1), lanes(export, b)
        assert group(first_a) != group(first_b)
        export.client_left(a2)
        export.client_left(a1)
        status = export.status()["atomic_blocks"]
        assert status["lane_groups_waiting_for_recovery"] == 1
        again = channel(export, a_id)  # A reconnects while B still writes
        now = lanes(export, again)
        assert group(now) not in (group(first_a), group(first_b))
        assert now[2] not in (first_a[2], first_b[2])
        # Every group is held or quarantined now: a fourth writer is refused with the reason.
        refused = connect(export, os.urandom(16))
        assert isinstance(refused, Reject) and "wait for their writers' recovery" in \
            refused.reason
        export.client_left(again)
        export.client_left(b)
        status = export.status()["atomic_blocks"]
        assert status["lane_groups_waiting_for_recovery"] == 0
        held = [channel(export, os.urandom(16)) for _ in range(3)]  # all three again
        assert sorted(group(lanes(export, h)) for h in held) == [0, 1, 2]
        for h in held:
            export.client_left(h)
    finally:
        export.close()


def test_a_grant_number_is_new_across_starts_of_the_target(atomic_path: str) -> None:
    """A client keeps its lanes while its connections bring the same grant number
    (blockmap.BlockMap); a restarted target that counted grants from 1 again handed a
    reconnecting writer the number it had before, with another writer's lanes: it kept
    writing through the lanes the new first writer had been given."""
    seen: set[int] = set()
    for _ in range(3):
        export = serve(atomic_path, shared=True)
        try:
            for _ in range(3):
                w = channel(export, os.urandom(16))
                grant = lanes(export, w)[2]
                assert grant != 0 and grant not in seen
                seen.add(grant)
                export.client_left(w)
        finally:
            export.close()
