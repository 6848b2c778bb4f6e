from __future__ import annotations

import struct
import uuid
import zlib

import pytest

from pmemblk import layout
from pmemblk.errors import LayoutError
from pmemblk.pmem import PmemRegion

SIZE = 1 << 20


def good_header() -> layout.Header:
    return layout.Header(uuid.uuid4(), 4096, 4096, SIZE - 4096, 123)


def test_round_trip() -> None:
    h = good_header()
    raw = h.encode()
    assert len(raw) == layout.HEADER_SIZE == 64
    assert layout.Header.decode(raw, SIZE) == h


def test_format_then_read(region: PmemRegion) -> None:
    h = layout.read_header(region)
    assert h.data_offset == 4096 and h.data_offset % 4096 == 0
    assert h.data_size == SIZE - 4096
    assert h.block_size == 4096
    st = layout.read_state(region)
    assert st.clean and st.times_served == 0
    layout.write_state(region, layout.State(clean=False, times_served=3))
    assert layout.read_state(region) == layout.State(False, 3)


def resign(raw: bytes) -> bytes:
    """Recompute the CRC so that a test reaches the field checks behind it."""
    return raw[:56] + struct.pack("<II", zlib.crc32(raw[:56]), 0)


@pytest.mark.parametrize("flip", range(0, 56, 3))
def test_any_corrupted_byte_is_detected(flip: int) -> None:
    raw = bytearray(good_header().encode())
    raw[flip] ^= 0x40
    with pytest.raises(LayoutError):
        layout.Header.decode(bytes(raw), SIZE)


def test_checksum_mismatch_message() -> None:
    raw = bytearray(good_header().encode())
    raw[20] ^= 1  # inside the UUID: only the checksum can notice
    with pytest.raises(LayoutError, match="checksum mismatch"):
        layout.Header.decode(bytes(raw), SIZE)


def test_wrong_magic() -> None:
    raw = b"NOTMAGIC" + good_header().encode()[8:]
    with pytest.raises(LayoutError, match="no pmemblk header"):
        layout.Header.decode(raw, SIZE)


def test_wrong_version() -> None:
    raw = bytearray(good_header().encode())
    struct.pack_into("<H", raw, 8, 99)
    with pytest.raises(LayoutError, match="layout version 99"):
        layout.Header.decode(resign(bytes(raw)), SIZE)


def test_truncated() -> None:
    with pytest.raises(LayoutError, match="truncated"):
        layout.Header.decode(good_header().encode()[:40], SIZE)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (12, struct.pack("<I", 1000), "block size 1000"),
        (12, struct.pack("<I", 256), "block size 256"),
        (32, struct.pack("<Q", 100), "data offset 100"),
        (40, struct.pack("<Q", 4097), "not a positive multiple"),
        (40, struct.pack("<Q", SIZE), "truncated or copied in part"),
        (40, struct.pack("<Q", 0), "not a positive multiple"),
    ],
)
def test_out_of_range_fields(field: int, value: bytes, message: str) -> None:
    raw = bytearray(good_header().encode())
    raw[field:field + len(value)] = value
    with pytest.raises(LayoutError, match=message):
        layout.Header.decode(resign(bytes(raw)), SIZE)


def test_reserved_must_be_zero() -> None:
    raw = bytearray(good_header().encode())
    struct.pack_into("<I", raw, 60, 7)
    with pytest.raises(LayoutError, match="reserved"):
        layout.Header.decode(bytes(raw), SIZE)


def test_features_need_version_2_and_must_be_known() -> None:
    h = layout.Header(uuid.uuid4(), 4096, 4096, SIZE - 4096, 123, layout.FEATURE_ATOMIC_BLOCKS)
    raw = bytearray(h.encode())
    assert struct.unpack_from("<H", raw, 8)[0] == 2
    assert layout.Header.decode(bytes(raw), SIZE).atomic_blocks
    struct.pack_into("<I", raw, 60, 0b110)
    with pytest.raises(LayoutError, match="features 0x6 are not supported"):
        layout.Header.decode(bytes(raw), SIZE)
    struct.pack_into("<I", raw, 60, 0)  # version 2 with no feature: not written by anyone
    with pytest.raises(LayoutError, match="features 0x0"):
        layout.Header.decode(bytes(raw), SIZE)


def test_an_atomic_region_keeps_its_header_out_of_the_layout(region: PmemRegion) -> None:
    header = layout.format_region(region, 512, atomic_lanes=8)
    info = layout.read_atomic_info(region, header)
    assert info is not None and info.lanes == 8 and info.sector_size == 512
    assert info.end <= header.data_size
    assert layout.read_header(region) == header


def test_region_too_small(region_path: object) -> None:
    with PmemRegion.create(str(region_path), 4096) as r, pytest.raises(LayoutError, match="small"):
        layout.format_region(r)


def test_unformatted_region_is_refused(region_path: object) -> None:
    with PmemRegion.create(str(region_path), SIZE) as r:
        assert not layout.has_header(r)
        with pytest.raises(LayoutError, match="no pmemblk header"):
            layout.read_header(r)


def test_state_word_encoding() -> None:
    assert layout.State.decode(layout.State(True, 5).encode()) == layout.State(True, 5)
    assert layout.State.decode(0) == layout.State(False, 0)


def test_loss_epoch_moves_only_after_an_unclean_stop_in_another_boot(region: PmemRegion) -> None:
    layout.format_region(region)
    boot_a, boot_b = uuid.uuid4().bytes, uuid.uuid4().bytes
    first = layout.open_for_serving(region, boot_a)  # a fresh region was clean
    assert first.continuity and first.loss_epoch == 0
    # Killed, restarted in the same boot: the memory kept every write.
    again = layout.open_for_serving(region, boot_a)
    assert not again.previous.clean and again.continuity and again.loss_epoch == 0
    # Unclean, and the machine rebooted (or lost power): unflushed writes may be gone.
    lost = layout.open_for_serving(region, boot_b)
    assert not lost.continuity and lost.loss_epoch == 1
    assert layout.read_loss_epoch(region) == 1
    # A clean stop carries continuity into any boot.
    layout.write_state(region, layout.State(True, layout.read_state(region).times_served))
    clean = layout.open_for_serving(region, boot_a)
    assert clean.continuity and clean.loss_epoch == 1
    # An unknown boot id never proves continuity.
    assert not layout.open_for_serving(region, bytes(16)).continuity
    assert layout.read_state(region).times_served == 5
