"""The base of every resource pmemblk opens: a context manager whose ``close()`` is safe to
call twice (each subclass makes its own ``close()`` idempotent)."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

T = TypeVar("T", bound="Closeable")


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
        self.close()
