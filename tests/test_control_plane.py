"""One control plane: the same routes, checked the same way against one process and against a
cluster head placing the streams on a two-node Ray cluster (real `framegrid run` processes, real
Mosquitto, the real model)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.configs import TOKEN, env_with_token, wait_ready, write_api_config
from tests.support.procs import Framegrid, Mosquitto, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", params=["process", "cluster"])
def plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path],
          mosquitto: Mosquitto) -> Iterator[tuple[str, httpx.Client]]:
    tmp = tmp_path_factory.mktemp(f"plane-{request.param}")
    port = free_port()
    cluster: Any = None
    extra = ""
    if request.param == "cluster":
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"framegrid": 1})
        extra = f'[cluster]\nbackend = "ray"\naddress = "{cluster.address}"\nping_s = 0.5\n'
    cfg = write_api_config(tmp / "fg.toml", f"fgplane-{request.param}-{os.getpid()}", mosquitto, port,
                           {"cam1": str(videos["cam1"]), "cam2": str(videos["cam2"])}, extra=extra)
    env = env_with_token({**os.environ, "FRAMEGRID_STATE_DIR": str(tmp / "state"), "PYTHONUNBUFFERED": "1"})
    fg = Framegrid(cfg, env, tmp / "fg.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        wait_ready(client, 240)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both cameras processed once, and (a cluster) both nodes up
            published = all(s["published"] > 0 for s in client.get("/api/streams").json())
            up = cluster is None or [n["state"] for n in client.get("/api/nodes").json()] == ["up", "up"]
            if published and up:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"not serving after 120 s: {client.get('/api/streams').text}")
        yield request.param, client
    finally:
        client.close()
        rc = fg.stop()
        if cluster is not None:
            cluster.shutdown()
        assert rc == 0, fg.output()[-3000:]


def test_streams_are_listed_with_their_figures(plane: tuple[str, httpx.Client]) -> None:
    kind, api = plane
    listed = {s["name"]: s for s in api.get("/api/streams").json()}
    assert set(listed) == {"cam1", "cam2"}
    for s in listed.values():
        assert s["state"] == "streaming", s
        assert s["published"] > 0, s
        assert s["slot"], s
        assert (s["node"] is not None) == (kind == "cluster"), s
    assert api.get("/api/streams/cam1").json()["name"] == "cam1"
    missing = api.get("/api/streams/nope")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no stream nope"}


def test_a_snapshot_and_the_live_view(plane: tuple[str, httpx.Client]) -> None:
    _, api = plane
    jpeg = api.get("/api/streams/cam1/snapshot.jpg?boxes=1")
    assert jpeg.status_code == 200, jpeg.text
    assert jpeg.content[:2] == b"\xff\xd8"
    assert int(jpeg.headers["x-frame-seq"]) > 0
    with api.stream("GET", "/api/streams/cam2/mjpeg?fps=4") as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("multipart/x-mixed-replace")
        assert res.headers["x-accel-buffering"] == "no"
        buf = b""
        for chunk in res.iter_bytes():
            buf += chunk
            if buf.count(b"\xff\xd9") >= 2:  # two whole pictures arrived
                break
    assert buf.startswith(b"--frame\r\nContent-Type: image/jpeg")


def test_models_say_where_they_serve(plane: tuple[str, httpx.Client]) -> None:
    kind, api = plane
    (model,) = api.get("/api/models").json()
    assert model["name"] == "shapes"
    assert model["loaded"] is True
    assert model["imgsz"] == 320
    if kind == "cluster":
        assert len(model["nodes"]) == 2, model
    else:
        assert model["nodes"] is None
        assert {"circle", "square", "triangle"} <= set(model["classes"])


def test_a_stream_added_changed_and_removed(plane: tuple[str, httpx.Client], videos: dict[str, Path]) -> None:
    _, api = plane
    r = api.post("/api/streams", json={"name": "cam3", "url": str(videos["cam1"]), "model": "shapes", "max_fps": 2})
    assert r.status_code == 201, r.text
    assert r.json()["max_fps"] == 2
    assert api.post("/api/streams", json={"name": "cam3", "url": str(videos["cam1"]), "model": "shapes"}
                    ).status_code == 409
    bad = api.post("/api/streams", json={"name": "cam4", "url": str(videos["cam1"]), "model": "nope"})
    assert bad.status_code == 422
    assert "unknown model" in bad.text
    deadline = time.monotonic() + 90
    while api.get("/api/streams/cam3").json().get("published", 0) == 0:
        assert time.monotonic() < deadline, api.get("/api/streams/cam3").json()
        time.sleep(0.5)
    patched = api.patch("/api/streams/cam3", json={"max_fps": 3})
    assert patched.status_code == 200, patched.text
    assert patched.json()["max_fps"] == 3
    assert api.delete("/api/streams/cam3").status_code == 204
    assert api.delete("/api/streams/cam3").status_code == 404
    assert "cam3" not in {s["name"] for s in api.get("/api/streams").json()}


def test_talk_sessions_answer_alike(plane: tuple[str, httpx.Client]) -> None:
    _, api = plane
    assert api.get("/api/talk/sessions").json() == []
    gone = api.delete("/api/talk/sessions/nobody")
    assert gone.status_code == 404
    assert gone.json() == {"detail": "no session nobody"}


def test_devices_stats_and_the_live_feed(plane: tuple[str, httpx.Client]) -> None:
    kind, api = plane
    devices = api.get("/api/devices").json()
    assert devices, devices
    slots = [s for d in devices for s in d["slots"]]
    assert {s["model"] for s in slots} == {"shapes"}
    served = {n for s in slots for n in s["streams"]}
    assert served >= {"cam1", "cam2"}, devices
    stats = api.get("/api/stats").json()
    if kind == "cluster":
        assert {d["node"] for d in devices} == set(stats["nodes"]), devices  # every node's devices
        assert len(stats["nodes"]) == 2
        assert set().union(*(n["streams"] for n in stats["nodes"].values())) >= {"cam1", "cam2"}
    else:
        assert {d["node"] for d in devices} == {None}
        assert set(stats["streams"]) >= {"cam1", "cam2"}
    with api.stream("GET", "/api/live") as res:
        assert res.headers["x-accel-buffering"] == "no"
        line = next(x for x in res.iter_lines() if x.startswith("data: "))
    live = json.loads(line.removeprefix("data: "))
    assert {s["name"] for s in live["streams"]} >= {"cam1", "cam2"}
    assert live["devices"]
    assert "connected" in live["mqtt"]


def test_events_and_their_pictures(plane: tuple[str, httpx.Client]) -> None:
    _, api = plane
    deadline = time.monotonic() + 90
    while True:
        events = api.get("/api/events?limit=50").json()
        if any(e["has_snapshot"] for e in events):
            break
        assert time.monotonic() < deadline, f"no event with a picture stored: {events}"
        time.sleep(1)
    assert {e["stream"] for e in events} <= {"cam1", "cam2", "cam3"}
    assert [e["start_time"] for e in events] == sorted((e["start_time"] for e in events), reverse=True)
    with_picture = next(e for e in events if e["has_snapshot"])
    jpeg = api.get(f"/api/events/{with_picture['id']}/snapshot.jpg?crop=1")
    assert jpeg.status_code == 200, jpeg.text
    assert jpeg.content[:2] == b"\xff\xd8"
    assert api.get("/api/events/nobody-0-0/snapshot.jpg").status_code == 404


def test_the_page(plane: tuple[str, httpx.Client]) -> None:
    _, api = plane
    page = api.get("/")
    assert page.status_code == 200
    assert "<title>framegrid</title>" in page.text
    assert api.get("/static/app.js").status_code == 200
