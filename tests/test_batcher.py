"""Batching rules of the one slot machinery, with a fake detector injected through the pool's factory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from detectors import Detections
from pipeline import DetectJobs, PoolSettings, Result, Results, SlotPool, StreamConfig, StreamFeed, StreamRecord
from pipeline.core.stats import StreamStats
from streams import SYSTEM_CLOCK, Frame, Mailbox
from streams.handoff import Handoff


class FakeDetector:
    """Sleeps `delay` per batch plus `per_frame` per frame (releasing the GIL, like a model) and
    records batch sizes."""

    name = "fake"
    class_names = ("thing",)

    def __init__(self, delay: float = 0.01, fail_on: set[int] | None = None, per_frame: float = 0.0) -> None:
        self.delay = delay
        self.per_frame = per_frame
        self.fail_on = fail_on or set()
        self.batches: list[int] = []

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def close(self) -> None: ...

    def infer(self, images: Sequence[np.ndarray]) -> list[Detections]:
        self.batches.append(len(images))
        time.sleep(self.delay + self.per_frame * len(images))
        if len(self.batches) in self.fail_on:
            raise RuntimeError("model exploded")
        return [Detections.empty() for _ in images]


class Collect:
    """A result sink keeping (stream, frame index, result)."""

    def __init__(self) -> None:
        self.results: list[Result] = []

    def emit(self, result: Result) -> None:
        self.results.append(result)

    def of(self, stream: str) -> list[int]:
        return [r.frame.index for r in self.results if r.stream.name == stream]


def frame(stream: str, i: int, age: float = 0.0) -> Frame:
    return Frame(stream, i, np.zeros((8, 8, 3), np.uint8), time.time() - age, None, 0.0, time.monotonic() - age)


def record(name: str, max_fps: float | None = None) -> StreamRecord:
    mailbox = Mailbox(name)
    return StreamRecord(name, StreamConfig(url=f"{name}.mp4", model="m", max_fps=max_fps), mailbox,
                        StreamStats(mailbox))


def settings(batch_size: int = 4, batch_timeout: float = 0.01, cpu_batch_ms: float | None = None) -> PoolSettings:
    return PoolSettings(batch_size, batch_timeout, hang_timeout=10.0, restart_budget=3, restart_window=300.0,
                        restart_backoff_cap=1.0, admission_control=False, rebalance_band=0.1,
                        cpu_batch_ms=cpu_batch_ms)


async def producer(mailbox: Mailbox, stream: str, fps: float, seconds: float, offset: float = 0.0) -> None:
    """Feeds frames from a thread, like a decoder."""

    def run() -> None:
        time.sleep(offset)
        t_end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < t_end:
            mailbox.put(frame(stream, i))
            i += 1
            time.sleep(1 / fps)

    await asyncio.to_thread(run)


async def run_pool(det: FakeDetector, streams: dict[str, tuple[float, float | None]], seconds: float,
                   batch_size: int = 4, batch_timeout: float = 0.01, max_age: float = 1.0, offsets: float = 0.0,
                   cpu_batch_ms: float | None = None) -> tuple[SlotPool, dict[str, StreamRecord], Collect]:
    sink = Collect()
    pool = SlotPool("m", lambda i: det, ["cpu"], DetectJobs("m", None, Results(SYSTEM_CLOCK, [sink]), SYSTEM_CLOCK),
                    settings(batch_size, batch_timeout, cpu_batch_ms))
    await pool.start()
    records = {}
    for name, (_, max_fps) in streams.items():
        records[name] = record(name, max_fps)
        pool.place(StreamFeed(records[name], max_age))
    await asyncio.gather(*(producer(records[n].mailbox, n, fps, seconds, offset=offsets * k)
                           for k, (n, (fps, _)) in enumerate(streams.items())))
    await asyncio.sleep(0.1)
    await pool.close()
    return pool, records, sink


async def test_fair_across_streams_when_the_model_is_the_bottleneck() -> None:
    # 4 streams at 30 fps, batches of 2 at 25 ms: the model can take ~80 of 120 frames/s
    det = FakeDetector(delay=0.025)
    _, records, sink = await run_pool(det, {f"s{i}": (30, None) for i in range(4)}, 2.0, batch_size=2)
    counts = [len(sink.of(name)) for name in records]
    assert min(counts) / max(counts) >= 0.8, counts
    assert all(r.mailbox.dropped_stale > 0 for r in records.values())  # overwritten, counted
    assert max(det.batches) == 2
    assert np.mean(det.batches) > 1.8  # under overload batches fill


async def test_a_cpu_slot_batches_cheap_frames_and_runs_costly_ones_alone() -> None:
    """Overloaded by 4 streams: with 4 ms per frame batches of 4 fit in cpu_batch_ms = 30; with
    25 ms per frame a second frame would not, so each runs alone (the time per frame is measured)."""
    cheap = FakeDetector(delay=0.0, per_frame=0.004)
    await run_pool(cheap, {f"s{i}": (60, None) for i in range(4)}, 1.5, batch_size=4, cpu_batch_ms=30)
    assert max(cheap.batches[2:]) == 4, cheap.batches
    assert np.mean(cheap.batches[2:]) > 2.5, cheap.batches
    costly = FakeDetector(delay=0.0, per_frame=0.025)
    _, records, sink = await run_pool(costly, {f"s{i}": (30, None) for i in range(4)}, 1.5, batch_size=4,
                                      cpu_batch_ms=30)
    assert set(costly.batches[2:]) == {1}, costly.batches  # once the first batches measured the time per frame
    counts = [len(sink.of(name)) for name in records]
    assert min(counts) / max(counts) >= 0.8, counts  # still round robin


async def test_max_fps_is_honoured() -> None:
    _, _, sink = await run_pool(FakeDetector(0.002), {"fast": (30, 5.0), "free": (30, None)}, 2.0)
    fast, free = len(sink.of("fast")), len(sink.of("free"))
    assert 8 <= fast <= 11, fast  # 5 fps for 2 s
    assert free >= 45, free


async def test_a_lone_stream_never_waits_for_a_batch() -> None:
    det = FakeDetector(0.001)
    _, _, sink = await run_pool(det, {"only": (20, None)}, 1.0, batch_size=8, batch_timeout=0.5)
    assert len(sink.of("only")) >= 15
    assert set(det.batches) == {1}  # nothing else is due: a lone stream's frame runs at once
    queue = [r.timings_ms["queue"] for r in sink.results]
    assert np.median(queue) < 5.0, np.median(queue)  # not the 500 ms timeout, not a tick


async def test_frames_arriving_while_the_slot_is_busy_do_not_wake_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame put while every batcher of the device runs a batch wakes nobody (the batcher finds it
    when the batch is done); one put while a batcher waits for work wakes it at once."""
    calls = []
    real = Handoff.call

    def counted(self: Handoff, fn: Any, *args: Any) -> None:
        calls.append(fn)
        real(self, fn, *args)

    monkeypatch.setattr(Handoff, "call", counted)
    busy = FakeDetector(0.05)  # 20 batches a second for 100 frames a second
    _, _, sink = await run_pool(busy, {"a": (50, None), "b": (50, None)}, 1.0, batch_size=2)
    wakes = len(calls)
    assert sum(len(sink.of(n)) for n in "ab") >= 25, busy.batches  # every batch served its frames
    assert wakes < 0.3 * 100, wakes  # not one a frame
    calls.clear()
    idle = FakeDetector(0.001)
    _, _, sink = await run_pool(idle, {"a": (20, None)}, 1.0)
    assert len(sink.of("a")) >= 15
    assert len(calls) >= 0.8 * len(sink.of("a")), len(calls)  # waiting: every frame wakes it
    queue = [r.timings_ms["queue"] for r in sink.results]
    assert np.median(queue) < 5.0, np.median(queue)


