"""The one thread-to-loop boundary: decode threads, worker threads and talk sessions reach the
asyncio loop only through `Handoff`, which wraps `loop.call_soon_threadsafe`.

A hand-off after the loop has closed (shutdown) is dropped quietly: the thread that made it is
being stopped anyway. `Waker` coalesces wake-ups: however many frames a decode thread puts in
one loop turn, the loop is woken once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class Handoff:
    """Runs callables on one event loop from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule `fn(*args)` on the loop; never blocks, never raises (a closed loop drops it)."""
        if self.loop.is_closed():
            return
        try:  # noqa: SIM105 - the frame path: a bare try costs less than contextlib.suppress
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call
            pass

    def waker(self, *events: asyncio.Event) -> Waker:
        return Waker(self, *events)


class Waker:
    """Sets asyncio.Events from any thread: one hand-off for all of them, at most one pending."""

    __slots__ = ("_events", "_handoff", "_pending")

    def __init__(self, handoff: Handoff, *events: asyncio.Event) -> None:
        self._handoff = handoff
        self._events = events
        self._pending = threading.Event()

    def __call__(self) -> None:
        if self._pending.is_set():
            return
        self._pending.set()
        self._handoff.call(self._fire)

    def _fire(self) -> None:
        self._pending.clear()
        for event in self._events:
            event.set()


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """`event.wait()` for at most `timeout` seconds (None: for ever); True when the event is set.

    On Python 3.11 `asyncio.wait_for` loses a cancellation that arrives as the awaited thing
    completes (it returns the result instead of raising), and a loop around it then waits for
    ever in a task that was told to stop: seen as a shutdown that never finished. `asyncio.timeout`
    does not lose it; every timed wait in a loop goes through here.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False
