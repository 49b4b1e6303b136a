"""The keep-latest-frame slot between a decode thread and the scheduler.

The decode thread never waits for a consumer: it overwrites the slot, and an overwritten frame
that nobody took is counted as dropped with cause `stale`. The consumer side (the asyncio
scheduler) takes the newest frame or nothing. Size one, policy `latest`: no queue can grow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .frame import Frame


class LatestFrame:
    """A one-frame mailbox with overwrite semantics; thread-safe on both ends."""

    __slots__ = ("stream", "_lock", "_frame", "_notify", "received", "dropped_stale")

    def __init__(self, stream: str, notify: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self._frame: Frame | None = None
        self._notify = notify
        self.received = 0
        self.dropped_stale = 0

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        """Callback run (on the producer's thread) after every put; must not block."""
        self._notify = notify

    def put(self, frame: Frame) -> None:
        with self._lock:
            if self._frame is not None:
                self.dropped_stale += 1
            self._frame = frame
            self.received += 1
        notify = self._notify
        if notify is not None:
            notify()

    def take(self) -> Frame | None:
        """The newest frame, removing it; None when nothing new arrived since the last take."""
        with self._lock:
            frame, self._frame = self._frame, None
            return frame

    def peek(self) -> Frame | None:
        with self._lock:
            return self._frame

    def clear(self) -> Frame | None:
        """Drop what is held without counting it stale (used when a stream is removed)."""
        return self.take()
