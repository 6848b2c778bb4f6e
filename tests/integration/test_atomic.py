"""Atomic blocks over TCP: several writers on one --shared region never corrupt the block
map, a region's lanes are shared out and given back, read-only clients cannot move blocks."""

from __future__ import annotations

import dataclasses
import errno
import json
import random
import struct
import threading
from pathlib import Path

import pytest

from pmemblk import atomicblocks as ab
from pmemblk import blockmap, layout
from pmemblk.address import parse_address
from pmemblk.client import Client
from pmemblk.errors import ConfigError, RemoteError
from pmemblk.pmem import PmemRegion
from pmemblk.session import ServeConfig
from pmemblk.target import Export
from pmemblk.transport.stream import StreamTransport

from ..blockmap import check_map
from ..procs import Target, pmemblk
from .conftest import read

BLOCK = 4096
STAMP = struct.Struct("<II")


def stamp(writer: int, n: int) -> bytes:
    return STAMP.pack(writer, n) * (BLOCK // STAMP.size)


@pytest.fixture
def atomic_region(tmp_path: Path) -> str:
    path = str(tmp_path / "atomic.img")
    pmemblk("create", path, "--size", "4M", "--atomic-blocks", "--lanes", "16")
    return path


def serve(region: str, tmp_path: Path, *extra: str) -> Target:
    return Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, *extra,
                  transport="tcp").start()


def client(target: Target, readonly: bool = False) -> Client:
    return Client(StreamTransport(target.listen, readonly=readonly), "gpspm",
                  reconnect=lambda: StreamTransport(target.listen, readonly=readonly),
                  reconnect_timeout=5)


