"""rdma.py helpers that run without an RDMA device."""

from __future__ import annotations

import logging
import os
import types

import pytest

from pmemblk import rdma
from pmemblk.endpoint import wc_failure
from pmemblk.errors import ConnectionLost, TransportError


def test_a_channel_that_exposes_its_descriptor_is_taken_at_its_word(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pyverbs from rdma-core 57 has CompChannel.fd: it is used (made non-blocking) and
    /proc/self/fd is not searched at all."""

    def no_search() -> dict[int, str]:
        raise AssertionError("searched /proc/self/fd")

    monkeypatch.setattr(rdma, "_fd_links", no_search)
    r, w = os.pipe()
    try:
        class Channel:
            fd = r

        obj, fd = rdma.open_with_fd(lambda: Channel(), rdma.COMP_CHANNEL_LINK,
                                    "completion channel", Channel)
        assert isinstance(obj, Channel) and fd == r and not os.get_blocking(r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.skipif(not rdma.HAVE_PYVERBS, reason="pyverbs is not installed")
def test_a_failed_completion_names_its_work_request_and_is_not_logged_where_taken(
        caplog: pytest.LogCaptureFixture) -> None:
    """librpma's way: the error carries every field of the work request; whoever decides
    what it means logs it, once (so the place that takes the completion does not)."""
    caplog.set_level(logging.DEBUG)
    wc = types.SimpleNamespace(status=rdma.e.IBV_WC_REM_ACCESS_ERR, vendor_err=0x81)
    err = wc_failure(wc, "RDMA WRITE", 0x7F0000001000, 0xABC, 4096)
    assert type(err) is TransportError
    assert str(err) == ("RDMA WRITE failed: completion status REM_ACCESS_ERR (vendor error "
                        "0x81); remote address 0x7f0000001000, rkey 0xabc, length 4096")
    flushed = types.SimpleNamespace(status=rdma.e.IBV_WC_WR_FLUSH_ERR, vendor_err=0)
    assert isinstance(wc_failure(flushed, "SEND"), ConnectionLost)  # the QP is gone
    assert caplog.records == []