async def test_a_waker_hands_off_only_while_someone_listens() -> None:
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    listening = [False]
    waker = Handoff(loop).waker(event, listening=lambda: listening[0])
    await asyncio.to_thread(waker)
    await asyncio.sleep(0.01)
    assert not event.is_set()
    listening[0] = True
    await asyncio.to_thread(waker)
    await asyncio.sleep(0.01)
    assert event.is_set()


async def test_waits_for_frames_due_within_the_timeout() -> None:
    """Two 10 fps cameras 4 ms apart: waiting pays (the other frame is due), so batches of 2 form;
    with a 1 ms timeout waiting cannot pay, and each frame runs alone at once."""
    det = FakeDetector(0.001)
    await run_pool(det, {"a": (10, None), "b": (10, None)}, 2.0, batch_size=2, batch_timeout=0.05,
                   offsets=0.004)
    later = det.batches[4:]  # once both arrival intervals are measured
    assert later, det.batches
    assert np.mean(later) > 1.7, det.batches
    det2 = FakeDetector(0.001)
    # 30 ms apart: nothing waits; a pair forms only when the loop was more than 30 ms late and both
    # frames were already there (4 ms apart, a loaded machine made pairs of a third of them)
    await run_pool(det2, {"a": (10, None), "b": (10, None)}, 1.0, batch_size=2, batch_timeout=0.001, offsets=0.03)
    singles = det2.batches[4:].count(1)
    assert singles >= 0.8 * len(det2.batches[4:]), det2.batches
    assert len(det2.batches[4:]) >= 8, det2.batches


