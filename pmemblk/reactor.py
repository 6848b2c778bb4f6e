"""A small single-threaded event loop: file descriptors, deadlines and a wake-up pipe.

The target runs every transport's server on one of these, so no pyverbs or socket call ever
blocks the process (docs/design.md).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import os
import selectors
import time
from collections.abc import Callable

Callback = Callable[[], None]


class Reactor:
    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callback]] = []
        self._ids = itertools.count()
        self._stop = False
        #: Callbacks posted from other threads or signal handlers (deque appends are atomic).
        self._posted: collections.deque[Callback] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add(self._wake_r, self._drain_wake)
        self._closed = False

    @staticmethod
    def _mask(on_read: Callback | None, on_write: Callback | None) -> int:
        return (selectors.EVENT_READ if on_read else 0) | (selectors.EVENT_WRITE if on_write else 0)

    def add(self, fd: int, on_read: Callback | None, on_write: Callback | None = None) -> None:
        self._sel.register(fd, self._mask(on_read, on_write), (on_read, on_write))

    def modify(self, fd: int, on_read: Callback | None, on_write: Callback | None = None) -> None:
        """Change what ``fd`` is watched for; at least one callback must be given."""
        self._sel.modify(fd, self._mask(on_read, on_write), (on_read, on_write))

    def remove(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(fd)

    def call_later(self, delay: float, callback: Callback) -> int:
        handle = next(self._ids)
        heapq.heappush(self._timers, (time.monotonic() + delay, handle, callback))
        return handle

    def cancel(self, handle: int) -> None:
        """Drop a timer now, and with it its callback and what that holds (a connection)."""
        kept = [t for t in self._timers if t[1] != handle]
        if len(kept) != len(self._timers):
            heapq.heapify(kept)
            self._timers = kept

    def stop(self) -> None:
        """Safe from a signal handler: sets a flag and wakes the loop."""
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def post(self, callback: Callback) -> None:
        """Run ``callback`` on the loop's thread soon. Safe from another thread and from a
        signal handler."""
        self._posted.append(callback)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while self._posted and not self._stop:
            self._posted.popleft()()

    def _run_timers(self) -> float | None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()
        return max(0.0, self._timers[0][0] - now) if self._timers else None

    def run(self) -> None:
        while not self._stop:
            timeout = self._run_timers()
            if self._stop:
                break
            for key, mask in self._sel.select(timeout):
                on_read, on_write = key.data
                if mask & selectors.EVENT_WRITE and on_write is not None:
                    on_write()
                if (mask & selectors.EVENT_READ and on_read is not None
                        and self._sel.get_map().get(key.fd) is key):
                    on_read()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
