"""Closeable, the base of every resource: ``__exit__`` closes, and never hides the error that
ended the ``with`` block behind one from ``close()`` (STYLE.md, ovirt-imageio)."""

from __future__ import annotations

import logging

import pytest

from pmemblk.errors import PmemError, RemoteError
from pmemblk.resource import Closeable


class FailsToClose(Closeable):
    def __init__(self) -> None:
        self.closes = 0

    def close(self) -> None:
        self.closes += 1
        raise PmemError("unmapping failed")


def test_the_blocks_own_error_is_the_one_raised(caplog: pytest.LogCaptureFixture) -> None:
    r = FailsToClose()
    with caplog.at_level(logging.WARNING, "pmemblk.resource"), \
            pytest.raises(RemoteError, match="the target refused"), r:
        raise RemoteError("the target refused", 13)
    assert r.closes == 1
    assert "closing FailsToClose after RemoteError also failed" in caplog.text
    assert "unmapping failed" in caplog.text  # the close's error is logged, not lost


def test_a_close_that_fails_after_a_clean_block_is_raised() -> None:
    r = FailsToClose()
    with pytest.raises(PmemError, match="unmapping failed"), r:
        pass
    assert r.closes == 1


def test_a_keyboard_interrupt_is_not_hidden_either() -> None:
    r = FailsToClose()
    with pytest.raises(KeyboardInterrupt), r:
        raise KeyboardInterrupt
    assert r.closes == 1
