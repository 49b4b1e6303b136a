"""Adding and removing streams while the pipeline runs (the Python API), with the real model."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pipeline import Config, StreamConfig, parse_config
from tests.support.media import detections
from tests.support.procs import MODEL, Mosquitto, Subscriber, start_pipeline, wait_until


def stream_a_config(tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str) -> Config:
    """One stream `a` (cam1 at 5 fps) on the shapes model, stats every second."""
    return parse_config(
        {
            "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix, "stats_interval": 1},
            "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
            "streams": {"a": {"url": str(videos["cam1"]), "model": "shapes", "max_fps": 5}},
            "pipeline": {"status_interval": 0},
        },
        tmp_path,
    )


@pytest.mark.slow
async def test_add_and_remove_streams_at_runtime(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    config = stream_a_config(tmp_path, videos, mosquitto, topic_prefix)
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config)


    try:
        await wait_until(lambda: len(detections(sub, "a")) >= 5, 30, "stream a detecting")
        await pipeline.running.add_stream("b", StreamConfig(url=str(videos["cam2"]), model="shapes", max_fps=5))
        with pytest.raises(ValueError, match="already exists"):
            await pipeline.running.add_stream("b", StreamConfig(url=str(videos["cam2"]), model="shapes"))
        with pytest.raises(ValueError, match="unknown model"):
            await pipeline.running.add_stream("c", StreamConfig(url=str(videos["cam2"]), model="nope"))
        await wait_until(lambda: len(detections(sub, "b")) >= 5, 30, "added stream b detecting")
        await pipeline.running.remove_stream("a")
        removed_at = time.time()
        n_b = len(detections(sub, "b"))
        await asyncio.sleep(2)
        assert len(detections(sub, "b")) >= n_b + 5  # b unaffected by removing a
        assert not [m for m in sub.of("/streams/a/detections") if m.at > removed_at + 0.5]
        assert "a" not in pipeline.stats_payload()["streams"]
    finally:
        await shutdown()
        sub.close()
    a_states = [m.payload for m in sub.of("/streams/a/state")]
    assert a_states[-1] == b""  # retained state cleared
    assert b'"state":"stopped"' in a_states[-2]


@pytest.mark.slow
async def test_admission_control_refuses_what_fits_nowhere(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    config = parse_config(
        {
            "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
            "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
            "streams": {"ok": {"url": str(videos["cam1"]), "model": "shapes", "max_fps": 2},
                        "huge": {"url": str(videos["cam2"]), "model": "shapes", "max_fps": 900}},
            "pipeline": {"status_interval": 0, "admission_control": True},
        },
        tmp_path,
    )
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config)
    try:
        await asyncio.sleep(2)
        huge = pipeline.streams["huge"]
        assert huge.state == "refused"
        assert "needs" in str(huge.error)
        assert huge.source is None  # never started decoding
        assert pipeline.streams["ok"].state == "streaming"
    finally:
        await shutdown()
        sub.close()


@pytest.mark.slow
async def test_add_and_remove_models_at_runtime(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    from detectors import DetectorError
    from pipeline import ModelConfig

    config = stream_a_config(tmp_path, videos, mosquitto, topic_prefix)
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config)
    try:
        await wait_until(lambda: len(detections(sub, "a")) >= 3, 30, "stream a detecting")
        await pipeline.running.add_model("shapes640", ModelConfig(type="yolo", weights=MODEL, imgsz=640, slots=1))
        with pytest.raises(ValueError, match="already exists"):
            await pipeline.running.add_model("shapes640", ModelConfig(type="yolo", weights=MODEL))
        with pytest.raises(DetectorError, match="weights file not found"):
            await pipeline.running.add_model("ghost", ModelConfig(type="yolo", weights=tmp_path / "ghost.pt"))
        assert "ghost" not in pipeline.models.names()
        assert "ghost" not in pipeline.models.pools
        await pipeline.running.add_stream("b", StreamConfig(url=str(videos["cam2"]), model="shapes640", max_fps=5))
        await wait_until(lambda: len(detections(sub, "b")) >= 3, 30, "stream b on the added model")
        assert {m["model"] for m in detections(sub, "b")} == {"shapes640"}
        with pytest.raises(ValueError, match="still serves stream\\(s\\) b"):
            await pipeline.running.remove_model("shapes640")
        await pipeline.running.remove_stream("b")
        await pipeline.running.remove_model("shapes640")
        assert "shapes640" not in pipeline.models.pools
        assert "shapes640" not in pipeline.models.names()
        assert set(pipeline.config.models) == {"shapes"}  # the config as read was never mutated
        n_a = len(detections(sub, "a"))
        await asyncio.sleep(1.5)
        assert len(detections(sub, "a")) >= n_a + 4  # the other model's stream never noticed
    finally:
        await shutdown()
        sub.close()
    last_devices = [m.json() for m in sub.of("/devices")][-1]
    planned = min(os.cpu_count() or 1, 4)  # devices.cpu_slots default: one per core, at most 4
    assert set(last_devices["slots"]) == {f"shapes.{i}" for i in range(planned)}  # the removed model's are gone
