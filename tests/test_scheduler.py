"""Scheduler rules with a fake detector injected through the slot's constructor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import pytest

from detectors import Detections
from pipeline import ExecutorSlot, Scheduler, StreamHandle, StreamStats
from streams import Frame, LatestFrame


class FakeDetector:
    """Sleeps `delay` per batch (releasing the GIL, like a model) and records batch sizes."""

    name = "fake"
    class_names = ("thing",)

    def __init__(self, delay: float = 0.01, fail_on: set[int] | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on or set()
        self.batches: list[int] = []

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def close(self) -> None: ...

    def infer(self, images: Sequence[np.ndarray]) -> list[Detections]:
        self.batches.append(len(images))
        time.sleep(self.delay)
        if len(self.batches) in self.fail_on:
            raise RuntimeError("model exploded")
        return [Detections.empty() for _ in images]


def frame(stream: str, i: int, age: float = 0.0) -> Frame:
    return Frame(stream, i, np.zeros((8, 8, 3), np.uint8), time.time() - age, None, 0.0, time.monotonic() - age)


async def producer(slot: LatestFrame, stream: str, fps: float, seconds: float) -> None:
    """Feeds frames from a thread, like a decoder."""

    def run() -> None:
        t_end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < t_end:
            slot.put(frame(stream, i))
            i += 1
            time.sleep(1 / fps)

    await asyncio.to_thread(run)


async def run_sched(det: FakeDetector, streams: dict[str, tuple[float, float | None]], seconds: float,
                    batch_size: int = 4, batch_timeout: float = 0.01, max_age: float = 1.0
                    ) -> tuple[Scheduler, dict[str, StreamHandle], list[tuple[str, int]]]:
    slot = ExecutorSlot("t.0", det)
    await slot.start(warmup=False)
    results: list[tuple[str, int]] = []
    sched = Scheduler(slot, lambda out: results.extend((h.stream, f.index) for h, f, _, _ in out),
                      batch_size=batch_size, batch_timeout=batch_timeout, max_frame_age=max_age)
    handles = {}
    for name, (_, max_fps) in streams.items():
        h = StreamHandle(name, LatestFrame(name), StreamStats(name), max_fps)
        sched.add_stream(h)
        handles[name] = h
    task = asyncio.create_task(sched.run())
    await asyncio.gather(*(producer(handles[n].slot, n, fps, seconds) for n, (fps, _) in streams.items()))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await slot.close()
    return sched, handles, results


async def test_fair_across_streams_when_the_model_is_the_bottleneck() -> None:
    # 4 streams at 30 fps, batches of 2 at 25 ms: the model can take ~80 of 120 frames/s
    det = FakeDetector(delay=0.025)
    _, handles, results = await run_sched(det, {f"s{i}": (30, None) for i in range(4)}, 2.0, batch_size=2)
    counts = [sum(1 for s, _ in results if s == name) for name in handles]
    assert min(counts) / max(counts) >= 0.8, counts
    assert all(h.slot.dropped_stale > 0 for h in handles.values())  # overwritten, counted
    assert max(det.batches) == 2


async def test_max_fps_is_honoured() -> None:
    _, handles, results = await run_sched(FakeDetector(0.002), {"fast": (30, 5.0), "free": (30, None)}, 2.0)
    fast = sum(1 for s, _ in results if s == "fast")
    free = sum(1 for s, _ in results if s == "free")
    assert 8 <= fast <= 11, fast  # 5 fps for 2 s
    assert free >= 45, free


async def test_batch_ships_at_deadline_not_when_full() -> None:
    det = FakeDetector(0.001)
    sched, _, results = await run_sched(det, {"only": (20, None)}, 1.0, batch_size=8, batch_timeout=0.005)
    assert len(results) >= 15
    assert set(det.batches) == {1}  # a lone stream never waits for a batch of 8


async def test_old_frames_are_dropped_not_inferred() -> None:
    det = FakeDetector(0.001)
    slot = ExecutorSlot("t.0", det)
    await slot.start(warmup=False)
    results: list[int] = []
    sched = Scheduler(slot, lambda out: results.extend(f.index for _, f, _, _ in out), max_frame_age=0.5)
    h = StreamHandle("s", LatestFrame("s"), StreamStats("s"))
    sched.add_stream(h)
    task = asyncio.create_task(sched.run())
    await asyncio.sleep(0.05)
    h.slot.put(frame("s", 1, age=2.0))
    await asyncio.sleep(0.1)
    h.slot.put(frame("s", 2, age=0.0))
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await slot.close()
    assert results == [2]
    assert h.stats.drops["too_old"] == 1


async def test_a_failing_batch_costs_only_that_batch() -> None:
    det = FakeDetector(0.005, fail_on={3})
    sched, handles, results = await run_sched(det, {"a": (20, None)}, 1.0)
    assert handles["a"].stats.drops["error"] >= 1
    assert len(results) >= 12  # it went on after the failure
    assert sched.slot.errors == 1
