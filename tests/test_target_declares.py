"""What the target declares (issue 23): the WELCOME's flush methods, the ones it calls
durable and ATOMIC WRITE, built from every outcome of the start-up probe (device capabilities,
what the kernel let the region be registered with, read-only or not, pmem or not); and the
boot-id / continuity decision with boot ids unknown on either side or both.

Each is one line from acknowledging lost data: a native FLUSH called durable where only
FLUSH_GLOBAL (visibility) is there, or an unclean stop in an unknown boot taken as a
restart in the same boot (no loss epoch after a power cut)."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import durability, layout, rdma
from pmemblk.address import parse_address
from pmemblk.durability import NativeOffer
from pmemblk.pmem import PmemRegion
from pmemblk.protocol import (
    CLIENT_NONCE_SIZE,
    FLUSH_APM,
    FLUSH_GPSPM,
    FLUSH_NATIVE,
    MAC_SIZE,
    REGION_ATOMIC_WRITE,
    REGION_IS_PMEM,
    REGION_READONLY,
    Auth,
    Hello,
)
from pmemblk.session import Admission, Greeting, ServeConfig
from pmemblk.target import Export

FLUSH_KINDS = (None, "global", "persistent")


# -- the device's capabilities (rdma.native_from_caps) ----------------------------------------

@pytest.mark.parametrize(("gl", "pe", "aw", "can_flush", "can_aw"),
                         list(itertools.product((False, True), repeat=5)))
def test_device_caps_are_read_bit_by_bit(gl: bool, pe: bool, aw: bool, can_flush: bool,
                                         can_aw: bool) -> None:
    flags = (rdma.DEVICE_FLUSH_GLOBAL * gl | rdma.DEVICE_FLUSH_PERSISTENT * pe
             | rdma.DEVICE_ATOMIC_WRITE * aw | 0x3F)  # low bits: other capabilities
    native, why = rdma.native_from_caps(flags, can_flush, can_aw)
    assert native == rdma.Native(gl and can_flush, pe and can_flush, aw and can_aw)
    if native.any:
        assert why == "offered by the device"
    elif (gl or pe) and not can_flush:
        assert "this pyverbs cannot post it" in why
    else:
        assert "does not offer them" in why


def test_the_neighbouring_bits_are_not_the_native_verbs() -> None:
    native, _ = rdma.native_from_caps(((1 << 38) - 1) | (1 << 41) | (1 << 37), True, True)
    assert not native.any


# -- the offer (durability.native_offer) ------------------------------------------------------

@pytest.mark.parametrize(("gl", "pe", "aw", "readonly", "memory"),
                         list(itertools.product((False, True), (False, True), (False, True),
                                                (False, True), FLUSH_KINDS)))
def test_the_offer_from_every_probe_outcome(gl: bool, pe: bool, aw: bool, readonly: bool,
                                            memory: str | None) -> None:
    """``memory``: what the kernel would let the region be registered with (persistent only
    on memory it calls persistent, global on any memory, None if it refused both)."""
    asked: list[bool] = []

    def register(persistent: bool) -> durability.Registration:
        asked.append(persistent)
        got = memory if persistent or memory != "persistent" else "global"
        return got, f"registered {got}"

    offer = durability.native_offer(gl, pe, aw, "device says", readonly, register)
    if readonly:
        assert offer == NativeOffer(None, False, "the export is read-only") and not asked
        return
    assert offer.atomic_write == aw
    if not (gl or pe):
        assert offer == NativeOffer(None, aw, "device says") and not asked
        return
    assert asked == [pe]  # FLUSH_PERSISTENT is tried only where the device has it
    expected = {None: None, "global": "global",
                "persistent": "persistent" if pe else "global"}[memory]
    assert offer.flush == expected
    guarantee = offer.guarantee()
    assert (guarantee is not None and guarantee.persistent) == (expected == "persistent")


def test_a_registration_for_persistence_on_a_global_only_device_is_visibility() -> None:
    """Even if the kernel let a FLUSH_GLOBAL-only device register the region for
    FLUSH_PERSISTENT, the device cannot make a range persistent: visibility only."""
    offer = durability.native_offer(True, False, False, "", False,
                                    lambda persistent: ("persistent", "the kernel allowed it"))
    assert offer.flush == "global" and "FLUSH_GLOBAL only" in offer.why
    assert rdma.flush_flags(offer.flush) == rdma.flush_flags("global")


# -- the WELCOME (durability.declare, Export.welcome) -----------------------------------------

@pytest.mark.parametrize(("is_pmem", "apm_durable", "flush", "aw", "native", "readonly"),
                         list(itertools.product((False, True), (False, True), FLUSH_KINDS,
                                                (False, True), (False, True), (False, True))))
def test_the_guarantee_table(is_pmem: bool, apm_durable: bool, flush: str | None, aw: bool,
                             native: bool, readonly: bool) -> None:
    offer = NativeOffer(flush, aw, "probed")
    region_durable = durability.durable_mask(
        durability.guarantees(is_pmem, "x", apm_durable))
    declared = durability.declare(region_durable, offer, native, readonly)
    usable = native and not readonly
    assert declared.flush_methods == FLUSH_APM | FLUSH_GPSPM | (
        FLUSH_NATIVE if usable and flush is not None else 0)
    assert declared.durable_methods & FLUSH_GPSPM  # gpspm persists everywhere
    assert bool(declared.durable_methods & FLUSH_APM) == (is_pmem and apm_durable)
    assert bool(declared.durable_methods & FLUSH_NATIVE) == (usable and flush == "persistent")
    assert declared.durable_methods & ~declared.flush_methods == 0  # durable is offered
    assert declared.atomic_write == (usable and aw)
    # The log and status say the same of native as the WELCOME does.
    said = {g.method: g.persistent
            for g in durability.guarantees(is_pmem, "x", apm_durable, offer)}
    assert said.get("native") == ({"persistent": True, "global": False}.get(flush or ""))


@pytest.fixture
def export(tmp_path: Path) -> Iterator[Export]:
    path = str(tmp_path / "r.img")
    with PmemRegion.create(path, 1 << 20) as r:
        layout.format_region(r)
    ex = Export(ServeConfig(path=path, listen=parse_address(f"unix:{tmp_path}/s", "--listen"),
                            transports=("tcp",)))
    ex.begin()
    yield ex
    ex.close()


def admit(export: Export, readonly: bool = False) -> Admission:
    hello = Hello(readonly=readonly, nonce=os.urandom(CLIENT_NONCE_SIZE),
                  client_id=os.urandom(16))
    greeting = export.greet(hello.encode())
    assert isinstance(greeting, Greeting)
    admission = export.admit(greeting, Auth(bytes(MAC_SIZE)).encode())
    assert isinstance(admission, Admission), admission
    return admission


@pytest.mark.parametrize(("flush", "aw"), list(itertools.product(FLUSH_KINDS, (False, True))))
def test_the_welcome_declares_what_the_probe_found(export: Export, flush: str | None,
                                                   aw: bool) -> None:
    """A plain file (not pmem): gpspm durable, apm visibility; native durable only with
    FLUSH_PERSISTENT; nothing native to a connection whose rkey lacks it or a reader."""
    export.offer_native(NativeOffer(flush, aw, "probed"))
    writer, reader = admit(export), admit(export, readonly=True)
    w = export.welcome(writer, rkey=1, remote_addr=4096, native=True)
    assert not w.region_flags & (REGION_IS_PMEM | REGION_READONLY)
    assert w.flush_methods == FLUSH_APM | FLUSH_GPSPM | (FLUSH_NATIVE if flush else 0)
    assert w.durable_methods == FLUSH_GPSPM | (FLUSH_NATIVE if flush == "persistent" else 0)
    assert bool(w.region_flags & REGION_ATOMIC_WRITE) == aw
    for welcome in (export.welcome(writer, native=False),
                    export.welcome(reader, rkey=1, remote_addr=4096, native=True)):
        assert welcome.flush_methods == FLUSH_APM | FLUSH_GPSPM
        assert welcome.durable_methods == FLUSH_GPSPM
        assert not welcome.region_flags & REGION_ATOMIC_WRITE
    assert export.welcome(reader).region_flags & REGION_READONLY
    status = export.status()["flush"]
    assert ("native" in status) == (flush is not None)
    if flush is not None:
        assert ("visibility only" in status["native"]) == (flush == "global")


# -- boot ids and continuity (layout.open_for_serving) ----------------------------------------

UNKNOWN = bytes(16)
BOOT_A, BOOT_B = uuid.UUID(int=0xA).bytes, uuid.UUID(int=0xB).bytes


@pytest.mark.parametrize(("stored", "now"),
                         list(itertools.product((UNKNOWN, BOOT_A), (UNKNOWN, BOOT_A, BOOT_B))))
@pytest.mark.parametrize("clean", [False, True])
def test_continuity_needs_a_clean_stop_or_the_same_known_boot(
        tmp_path: Path, stored: bytes, now: bytes, clean: bool) -> None:
    with PmemRegion.create(str(tmp_path / "r.img"), 1 << 20) as region:
        layout.format_region(region)
        layout.open_for_serving(region, stored)  # the previous target, in boot ``stored``
        if clean:
            layout.write_state(region, layout.State(True, 1))
        epoch = layout.read_loss_epoch(region)
        opening = layout.open_for_serving(region, now)
        same_known_boot = stored == now != UNKNOWN
        assert opening.continuity == (clean or same_known_boot)
        assert opening.loss_epoch == layout.read_loss_epoch(region) == epoch + (
            not opening.continuity)
        assert region.read(layout.BOOT_ID_OFFSET, 16) == now  # recorded for the next one
        assert layout.read_state(region) == layout.State(False, 2)


def test_the_boot_id_is_read_from_the_kernel_or_unknown(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "boot_id"
    good.write_text(f"{uuid.UUID(int=7)}\n")
    monkeypatch.setattr(layout, "BOOT_ID_FILE", str(good))
    assert layout.current_boot_id() == uuid.UUID(int=7).bytes
    good.write_text("not a uuid\n")
    assert layout.current_boot_id() == UNKNOWN
    monkeypatch.setattr(layout, "BOOT_ID_FILE", str(tmp_path / "missing"))
    assert layout.current_boot_id() == UNKNOWN


def test_two_unclean_starts_in_unknown_boots_each_move_the_loss_epoch(tmp_path: Path) -> None:
    """A machine whose boot id cannot be read loses power twice: each start is a new loss
    epoch (two unknowns are not the same boot)."""
    with PmemRegion.create(str(tmp_path / "r.img"), 1 << 20) as region:
        layout.format_region(region)
        epochs = [layout.open_for_serving(region, UNKNOWN).loss_epoch for _ in range(3)]
    assert epochs == [0, 1, 2]  # the first found the region clean from create
