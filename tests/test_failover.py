"""Failover between two CPU slots running the real model: a slot whose model call raises."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from detectors import Detections
from pipeline import ModelConfig, Pipeline, default_detector_factory, parse_config
from tests.support.media import detections
from tests.support.procs import MODEL, Mosquitto, Subscriber, start_pipeline, wait_until


class RaisesAfter:
    """The real detector, but every call after the first `n` raises like a CUDA fault."""

    def __init__(self, inner: object, n: int) -> None:
        self.inner = inner
        self.n = n
        self.calls = 0
        self.name = inner.name  # type: ignore[attr-defined]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.inner.class_names  # type: ignore[attr-defined,no-any-return]

    def load(self) -> None:
        self.inner.load()  # type: ignore[attr-defined]

    def warmup(self) -> None:
        self.inner.warmup()  # type: ignore[attr-defined]

    def infer(self, images: Sequence[np.ndarray]) -> list[Detections]:
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return self.inner.infer(images)  # type: ignore[attr-defined,no-any-return]

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_raising_slot_streams_move_and_slot_restarts(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    created: list[object] = []

    def factory(name: str, cfg: ModelConfig) -> object:
        det = default_detector_factory(name, cfg)
        # the first slot's model breaks after 8 batches; its replacement after a restart is sound
        wrapped = RaisesAfter(det, 8) if not created else det
        created.append(wrapped)
        return wrapped

    config = parse_config(
        {
            "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix, "stats_interval": 1},
            "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320, "slots": 2,
                                  "threads": 1}},
            "streams": {
                "a": {"url": str(videos["cam1"]), "model": "shapes", "max_fps": 4},
                "b": {"url": str(videos["cam2"]), "model": "shapes", "max_fps": 4},
            },
            "pipeline": {"status_interval": 0},
        },
        tmp_path,
    )
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config, factory)


    try:
        # placement spread the two streams over the two slots
        pool = pipeline.models.pools["shapes"]
        assert {tuple(pool.members(n)) for n in pool.slots} == {("a",), ("b",)}
        victim = next(n for n, s in pool.slots.items() if s.model is created[0])
        victim_stream = pool.members(victim)[0]
        await wait_until(lambda: pool.state(victim) == "restarting", 30, "the fault")
        t_fault = time.time()
        await wait_until(lambda: any(m["captured_at"] > t_fault for m in detections(sub, victim_stream)), 10,
                    "a result of the migrated stream")
        first_after = min(m.at for m in sub.of(f"/streams/{victim_stream}/detections")
                          if m.json()["captured_at"] > t_fault)
        assert first_after - t_fault < 2.0
        await wait_until(lambda: pool.state(victim) == "healthy", 30, "the slot restarted")
        await asyncio.sleep(1)
    finally:
        await shutdown()
        sub.close()
    for name in ("a", "b"):
        seqs = [m["seq"] for m in detections(sub, name)]
        assert len(seqs) == len(set(seqs)), name
        assert seqs == sorted(seqs), name
    other = "b" if victim_stream == "a" else "a"
    gaps = np.diff([m.at for m in sub.of(f"/streams/{other}/detections")])
    assert gaps.max() < 2.0  # the other stream never stalled
    dev = [m.json() for m in sub.of("/devices")]
    assert dev[-1]["slots"][victim]["state"] == "healthy"
    assert any(d["slots"][victim]["state"] == "restarting" and "CUDA error" in (d["slots"][victim]["last_error"] or "")
               for d in dev)
    # the devices topic told the story: the victim's stream was served by the other slot
    assert any(victim_stream in s["streams"] for d in dev for n, s in d["slots"].items() if n != victim)


class Misbehaves(RaisesAfter):
    """The real detector with one fault injected after `n` calls: a hang, or out-of-memory above batch 1."""

    def __init__(self, inner: object, n: int, mode: str) -> None:
        super().__init__(inner, n)
        self.mode = mode
        self.batch_sizes: list[int] = []
        self.batched = 0  # calls with more than one frame so far
        self.first_oom: int | None = None  # index into batch_sizes of the first simulated OOM
        self.errors_running: dict[str, int] = {}  # each stream's `error` drops just before the stop
        if mode == "oom":
            import torch  # imported here, not in the worker thread (slow the first time: the watchdog is 1 s)

            self.oom = torch.OutOfMemoryError  # the type torch raises on a CUDA OOM: recognised by type, not text

    def infer(self, images: Sequence[np.ndarray]) -> list[Detections]:
        self.calls += 1
        self.batch_sizes.append(len(images))
        if self.mode == "hang" and self.calls == self.n + 1:
            time.sleep(6)  # far past the 1 s watchdog; finite so the test process can exit
        # out of memory at every batch above one from the third such batch on: when the cameras' phases
        # let batches form is up to the machine, so the fault counts batches, not calls
        self.batched += len(images) > 1
        if self.mode == "oom" and self.batched >= 3 and len(images) > 1:
            if self.first_oom is None:
                self.first_oom = len(self.batch_sizes) - 1
            raise self.oom("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.inner.infer(images)  # type: ignore[attr-defined,no-any-return]


async def run_two_slots(tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, prefix: str,
                        mode: str, seconds: float, max_fps: float | None = 3
                        ) -> tuple[Pipeline, Subscriber, Misbehaves]:
    created: list[object] = []

    def factory(name: str, cfg: ModelConfig) -> object:
        det = default_detector_factory(name, cfg)
        wrapped = Misbehaves(det, 6, mode) if not created else det
        created.append(wrapped)
        return wrapped

    streams = {f"s{i}": {"url": str(videos["cam1" if i % 2 else "cam2"]), "model": "shapes",
                         **({"max_fps": max_fps} if max_fps else {})} for i in range(4)}
    config = parse_config(
        {"mqtt": {"url": mosquitto.url, "topic_prefix": prefix, "stats_interval": 1},
         "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320, "slots": 2, "threads": 1,
                               "hang_timeout": 1.0, "batch_size": 4, "cpu_batch_ms": None}},
         "streams": streams, "pipeline": {"status_interval": 0, "batch_timeout_ms": 150}},
        tmp_path,
    )
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    pipeline, shutdown = await start_pipeline(config, factory)
    try:
        await asyncio.sleep(seconds)
        # while running: a batch in flight when the pipeline stops is counted as `error` at shutdown
        bad = created[0]
        assert isinstance(bad, Misbehaves)
        bad.errors_running = {n: r.stats.drops["error"] for n, r in pipeline.streams.items()}
    finally:
        await shutdown()
        sub.close()
    return pipeline, sub, created[0]  # type: ignore[return-value]


@pytest.mark.slow
async def test_hung_slot_is_caught_by_the_watchdog(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    pipeline, sub, bad = await run_two_slots(tmp_path, videos, mosquitto, topic_prefix, "hang", 12)
    assert bad.calls > bad.n  # the hang happened
    dev = [m.json() for m in sub.of("/devices")]
    states = [s["state"] for d in dev for s in d["slots"].values()]
    assert "restarting" in states
    assert any("hang" in (s["last_error"] or "") for d in dev for s in d["slots"].values())
    for i in range(4):
        msgs = detections(sub, f"s{i}")
        seqs = [m["seq"] for m in msgs]
        assert len(seqs) == len(set(seqs))
        assert seqs == sorted(seqs)
        gaps = np.diff([m["published_at"] for m in msgs])
        assert gaps.max() < 1.0 + 2.0, f"s{i} interrupted for {gaps.max():.1f}s"  # watchdog + one move
        # every dispatched frame is accounted for: processed, or dropped with a reason (the hung batch's
        # frames, and a batch in flight when the pool stopped at shutdown, as errors)
        st = pipeline.streams[f"s{i}"].stats  # (records outlive the shutdown)
        assert st.dispatched == st.processed + st.drops["error"], (i, st.dispatched, st.processed, st.drops)


@pytest.mark.slow
async def test_out_of_memory_retries_at_half_batch(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    # full-rate 15 fps cameras, two per slot: their frames are due within the batch timeout, so batches of 2 form
    pipeline, sub, bad = await run_two_slots(tmp_path, videos, mosquitto, topic_prefix, "oom", 8, max_fps=None)
    first_oom = bad.first_oom
    assert first_oom is not None, bad.batch_sizes  # batches formed and the fault happened
    assert sum(size > 1 for size in bad.batch_sizes[:first_oom]) == 2  # two batches ran whole before it
    after = bad.batch_sizes[first_oom + 1:]
    assert after
    assert max(after[1:] or [1]) == 1
    # the frames were retried, not lost (while running; a stop may cut one batch in flight, counted)
    assert bad.errors_running == dict.fromkeys(("s0", "s1", "s2", "s3"), 0), bad.errors_running
    for i in range(4):
        stream = pipeline.streams.get(f"s{i}")
        assert stream is not None
        assert stream.stats.drops["error"] <= 1
    dev = [m.json() for m in sub.of("/devices")]
    assert all(s["state"] == "healthy" for s in dev[-1]["slots"].values())


@pytest.mark.slow
async def test_rebalance_moves_streams_losslessly(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    streams = {f"s{i}": {"url": str(videos["cam1" if i % 2 else "cam2"]), "model": "shapes", "max_fps": 4}
               for i in range(4)}
    config = parse_config(
        {"mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
         "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320, "slots": 2, "threads": 1}},
         "streams": streams, "pipeline": {"status_interval": 0, "rebalance_interval": 0}},
        tmp_path,
    )
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config)
    try:
        await asyncio.sleep(2)
        pool = pipeline.models.pools["shapes"]
        a, b = sorted(pool.slots)
        on_a = pool.members(a)
        assert len(on_a) == 2
        assert len(pool.members(b)) == 2
        for name in on_a:  # empty one slot: now 0 vs 2
            await pipeline.running.remove_stream(name)
        moves = pipeline.models.rebalance()
        assert len(moves) == 1
        assert moves[0].target == a
        moved = moves[0].stream
        t_move = time.time()
        await asyncio.sleep(3)
        assert len(pool.members(a)) == 1
        assert len(pool.members(b)) == 1
    finally:
        await shutdown()
        sub.close()
    msgs = detections(sub, moved)
    seqs = [m["seq"] for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # continuous: nothing lost or repeated
    times = [m["published_at"] for m in msgs]
    around = [t2 - t1 for t1, t2 in itertools.pairwise(times) if t1 < t_move + 1 and t2 > t_move - 1]
    assert around
    assert max(around) < 1.0
