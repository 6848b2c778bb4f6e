"""The base of every resource pmemblk opens: a context manager whose ``close()`` is safe to
call twice (each subclass makes its own ``close()`` idempotent), and whose ``__exit__`` never
hides the error that ended the ``with`` block."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TypeVar

T = TypeVar("T", bound="Closeable")

log = logging.getLogger(__name__)


class Closeable:
    """Context-manager plumbing: ``close()`` must be idempotent in subclasses."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # the block's own error is the one the caller must see
            log.warning("closing %s after %s also failed", type(self).__name__,
                        type(exc).__name__, exc_info=True)
