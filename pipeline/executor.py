"""Executor slots: one model instance and one worker thread each.

The asyncio loop never runs a model: it hands a batch to the slot's worker thread and awaits
the result. A slot measures its own service time (per frame, smoothed) so that the scheduler
and, later, the supervisor can reason about load. A failing model call fails that batch only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from detectors import Detections, Detector

log = logging.getLogger(__name__)


class SlotHang(TimeoutError):
    """A batch ran far past its expected time; the worker thread is abandoned."""


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError and friends, recognised without importing torch."""
    name = type(exc).__name__
    return name in ("OutOfMemoryError", "MemoryError") or "out of memory" in str(exc).lower()


class ExecutorSlot:
    """A detector on its own worker thread. Use as an async context manager."""

    def __init__(self, name: str, detector: Detector, device: str = "cpu", hang_timeout: float = 10.0,
                 hang_factor: float = 10.0) -> None:
        self.name = name
        self.hang_timeout = hang_timeout  # floor of the watchdog; grows with measured service time
        self.hang_factor = hang_factor
        self.device = device
        self.detector = detector
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slot[{name}]")
        self.healthy = False
        self.batches = 0
        self.frames = 0
        self.errors = 0
        self.last_error: str | None = None
        self.service_ms_per_frame: float | None = None  # EWMA
        self.busy_since: float | None = None

    async def start(self, warmup: bool = True, calibrate: int = 0,
                    frame_shape: tuple[int, int, int] = (360, 640, 3)) -> None:
        """Load the model, warm it up, and (with `calibrate` = N) time one batch of N frames.

        The calibration seeds `service_ms_per_frame`, so placement knows a stream's cost before
        the first real batch.
        """
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self.detector.load)
        if warmup:
            await loop.run_in_executor(self._pool, self.detector.warmup)
        if calibrate:
            frames = [np.zeros(frame_shape, np.uint8)] * calibrate
            t0 = time.perf_counter()
            await loop.run_in_executor(self._pool, self.detector.infer, frames)
            self.service_ms_per_frame = (time.perf_counter() - t0) * 1000 / calibrate
        self.healthy = True

    async def infer(self, images: Sequence[np.ndarray]) -> list[Detections]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self.busy_since = time.monotonic()
        expected = (self.service_ms_per_frame or 0.0) * len(images) / 1000 * self.hang_factor
        limit = max(self.hang_timeout, expected)
        try:
            fut = loop.run_in_executor(self._pool, self.detector.infer, list(images))
            try:
                # the watchdog: a model call that never returns must not hold its streams hostage
                out = await asyncio.wait_for(asyncio.shield(fut), limit)
            except TimeoutError:
                raise SlotHang(f"slot {self.name}: batch of {len(images)} still running after {limit:.1f}s "
                               "(hang)") from None
        except Exception as exc:
            self.errors += 1
            self.last_error = str(exc)
            raise
        finally:
            self.busy_since = None
        if len(out) != len(images):
            self.errors += 1
            raise RuntimeError(f"slot {self.name}: model returned {len(out)} results for {len(images)} images")
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(images))
        prev = self.service_ms_per_frame
        self.service_ms_per_frame = ms if prev is None else 0.8 * prev + 0.2 * ms
        self.batches += 1
        self.frames += len(images)
        return out

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        self.healthy = False
        try:
            # bounded: after a hang the worker may never come back to run close()
            await asyncio.wait_for(loop.run_in_executor(self._pool, self.detector.close), 5.0)
        except TimeoutError:
            log.warning("slot %s: worker still busy; abandoning it", self.name)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> ExecutorSlot:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
