"""Draining a device through the API moves its streams to another device and back on resume.

Two GPUs are invented (device facts only): their slots run the real model on the CPU, so the
placement, drain and resume logic is exercised as on a two-GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pipeline import ModelConfig, default_detector_factory, parse_config
from pipeline.app import Pipeline
from pipeline.core.devices import GB, DeviceInfo
from tests.support.media import detections
from tests.support.procs import MODEL, Mosquitto, Subscriber, wait_until

GPUS = [DeviceInfo(f"cuda:{i}", "cuda", "invented GPU", 8 * GB, 8 * GB, 0.0) for i in range(2)]
CPU = DeviceInfo("cpu", "cpu", "CPU", 16 * GB, 12 * GB, None, 2)


def on_cpu(name: str, cfg: ModelConfig) -> object:
    return default_detector_factory(name, cfg.model_copy(update={"device": "cpu", "backend": "torch"}))


@pytest.mark.slow
async def test_drain_and_resume_a_device_through_the_api(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    from pipeline.api import local_api

    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320, "slots": 2, "threads": 1}},
        "streams": {"a": {"url": str(videos["cam1"]), "model": "shapes", "max_fps": 4},
                    "b": {"url": str(videos["cam2"]), "model": "shapes", "max_fps": 4}},
        "pipeline": {"status_interval": 0, "rebalance_interval": 0},
        "api": {"listen": "127.0.0.1:0"},
    }, tmp_path)
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline = Pipeline(config, detector_factory=on_cpu, devices=[*GPUS, CPU])
    api = local_api(pipeline, None)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app), base_url="http://framegrid")
    try:
        async with pipeline:
            pool = pipeline.models.pools["shapes"]
            assert sorted(pool.devices) == ["cuda:0", "cuda:1"]
            device_of = {s: pool.slots[pool.slot_of(s)].device for s in ("a", "b")}  # type: ignore[index]
            assert sorted(device_of.values()) == ["cuda:0", "cuda:1"]  # one stream per GPU
            await wait_until(lambda: all(len(detections(sub, s)) >= 3 for s in "ab"), 60, "results from a and b")

            res = await client.post("/api/devices/cuda:0/drain")
            assert res.status_code == 200, res.text
            moved = res.json()["moved"]
            on_0 = next(s for s, d in device_of.items() if d == "cuda:0")
            assert [m["stream"] for m in moved] == [on_0]
            assert moved[0]["target"].startswith("shapes.")
            assert {pool.slots[pool.slot_of(s)].device for s in "ab"} == {"cuda:1"}  # type: ignore[index]
            devices = {d["id"]: d for d in (await client.get("/api/devices")).json()}
            assert devices["cuda:0"]["drained"]
            assert all(s["state"] == "drained" and not s["streams"]
                                                        for s in devices["cuda:0"]["slots"])
            n = len(detections(sub, on_0))
            await wait_until(lambda: len(detections(sub, on_0)) >= n + 8, 30, f"{on_0} publishing from cuda:1")
            # the last device with slots cannot be drained too: its streams would have nowhere to go
            res = await client.post("/api/devices/cuda:1/drain")
            assert res.status_code == 409
            assert "no healthy slot on another device" in res.json()["detail"]

            res = await client.post("/api/devices/cuda:0/resume")
            assert res.status_code == 200
            assert {pool.slots[pool.slot_of(s)].device for s in "ab"} == {"cuda:0", "cuda:1"}  # type: ignore[index]
            assert not (await client.get("/api/devices")).json()[0]["drained"]
            assert (await client.post("/api/devices/cuda:9/drain")).status_code == 404
            seqs = [m["seq"] for m in detections(sub, on_0)]
            assert seqs == sorted(seqs)
            assert len(set(seqs)) == len(seqs)
    finally:
        await client.aclose()
        sub.close()