def test_shared_writers_racing_on_the_same_blocks_keep_the_map_whole(
        atomic_region: str, tmp_path: Path) -> None:
    """Two writers, two threads each, write the same 8 blocks (whole and in part): every
    block ends as one write's data, and no block is lost or mapped twice."""
    target = serve(atomic_region, tmp_path, "--shared")
    clients = [client(target), client(target)]
    errors: list[BaseException] = []

    def hammer(c: Client, writer: int) -> None:
        rng = random.Random(writer)
        try:
            for n in range(1, 120):
                lba = rng.randrange(8)
                if rng.random() < 0.7:
                    c.pwrite(memoryview(stamp(writer, n)), lba * BLOCK)
                else:  # half a block: merged into whatever is there
                    half = rng.choice((0, BLOCK // 2))
                    c.pwrite(memoryview(stamp(writer, n)[:BLOCK // 2]), lba * BLOCK + half)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(clients[i % 2], i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for lba in range(8):
        data = read(clients[0], lba * BLOCK, BLOCK)
        for half in (data[:BLOCK // 2], data[BLOCK // 2:]):  # each half one write's data
            assert len({half[i:i + 8] for i in range(0, len(half), 8)}) == 1
    for c in clients:
        c.close()
    target.stop()
    check_map(atomic_region)


def test_lanes_run_out_for_writers_and_come_back(atomic_region: str, tmp_path: Path) -> None:
    """16 lanes: two writers. A third is refused with the reason; once one leaves (and the
    region is recovered when no writer is left) it gets lanes, and a reader never needs any."""
    control = tmp_path / "control.sock"
    target = serve(atomic_region, tmp_path, "--shared", "--control", str(control))
    first, second = client(target), client(target)
    second.pwrite(memoryview(stamp(2, 1)), 0)
    with pytest.raises(RemoteError, match="lane groups of this atomic-blocks region") as exc:
        StreamTransport(target.listen)
    assert exc.value.errno == errno.EBUSY
    st = json.loads(pmemblk("status", "--target", str(control), "--json").stdout)
    assert st["atomic_blocks"]["lane_groups_held"] == st["atomic_blocks"]["lane_groups"] == 2
    assert "2 of 2 writer lane groups held" in pmemblk("status", "--target",
                                                        str(control)).stdout
    with client(target, readonly=True) as reader:
        assert read(reader, 0, BLOCK) == stamp(2, 1)
    second.close()
    first.close()
    target.wait_log("client 2 (unix socket) disconnected")
    with client(target) as third:
        third.pwrite(memoryview(stamp(3, 1)), BLOCK)
        assert read(third, 0, 2 * BLOCK) == stamp(2, 1) + stamp(3, 1)
    target.stop()
    check_map(atomic_region)


def test_a_read_only_client_cannot_move_a_block(atomic_region: str, tmp_path: Path) -> None:
    target = serve(atomic_region, tmp_path)
    with StreamTransport(target.listen, readonly=True) as t:
        assert t.info.atomic_blocks and t.info.lane_count == 0
        info = blockmap.BlockMap.load(t).info
        with pytest.raises(RemoteError) as exc:
            t.compare_swap(info.map_at(0), 0, 5)
        assert exc.value.errno == errno.EPERM
    target.stop()
    check_map(atomic_region)


def test_serving_both_transports_to_shared_writers_is_refused(atomic_region: str) -> None:
    config = ServeConfig(path=atomic_region, listen=parse_address("192.0.2.1:7000", "--listen"),
                         transports=("verbs", "tcp"), shared=True)
    with pytest.raises(ConfigError, match="an RDMA one is not atomic with the target's own"):
        Export(config)
    export = Export(dataclasses.replace(config, transports=("tcp",)))
    try:
        assert export.atomic is not None
    finally:
        export.close()


def test_a_corrupt_flog_stops_serve_with_the_way_out(atomic_region: str,
                                                      tmp_path: Path) -> None:
    """Both log slots of a lane corrupt: serve refuses in one line naming the lane and
    saying how to get the data out, and --readonly serves it (no recovery needed to read)."""
    target = serve(atomic_region, tmp_path)
    with client(target) as c:
        c.pwrite(memoryview(stamp(1, 1)), 0)
    target.stop()
    with PmemRegion.open(atomic_region) as r:
        header = layout.read_header(r)
        area = layout.data_area(r, header.data_offset, header.data_size)
        info = ab.read_info(area)
        for slot in (0, 1):
            at = info.slot_at(3, slot)
            area.write(at, bytes(x ^ 0xFF for x in area.read(at, 8)))
    res = pmemblk("serve", atomic_region, "--listen", f"unix:{tmp_path / 'u.sock'}",
                  "--transport", "tcp", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "lane 3: both flog slots are corrupt" in res.stderr
    assert "serve it --readonly to copy it out" in res.stderr
    reader = Target(atomic_region, f"unix:{tmp_path / 'r.sock'}", tmp_path, "--readonly",
                    transport="tcp").start()
    with client(reader, readonly=True) as c:
        assert read(c, 0, BLOCK) == stamp(1, 1)
    reader.stop()


@pytest.mark.parametrize("sector", [512, 4096])
def test_random_writes_of_any_size_and_alignment_match_a_model(sector: int,
                                                               tmp_path: Path) -> None:
    """Through the map, with parts of sectors merged: what is read back is what a flat model
    holds, for both sector sizes, and the map stays whole."""
    path = str(tmp_path / f"a{sector}.img")
    pmemblk("create", path, "--size", "2M", "--atomic-blocks", "--block-size", str(sector))
    target = serve(path, tmp_path)
    rng = random.Random(sector)
    with client(target) as c:
        assert c.block_size == sector
        model = bytearray(c.size)
        for _ in range(200):
            n = rng.randint(1, 5 * sector)
            off = rng.randrange(0, c.size - n)
            data = bytes(n) if rng.random() < 0.2 else rng.randbytes(n)
            if any(data):
                c.pwrite(memoryview(data), off, fua=rng.random() < 0.2)
            else:
                c.zero(off, n)
            model[off:off + n] = data
        assert read(c, 0, c.size) == model
    target.stop()
    assert check_map(path) > 0