async def test_old_frames_are_dropped_not_inferred() -> None:
    det = FakeDetector(0.001)
    sink = Collect()
    pool = SlotPool("m", lambda i: det, ["cpu"], DetectJobs("m", None, Results(SYSTEM_CLOCK, [sink]), SYSTEM_CLOCK),
                    settings())
    await pool.start()
    rec = record("s")
    pool.place(StreamFeed(rec, 0.5))
    await asyncio.sleep(0.05)
    rec.mailbox.put(frame("s", 1, age=2.0))
    await asyncio.sleep(0.1)
    rec.mailbox.put(frame("s", 2, age=0.0))
    await asyncio.sleep(0.1)
    await pool.close()
    assert sink.of("s") == [2]
    assert rec.stats.drops["too_old"] == 1


async def test_a_failing_batch_costs_only_that_batch_and_the_slot_restarts() -> None:
    det = FakeDetector(0.005, fail_on={4})  # the 4th model call raises (no calibration call here)
    pool, records, sink = await run_pool(det, {"a": (20, None)}, 1.5)
    assert records["a"].stats.drops["error"] >= 1
    assert len(sink.of("a")) >= 12  # it went on after the failure (on the restarted slot)
    record_ = pool.placer.slots["m.0"]
    assert len(record_.restarts) == 1
    assert "model exploded" in (record_.last_error or "")


async def test_restart_budget_then_failed() -> None:
    """One rule for every pool: `restart_budget` restarts within the window, the next fault leaves the slot failed."""
    det = FakeDetector(0.001, fail_on=set(range(2, 100)))  # every call after the first raises
    sink = Collect()
    pool = SlotPool("m", lambda i: det, ["cpu"], DetectJobs("m", None, Results(SYSTEM_CLOCK, [sink]), SYSTEM_CLOCK),
                    PoolSettings(4, 0.01, 10.0, restart_budget=2, restart_window=300.0, restart_backoff_cap=0.1,
                                 admission_control=False, rebalance_band=0.1))
    await pool.start()
    rec = record("s")
    pool.place(StreamFeed(rec, 1.0))
    try:
        deadline = time.monotonic() + 10
        while pool.state("m.0") != "failed" and time.monotonic() < deadline:
            rec.mailbox.put(frame("s", 0))
            await asyncio.sleep(0.02)
        assert pool.state("m.0") == "failed"
        assert len(pool.placer.slots["m.0"].restarts) == 2
        assert rec.stats.drops["error"] == 3
    finally:
        await pool.close()


