"""The one thread-to-loop boundary: decode threads, worker threads, talk sessions, WebRTC outputs
and blocking callers of the lip-sync pool reach an asyncio loop only through `Handoff`:
`call` (fire and forget, wraps `loop.call_soon_threadsafe`) and `run` (the portal for a blocking
caller: runs a function on the loop and waits for its value).

A hand-off after the loop has closed (shutdown) is dropped quietly: the thread that made it is
being stopped anyway. `Waker` coalesces wake-ups: however many frames a decode thread puts in
one loop turn, the loop is woken once. It lives in `streams` (the lowest layer) so that media
I/O (`streams.webrtc`) crosses the same way as the pipeline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


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

    def run(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """The portal for a blocking caller on another thread: run `fn()` on the loop and return its
        value (or raise what it raised; TimeoutError after `timeout`). Called on the loop itself, it
        just calls `fn`. RuntimeError when the loop has closed."""
        try:
            if asyncio.get_running_loop() is self.loop:
                return fn()
        except RuntimeError:
            pass  # no loop in this thread: the usual case
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def on_loop() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        if self.loop.is_closed():
            raise RuntimeError("the loop has closed")
        self.loop.call_soon_threadsafe(on_loop)
        return done.result(timeout)

    def waker(self, *events: asyncio.Event, listening: Callable[[], bool] | None = None) -> Waker:
        return Waker(self, *events, listening=listening)


class Waker:
    """Sets asyncio.Events from any thread: one hand-off for all of them, at most one pending.

    `listening` (read on the caller's thread) says whether anyone waits on the events now; while
    it is false a call costs nothing (no hand-off, the loop is not woken). Whoever waits must set
    what it reads *before* it looks for work, so that work arriving after that look wakes it."""

    __slots__ = ("_events", "_handoff", "_listening", "_pending")

    def __init__(self, handoff: Handoff, *events: asyncio.Event, listening: Callable[[], bool] | None = None) -> None:
        self._handoff = handoff
        self._events = events
        self._listening = listening
        self._pending = threading.Event()

    def __call__(self) -> None:
        if self._pending.is_set() or (self._listening is not None and not self._listening()):
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
