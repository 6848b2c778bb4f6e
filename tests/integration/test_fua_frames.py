"""FUA writes longer than one stream frame, through the emulated power cut (issue 23).

The stream transport splits a request into frames of ``chunk`` bytes (a ZERO into frames of at
most ``MAX_IO``) with up to ``depth`` in flight, and sends a FUA write's COMMIT behind its last
frame. If the COMMIT covered only the first frame, or went out before the last frames, a FUA
write would be acknowledged with most of it volatile: only a power cut can tell. Each write
here is acknowledged with FUA and never flushed; after the cut (nothing unpersisted kept) every
byte of it must be back.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from pmemblk.protocol import MAX_IO

from ..procs import Nbdkit
from .conftest import needs_nbdkit, plugin_client
from .test_faults import power_cut, read_fresh, start


@pytest.mark.parametrize(("chunk", "lengths"), [
    (1 << 20, [(3 << 20) + 4097, 1000]),  # four frames, under the depth; and a one-frame write
    (4096, [200_000, 8192 + 1]),  # 49 frames, more than the 8 in flight; and three frames
])
def test_every_byte_of_a_multi_frame_fua_write_survives_a_power_cut(
        region: str, tmp_path: Path, chunk: int, lengths: list[int]) -> None:
    rng = random.Random(chunk)
    t = start(region, tmp_path)
    writes: list[tuple[int, bytes]] = []
    at = 12345  # unaligned, so every frame but the first starts mid-page
    for n in lengths:
        writes.append((at, rng.randbytes(n)))
        at += n + 3 * 4096 + 17
    c = plugin_client(t, "gpspm", 60, 10, f"chunk={chunk}")
    try:
        for off, data in writes:
            c.pwrite(memoryview(data), off, fua=True)
    finally:
        c.close()
    t = power_cut(t)
    try:
        for off, data in writes:
            back = read_fresh(t, off, len(data))
            lost = next((i for i in range(len(data)) if back[i] != data[i]), None)
            frames = -(-len(data) // chunk)
            assert lost is None, (f"the {len(data)}-byte FUA write at {off} lost its bytes from "
                                  f"{off + lost} on (frame {lost // chunk + 1} of {frames})")
    finally:
        t.stop()


def test_a_fua_zero_longer_than_a_frame_survives_a_power_cut(region: str,
                                                             tmp_path: Path) -> None:
    """A ZERO is split into frames of MAX_IO (32 MiB): one just over that is two frames."""
    t = start(region, tmp_path)
    length = MAX_IO + 8192 + 5
    at = 4096 + 3
    c = plugin_client(t)
    try:
        c.pwrite(memoryview(b"\xa5" * (length + 8192)), at - 4096)  # flushed: durable
        c.flush()
        c.zero(at, length, fua=True)
    finally:
        c.close()
    t = power_cut(t)
    try:
        back = read_fresh(t, at - 4096, length + 8192)
        assert back[:4096] == b"\xa5" * 4096 and back[4096 + length:] == b"\xa5" * 4096
        zeros = back[4096:4096 + length]
        kept = zeros.find(b"\xa5")
        assert kept == -1, f"the FUA zero came back with old data from {at + kept} on"
    finally:
        t.stop()


@needs_nbdkit
def test_a_multi_frame_fua_write_through_nbdkit_survives_a_power_cut(region: str,
                                                                    tmp_path: Path) -> None:
    """The same through nbdkit and the plugin (its FUA flag), with 64 KiB frames."""
    nbd: Any = pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    t = start(region, tmp_path)
    data = os.urandom((1 << 20) + 512)
    server = Nbdkit(tmp_path, *t.keys, "flush=gpspm", "chunk=65536").start()
    try:
        h = nbd.NBD()
        h.connect_uri(server.uri)
        h.pwrite(data, 8 << 20, nbd.CMD_FLAG_FUA)
        h.shutdown()
    finally:
        server.stop()
    t = power_cut(t)
    try:
        assert read_fresh(t, 8 << 20, len(data)) == data, "the FUA write was not all persisted"
    finally:
        t.stop()