async def test_restart_backoff_escalates_within_a_run_of_faults_only() -> None:
    """A slot that faults again right after its restart escalates its backoff; one that served for
    `restart_stable_s` first starts again from the shortest delay (it used to count every restart in
    the 5-minute window, so a slot faulting now and then waited up to the cap)."""
    import dataclasses

    det = FakeDetector(0.005, fail_on={3, 4, 60})  # 3: a fault; 4: the restarted slot's first call; 60: much later
    sink = Collect()
    pool = SlotPool("m", lambda i: det, ["cpu"], DetectJobs("m", None, Results(SYSTEM_CLOCK, [sink]), SYSTEM_CLOCK),
                    dataclasses.replace(settings(), restart_backoff_cap=0.05, restart_stable_s=0.5))
    await pool.start()
    rec = record("s")
    pool.place(StreamFeed(rec, 1.0))
    slot = pool.placer.slots["m.0"]
    streaks = []
    try:
        deadline = time.monotonic() + 15
        while len(slot.restarts) < 3 and time.monotonic() < deadline:
            rec.mailbox.put(frame("s", 0))
            if slot.restarts and (not streaks or streaks[-1][0] != len(slot.restarts)):
                streaks.append((len(slot.restarts), slot.streak))
            await asyncio.sleep(0.02)
        streaks.append((len(slot.restarts), slot.streak))
    finally:
        await pool.close()
    # restart 1 (streak 1), restart 2 at once after it (streak 2), restart 3 after ~1 s of service (reset: 1)
    assert [s for _, s in dict(streaks).items()] == [1, 2, 1], streaks


def test_out_of_memory_is_recognised_by_type_not_text() -> None:
    import torch

    from pipeline.errors import SlotOutOfMemory, is_out_of_memory, slot_error

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("CUDA out of memory (a message, not the type)"))
    assert isinstance(slot_error("m.0", torch.OutOfMemoryError("x")), SlotOutOfMemory)
    assert "m.0" in str(slot_error("m.0", RuntimeError("boom")))


async def test_a_rate_limited_stream_serves_the_frame_nearest_its_due_time() -> None:
    """15 fps in, max_fps 10 out: the rate holds, and a frame is not held back until its stream is due
    (that only aged it: the queue stage was about half a frame interval, ~17 ms at the median)."""
    _, _, sink = await run_pool(FakeDetector(0.002), {"s": (15, 10.0)}, 3.0)
    assert 27 <= len(sink.of("s")) <= 32, len(sink.of("s"))
    queue = [r.timings_ms["queue"] for r in sink.results]
    assert np.median(queue) < 5.0, np.median(queue)


async def test_a_batch_still_forming_when_the_pool_stops_is_counted_not_lost() -> None:
    """A frame of `a` waits (timeout 1 s) for the frame of the 1 fps camera `b` that is due; the pool
    stops meanwhile. The waiting frame was dispatched: it counts as an error, so for every stream
    dispatched = processed + error."""
    det = FakeDetector(0.001)
    sink = Collect()
    pool = SlotPool("m", lambda i: det, ["cpu"], DetectJobs("m", None, Results(SYSTEM_CLOCK, [sink]), SYSTEM_CLOCK),
                    settings(batch_size=2, batch_timeout=1.0))
    await pool.start()
    records = {n: record(n) for n in ("a", "b")}
    for r in records.values():
        pool.place(StreamFeed(r, 5.0))
    await producer(records["b"].mailbox, "b", 1, 3.0)  # returns 1 s after its last frame: the next is due now
    records["a"].mailbox.put(frame("a", 0))
    await asyncio.sleep(0.2)  # taken, waiting for b's
    a = records["a"].stats
    assert (a.dispatched, a.processed) == (1, 0)  # it is in the forming batch
    await pool.close()
    assert a.drops["error"] == 1
    for r in records.values():
        assert r.stats.dispatched == r.stats.processed + r.stats.drops["error"], r.stats


def test_stats_percentile_is_numpys_linear_percentile() -> None:
    from collections import deque

    from pipeline.core.stats import percentile

    rng = np.random.default_rng(3)
    assert percentile([], 50) is None
    for n in (1, 2, 3, 7, 512):
        ring = deque(rng.exponential(20.0, n).tolist(), maxlen=512)
        for q in (0, 5, 50, 95, 99, 100):
            assert abs(percentile(ring, q) - float(np.percentile(np.array(ring), q))) < 1e-9, (n, q)  # type: ignore[operator]
