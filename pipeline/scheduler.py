"""The batch scheduler of one executor slot: fair, rate-limited, deadline-driven.

Each stream offers only its newest frame (keep-latest slot). When the slot is free, the
scheduler collects ready frames round-robin across streams (so no stream starves), honours
each stream's `max_fps`, drops frames older than `max_frame_age` (cause `too_old`) instead of
inferring them, and ships the batch when it is full or when the batch deadline passes: a slow or
dead stream never holds back the others. It only moves references; the model runs on the
slot's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from detectors import Detections
from streams import Frame, LatestFrame

from .executor import ExecutorSlot, is_out_of_memory
from .stats import StreamStats

log = logging.getLogger(__name__)


@dataclass(eq=False)
class StreamHandle:
    """What the scheduler knows of one stream."""

    stream: str
    slot: LatestFrame
    stats: StreamStats
    max_fps: float | None = None
    next_due: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    def due(self, now: float) -> bool:
        return now >= self.next_due

    def mark_taken(self, now: float) -> None:
        if not self.max_fps:
            return
        interval = 1.0 / self.max_fps
        # keep the phase (so 15 fps in, 10 fps out really gives 10), but never bank credit
        base = self.next_due if now - self.next_due < interval else now
        self.next_due = base + interval


OnBatch = Callable[[list[tuple[StreamHandle, Frame, Detections, dict[str, float]]]], None]


class Scheduler:
    """Forms batches for one ExecutorSlot and hands results to `on_results` (on the loop)."""

    def __init__(
        self,
        slot: ExecutorSlot,
        on_results: OnBatch,
        batch_size: int = 4,
        batch_timeout: float = 0.015,
        max_frame_age: float = 1.0,
        on_error: Callable[[Scheduler, Exception], None] | None = None,
    ) -> None:
        self.slot = slot
        self.on_error = on_error
        self.on_results = on_results
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self.max_frame_age = max_frame_age
        self.streams: dict[str, StreamHandle] = {}
        self._order: list[str] = []
        self._rr = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = threading.Event()  # a wake-up is already scheduled on the loop
        self.batches = 0
        self.batch_sizes: dict[int, int] = {}

    # -- membership ----------------------------------------------------------------------------
    def add_stream(self, handle: StreamHandle) -> None:
        self.streams[handle.stream] = handle
        self._order.append(handle.stream)
        handle.slot.set_notify(self.notify_threadsafe)
        self._wake.set()

    def remove_stream(self, stream: str) -> StreamHandle | None:
        handle = self.streams.pop(stream, None)
        if handle is not None:
            self._order.remove(stream)
            handle.slot.set_notify(None)
        return handle

    def notify_threadsafe(self) -> None:
        """Called by decode threads after a put; coalesces wake-ups to one per loop turn."""
        loop = self._loop
        if loop is None or self._pending.is_set():
            return
        self._pending.set()
        try:
            loop.call_soon_threadsafe(self._wake_from_thread)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _wake_from_thread(self) -> None:
        self._pending.clear()
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            batch = await self._form_batch()
            await self._ship(batch)

    async def _form_batch(self) -> list[tuple[StreamHandle, Frame]]:
        picked: list[tuple[StreamHandle, Frame]] = []
        deadline: float | None = None
        while True:
            self._wake.clear()
            now = time.monotonic()
            n = len(self._order)
            taken = {h.stream for h, _ in picked}
            for i in range(n):
                if len(picked) >= self.batch_size:
                    break
                handle = self.streams[self._order[(self._rr + i) % n]]
                if handle.stream in taken or not handle.due(now):
                    continue
                frame = handle.slot.take()
                if frame is None:
                    continue
                if now - frame.captured_mono > self.max_frame_age:
                    handle.stats.drop("too_old")
                    continue
                handle.mark_taken(now)
                picked.append((handle, frame))
            if len(picked) >= self.batch_size:
                break
            if picked and deadline is None:
                deadline = now + self.batch_timeout
            if deadline is not None and now >= deadline:
                break
            timeout = self._next_wake(now, deadline)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
        if picked and self._order:
            # round robin: the next batch starts after the last stream served in this one
            last = picked[-1][0].stream
            if last in self._order:
                self._rr = (self._order.index(last) + 1) % len(self._order)
        return picked

    def _next_wake(self, now: float, deadline: float | None) -> float | None:
        """Sleep until the batch deadline or until a rate-limited stream with a frame is due."""
        times = [deadline] if deadline is not None else []
        for h in self.streams.values():
            if h.next_due > now and h.slot.peek() is not None:
                times.append(h.next_due)
        return max(0.0, min(times) - now) if times else None

    async def _ship(self, picked: list[tuple[StreamHandle, Frame]]) -> None:
        t_ship = time.monotonic()
        images = [f.image for _, f in picked]
        try:
            dets = await self.slot.infer(images)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_out_of_memory(exc) and len(picked) > 1:
                # out of memory: retry these frames at half the batch size, and keep that size
                self.batch_size = max(1, len(picked) // 2)
                log.warning("slot %s: out of memory at batch %d; batch size now %d", self.slot.name, len(picked),
                            self.batch_size)
                half = len(picked) // 2
                await self._ship(picked[:half])
                await self._ship(picked[half:])
                return
            for handle, _ in picked:
                handle.stats.drop("error")
            log.error("slot %s: batch of %d failed: %s", self.slot.name, len(picked), exc)
            if self.on_error is not None:
                self.on_error(self, exc)
            return
        self.batches += 1
        self.batch_sizes[len(picked)] = self.batch_sizes.get(len(picked), 0) + 1
        out = []
        for (handle, frame), det in zip(picked, dets, strict=True):
            timings = {
                "decode": frame.decode_ms,
                "queue": (t_ship - frame.captured_mono) * 1000,
                **det.timings_ms,
            }
            out.append((handle, frame, det, timings))
        self.on_results(out)
