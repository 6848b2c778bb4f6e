"""A lane group whose recovery fails says why, to the writer it refuses, in the log and in
status (issue 24, item 3). It used to say "recreate it with more --lanes" (which erases the
region) to every later writer, and status only "waiting for recovery"."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from pmemblk import atomicblocks as ab
from pmemblk import layout
from pmemblk.errors import RemoteError
from pmemblk.pmem import PmemRegion
from pmemblk.transport.stream import StreamTransport

from ..procs import pmemblk
from .test_atomic import atomic_region, client, serve, stamp  # noqa: F401 - the fixture


def corrupt_flog(region: str, lane: int) -> None:
    """Both log slots of ``lane``, as a writer can write anywhere in the data area."""
    with PmemRegion.open(region) as r:
        header = layout.read_header(r)
        area = layout.data_area(r, header.data_offset, header.data_size)
        info = ab.read_info(area)
        for slot in (0, 1):
            at = info.slot_at(lane, slot)
            area.write(at, bytes(x ^ 0xFF for x in area.read(at, 8)))
            area.persist(at, 8)


def test_a_failed_lane_recovery_is_told_to_writers_the_log_and_status(
        atomic_region: str, tmp_path: Path) -> None:  # noqa: F811
    control = tmp_path / "control.sock"
    target = serve(atomic_region, tmp_path, "--shared", "--control", str(control))
    first = client(target)  # lanes 0..7
    first.pwrite(memoryview(stamp(1, 1)), 0)
    corrupt_flog(atomic_region, 3)
    first.close()
    target.wait_log("atomic-blocks recovery failed")
    with client(target) as second:  # the other group is still free
        second.pwrite(memoryview(stamp(2, 1)), 4096)
        with pytest.raises(RemoteError) as exc:
            StreamTransport(target.listen)
        said = str(exc.value)
        assert exc.value.errno == errno.EIO, said
        assert "recovery failed" in said and "lane 3" in said and "--readonly" in said, said
        assert "more --lanes" not in said, said
        st = json.loads(pmemblk("status", "--target", str(control), "--json").stdout)
        assert "lane 3" in st["atomic_blocks"]["lane_recovery_error"]
        text = pmemblk("status", "--target", str(control)).stdout
        assert "1 that cannot be given out: their recovery failed" in text, text
    # Tried again when the last writer leaves: still failing, and not logged again.
    target.wait_log("client 2 (unix socket) disconnected")
    target.stop()
    assert target.log().count("atomic-blocks recovery failed") == 1, target.log()
