"""rdma.py helpers that run without an RDMA device."""

from __future__ import annotations

import os

import pytest

from pmemblk import rdma


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
