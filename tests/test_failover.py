"""Failover between two CPU slots running the real model: a slot whose model call raises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from detectors import Detections
from pipeline import ModelConfig, Pipeline, default_detector_factory, parse_config

from .conftest import MODEL, Mosquitto, Subscriber
from .test_e2e import detections


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
    pipeline = Pipeline(config, detector_factory=factory)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))

    async def until(pred: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():  # type: ignore[operator]
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        await asyncio.wait_for(pipeline.ready.wait(), 60)
        # placement spread the two streams over the two slots
        assert {tuple(s.streams) for s in pipeline.schedulers.values()} == {("a",), ("b",)}
        victim = next(n for n, s in pipeline.schedulers.items() if s.slot.detector is created[0])
        victim_stream = next(iter(pipeline.schedulers[victim].streams))
        await until(lambda: pipeline.slot_state[victim] == "restarting", 30, "the fault")
        t_fault = time.time()
        await until(lambda: any(m["captured_at"] > t_fault for m in detections(sub, victim_stream)), 10,
                    "a result of the migrated stream")
        first_after = min(m.at for m in sub.of(f"/streams/{victim_stream}/detections")
                          if m.json()["captured_at"] > t_fault)
        assert first_after - t_fault < 2.0
        await until(lambda: pipeline.slot_state[victim] == "healthy", 30, "the slot restarted")
        await asyncio.sleep(1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        sub.close()
    for name in ("a", "b"):
        seqs = [m["seq"] for m in detections(sub, name)]
        assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs), name
    other = "b" if victim_stream == "a" else "a"
    gaps = np.diff([m.at for m in sub.of(f"/streams/{other}/detections")])
    assert gaps.max() < 2.0  # the other stream never stalled
    dev = [m.json() for m in sub.of("/devices")]
    assert dev[-1]["slots"][victim]["state"] == "healthy"
    assert any(d["slots"][victim]["state"] == "restarting" and "CUDA error" in (d["slots"][victim]["last_error"] or "")
               for d in dev)
    # the devices topic told the story: the victim's stream was served by the other slot
    assert any(victim_stream in s["streams"] for d in dev for n, s in d["slots"].items() if n != victim)
