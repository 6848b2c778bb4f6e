"""pmemblk.nbdqueue against built /sys/block/nbdN trees: the kernel's view of an NBD device,
and attach's refusal of a device the kernel will not send FLUSH or FUA to."""

from __future__ import annotations

from pathlib import Path

import pytest

from pmemblk import attach, status
from pmemblk.errors import ServiceError
from pmemblk.nbdqueue import read_queue


def _block(root: Path, name: str = "nbd3", write_cache: str = "write back", fua: str = "1",
           connections: int = 2) -> Path:
    queue = root / "block" / name / "queue"
    queue.mkdir(parents=True)
    (queue / "write_cache").write_text(write_cache + "\n")
    (queue / "fua").write_text(fua + "\n")
    (queue / "max_sectors_kb").write_text("128\n")
    (queue / "logical_block_size").write_text("4096\n")
    (queue / "io_timeout").write_text("180000\n")
    for i in range(connections):
        (root / "block" / name / "mq" / str(i)).mkdir(parents=True)
    return root


def test_reads_what_the_kernel_decided(tmp_path: Path) -> None:
    q = read_queue("/dev/nbd3", str(_block(tmp_path)))
    assert q.sends_flush and q.fua
    assert (q.max_sectors_kb, q.logical_block_size, q.timeout_s, q.connections) == (
        128, 4096, 180.0, 2)
    assert "write cache write back, FUA on" in q.describe()
    assert "timeout 180 s, 2 connection(s)" in q.describe()


def test_missing_optional_settings_are_unknown_not_errors(tmp_path: Path) -> None:
    queue = tmp_path / "block" / "nbd0" / "queue"
    queue.mkdir(parents=True)
    (queue / "write_cache").write_text("write through\n")
    q = read_queue("nbd0", str(tmp_path))
    assert not q.sends_flush and not q.fua
    assert q.timeout_s is None and q.connections is None and q.max_sectors_kb is None


def test_no_device_or_nonsense_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="cannot read the kernel's settings of /dev/nbd9"):
        read_queue("/dev/nbd9", str(tmp_path))
    with pytest.raises(ServiceError, match="not a block device name"):
        read_queue("/dev/..", str(tmp_path))
    _block(tmp_path, "nbd1", write_cache="\x00\xffgarbage" * 40)
    with pytest.raises(ServiceError, match="neither"):
        read_queue("/dev/nbd1", str(tmp_path))


def test_attach_check_passes_a_device_that_sends_flush_and_fua(tmp_path: Path) -> None:
    attach.check_kernel("/dev/nbd3", False, str(_block(tmp_path)))


def test_attach_refuses_a_device_without_flush(tmp_path: Path) -> None:
    root = _block(tmp_path, write_cache="write through", fua="0")
    with pytest.raises(ServiceError) as err:
        attach.check_kernel("/dev/nbd3", False, str(root))
    text = str(err.value)
    assert "will not send FLUSH to /dev/nbd3" in text and "write through" in text
    assert "/sys/block/nbd3/queue/write_cache" in text and "\n" not in text


def test_attach_refuses_a_device_without_fua(tmp_path: Path) -> None:
    root = _block(tmp_path, fua="0")
    with pytest.raises(ServiceError, match="will not send FUA to /dev/nbd3"):
        attach.check_kernel("/dev/nbd3", False, str(root))


def test_a_readonly_device_needs_neither(tmp_path: Path) -> None:
    """A read-only export offers no FLUSH or FUA: the check has nothing to ask."""
    attach.check_kernel("/dev/nbd3", True, str(_block(tmp_path, write_cache="write through",
                                                       fua="0")))


def test_status_shows_the_kernels_view(tmp_path: Path) -> None:
    q = read_queue("/dev/nbd3", str(_block(tmp_path, write_cache="write through")))
    text = status.render({"name": "nbd3", "device": "/dev/nbd3", "state": "connected",
                          "kernel": q.as_dict()}, None)
    assert "kernel:       write cache write through, FUA on" in text
    assert "fsync does not reach the target" in text
