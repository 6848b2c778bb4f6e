"""Atomic blocks through a real target and a power cut: the target's recovery, run when a
writer that died mid-move leaves, judged by what survives the cut (the durable image)."""

from __future__ import annotations

import struct
from pathlib import Path

from pmemblk.blockmap import BlockMap
from pmemblk.client import Client
from pmemblk.errors import ConnectionLost
from pmemblk.powercut import power_cut
from pmemblk.transport import Transport
from pmemblk.transport.stream import StreamTransport

from ..blockmap import check_map
from ..procs import Target, pmemblk
from .conftest import read

BLOCK = 4096
STAMP = struct.Struct("<II")


def stamp(writer: int, lba: int) -> bytes:
    return STAMP.pack(writer, lba) * (BLOCK // STAMP.size)


def test_a_writer_gone_after_its_map_moves_is_recovered_so_a_power_cut_keeps_them(
        tmp_path: Path) -> None:
    """Writer 1 moves blocks 0..7 and its connection dies before it persists the map moves.
    The target recovers its lanes (the moves happened: the old blocks are free), writer 2's
    write reuses those blocks, then the power fails. Blocks 0..7 must come back as writer 1's
    data (or the old zeros), never writer 2's, and the map whole."""
    region, image = str(tmp_path / "atomic.img"), str(tmp_path / "durable.img")
    pmemblk("create", region, "--size", "4M", "--atomic-blocks", "--lanes", "8")
    target = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path,
                    "--testing-durable-image", image, transport="tcp").start()
    t1 = StreamTransport(target.listen)
    bm = BlockMap.load(t1)

    def dies(t: Transport, ranges: list[tuple[int, int]]) -> None:
        t.close()  # right after the map moved, before it was made persistent
        raise ConnectionLost("the writer died before persisting its map moves")

    first = b"".join(stamp(1, lba) for lba in range(8))
    try:
        bm.write(t1, memoryview(first), 0, len(first), dies, t1.commit_step)
    except ConnectionLost:
        pass
    else:
        raise AssertionError("the write did not reach its map persist")
    target.wait_log("8 lanes settled after their last move")
    c2 = Client(StreamTransport(target.listen), "gpspm")
    second = b"".join(stamp(2, lba) for lba in range(20, 28))
    c2.pwrite(memoryview(second), 20 * BLOCK)  # 8 lanes: every block writer 1 freed
    assert read(c2, 0, 8 * BLOCK) == first
    target.kill()  # the power fails
    c2.close()
    power_cut(region, image, keep=0.0)
    target = target.restart()
    c3 = Client(StreamTransport(target.listen), "gpspm")
    after = read(c3, 0, 28 * BLOCK)
    c3.close()
    target.stop()
    for lba in range(8):
        assert after[lba * BLOCK:(lba + 1) * BLOCK] in (stamp(1, lba), bytes(BLOCK)), \
            f"block {lba} came back with another write's data"
    assert after[20 * BLOCK:] == second
    check_map(region)
