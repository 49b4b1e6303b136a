"""The mailbox between a decode thread and the batcher: one per stream, holding its newest frame.

The decode thread never waits for a consumer: it overwrites the mailbox, and an overwritten frame
that nobody took is counted as dropped with cause `stale`. The consumer (the asyncio batcher)
takes the newest frame or nothing. Size one, policy `latest`: no queue can grow.

Besides the frame, the mailbox keeps two facts the arrival-driven batcher needs: since when a
frame has been waiting (the first put after the last take; an overwrite does not reset it, so a
stream that was skipped keeps its place in line) and the stream's measured arrival interval
(so the batcher can tell whether waiting for this stream's next frame pays).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .frame import Frame


class Mailbox:
    """A one-frame mailbox with overwrite semantics; thread-safe on both ends."""

    __slots__ = ("stream", "_lock", "_frame", "_notify", "received", "dropped_stale", "_waiting_since",
                 "_last_put", "_interval")

    def __init__(self, stream: str, notify: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self._frame: Frame | None = None
        self._notify = notify
        self.received = 0
        self.dropped_stale = 0
        self._waiting_since: float | None = None
        self._last_put: float | None = None
        self._interval: float | None = None  # EWMA of the time between frames (monotonic seconds)

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        """Callback run (on the producer's thread) after every put; must not block."""
        self._notify = notify

    def put(self, frame: Frame) -> None:
        at = frame.captured_mono
        with self._lock:
            if self._frame is not None:
                self.dropped_stale += 1
            else:
                self._waiting_since = at
            self._frame = frame
            self.received += 1
            if self._last_put is not None and at > self._last_put:
                gap = at - self._last_put
                self._interval = gap if self._interval is None else 0.8 * self._interval + 0.2 * gap
            self._last_put = at
        notify = self._notify
        if notify is not None:
            notify()

    def take(self) -> Frame | None:
        """The newest frame, removing it; None when nothing new arrived since the last take."""
        with self._lock:
            frame, self._frame = self._frame, None
            self._waiting_since = None
            return frame

    def peek(self) -> Frame | None:
        with self._lock:
            return self._frame

    @property
    def waiting_since(self) -> float | None:
        """Monotonic time since which a frame has been waiting here (None: nothing waiting)."""
        return self._waiting_since

    @property
    def interval(self) -> float | None:
        """Measured seconds between frames (None until two frames arrived)."""
        return self._interval

    @property
    def last_put(self) -> float | None:
        """Capture time (monotonic) of the newest frame put."""
        return self._last_put

    def expected_next(self) -> float | None:
        """When the next frame should arrive (monotonic), from the measured interval."""
        last, interval = self._last_put, self._interval
        return None if last is None or interval is None else last + interval
