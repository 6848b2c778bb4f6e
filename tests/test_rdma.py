"""rdma.py helpers that run without an RDMA device."""

from __future__ import annotations

import os

from pmemblk import rdma


def test_a_channel_that_exposes_its_descriptor_is_taken_at_its_word() -> None:
    """pyverbs from rdma-core 57 has CompChannel.fd: it is used (made non-blocking) instead of
    searching /proc/self/fd for a new descriptor of that kind."""
    r, w = os.pipe()
    try:
        class Channel:
            fd = r

        obj, fd = rdma.open_with_fd(Channel, rdma.COMP_CHANNEL_LINK, "completion channel")
        assert isinstance(obj, Channel) and fd == r and not os.get_blocking(r)
    finally:
        os.close(r)
        os.close(w)
