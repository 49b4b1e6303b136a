"""A watch on an asyncio loop from outside it: the loop that stops turning is caught in the act.

Everything framegrid publishes crosses its event loop (results, events, MQTT, the HTTP API), so a
callback that blocks the loop freezes every stream at once while the decode threads keep decoding.
`LoopWatch.run` (a task on the loop) stamps the monotonic time every `tick_s`; a daemon thread
checks the stamp, and when it is older than `stall_s` it takes the loop thread's stack at that
moment (`sys._current_frames`) and logs it once: the function that holds the loop, by file and
line. When the loop turns again the stall's length is logged and counted (`figures()`: stats'
`process.loop`, /metrics' `framegrid_loop_stalls` and `framegrid_loop_stall_longest_seconds`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from typing_extensions import TypedDict  # the one pydantic reads on Python < 3.12

log = logging.getLogger(__name__)

_watches: dict[int, LoopWatch] = {}  # id(loop) -> its watch (one per loop)


class LoopFigures(TypedDict):
    stalls: int  # times the loop did not turn for stall_s or more
    longest_s: float  # the longest of them
    blocked_s: float  # how long it has not turned now (0 while it turns)
    last_where: str | None  # the innermost frame of the last stall's stack: file:line function


class LoopWatch:
    def __init__(self, stall_s: float = 1.0, tick_s: float = 0.1) -> None:
        if stall_s <= tick_s:
            raise ValueError(f"stall_s ({stall_s}) must exceed tick_s ({tick_s})")
        self.stall_s = stall_s
        self.tick_s = tick_s
        self.stalls = 0
        self.longest_s = 0.0
        self.last_where: str | None = None
        self.last_stack: str | None = None
        self._tick = time.monotonic()
        self._in_stall = False
        self._loop_thread: int | None = None
        self._stop = threading.Event()

    def figures(self) -> LoopFigures:
        blocked = time.monotonic() - self._tick if self._in_stall else 0.0
        return {"stalls": self.stalls, "longest_s": round(max(self.longest_s, blocked), 3),
                "blocked_s": round(blocked, 3), "last_where": self.last_where}

    async def run(self) -> None:
        """Stamp the loop's turns until cancelled; the checking thread lives as long as this task."""
        loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tick = time.monotonic()
        _watches[id(loop)] = self
        self._stop.clear()
        thread = threading.Thread(target=self._check, name="loopwatch", daemon=True)
        thread.start()
        try:
            while True:
                self._turned(time.monotonic())
                await asyncio.sleep(self.tick_s)
        finally:
            self._stop.set()
            _watches.pop(id(loop), None)

    def _turned(self, now: float) -> None:
        if self._in_stall:
            self._in_stall = False
            length = now - self._tick
            if length >= self.stall_s:  # (not a check that raced this turn)
                self.stalls += 1
                self.longest_s = max(self.longest_s, length)
                log.warning("event loop: blocked for %.2f s (in %s)", length, self.last_where)
        self._tick = now

    def _check(self) -> None:
        while not self._stop.wait(self.tick_s):
            if self._in_stall or time.monotonic() - self._tick < self.stall_s:
                continue
            frame = sys._current_frames().get(self._loop_thread or 0)
            stack = traceback.extract_stack(frame) if frame is not None else traceback.StackSummary()
            stack = traceback.StackSummary.from_list([f for f in stack if not f.filename.startswith("<frozen")])
            self.last_where = _where(stack)
            self.last_stack = "".join(stack.format()[-16:])
            self._in_stall = True  # set after the stack: figures() never shows a stall without its place
            log.warning("event loop: not turned for %.1f s; it is in %s:\n%s", self.stall_s, self.last_where,
                        self.last_stack.rstrip())


def _where(stack: traceback.StackSummary) -> str | None:
    """The innermost frame of framegrid's own code, and the innermost of all when that is a library's."""
    if not stack:
        return None
    own = next((f for f in reversed(stack) if not _library(f.filename)), None)
    inner = stack[-1]
    text = f"{inner.filename}:{inner.lineno} {inner.name}"
    if own is None or own is inner:
        return text
    return f"{own.filename}:{own.lineno} {own.name} -> {text}"


def _library(filename: str) -> bool:
    return "site-packages" in filename or "/lib/python3" in filename


def loop_figures() -> LoopFigures | None:
    """The running loop's watch figures (None: no loop here, or no watch on it)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    watch = _watches.get(id(loop))
    return watch.figures() if watch is not None else None
