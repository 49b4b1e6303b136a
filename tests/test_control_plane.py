"""One control plane: the same routes, checked the same way against one process and against a
cluster head placing the streams on a two-node Ray cluster (real `framegrid run` processes, real
Mosquitto, the real model)."""

from __future__ import annotations

import asyncio
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
    extra = '[webrtc]\naddresses = ["127.0.0.1"]\n'  # talking heads over WebRTC on loopback
    if request.param == "cluster":
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"framegrid": 1})
        extra += f'[cluster]\nbackend = "ray"\naddress = "{cluster.address}"\nping_s = 0.5\n'
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
    # the stream's own filters on the shared model copy: only circles from now on (live on one process;
    # a cluster head restarts the stream on its node)
    filtered = api.patch("/api/streams/cam3", json={"classes": ["circle"], "confidence": 0.3})
    assert filtered.status_code == 200, filtered.text
    assert filtered.json()["config"]["classes"] == ["circle"]
    deadline, in_a_row = time.monotonic() + 60, 0
    while in_a_row < 5:  # its scene shows three circles and a square: five looks in a row without the square
        objects = api.get("/api/streams/cam3").json().get("objects") or {}
        in_a_row = in_a_row + 1 if set(objects) == {"circle"} else 0
        assert time.monotonic() < deadline, f"cam3 still shows {objects}"
        time.sleep(0.5)
    assert api.patch("/api/streams/cam3", json={"url": "x"}).status_code == 422  # not changeable at run time
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


def test_devices_are_drained_and_resumed_where_they_are(plane: tuple[str, httpx.Client]) -> None:
    kind, api = plane
    devices = api.get("/api/devices").json()
    cpu = next(d for d in devices if d["kind"] == "cpu" and any(s["streams"] for s in d["slots"]))  # serving
    where = f"?node={cpu['node']}" if kind == "cluster" else ""
    # the only device of its process (node): nothing else can take its streams, so nothing moves
    refused = api.post(f"/api/devices/cpu/drain{where}")
    assert refused.status_code == 409, refused.text
    resumed = api.post(f"/api/devices/cpu/resume{where}")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json() == {"device": "cpu", "moved": []}
    assert api.post(f"/api/devices/nope/drain{where}").status_code == 404
    if kind == "cluster":
        unnamed = api.post("/api/devices/cpu/drain")
        assert unnamed.status_code == 422, unnamed.text
        (problem,) = unnamed.json()["detail"]
        assert problem["loc"][-1] == "node", problem
        assert problem["msg"].startswith("required on a cluster"), problem
        assert api.post("/api/devices/cpu/drain?node=nobody").status_code == 404
    assert all(not d["drained"] for d in api.get("/api/devices").json())


async def watch_and_speak(api: httpx.Client, name: str) -> tuple[int, str, int, list[int]]:
    """A WebRTC viewer (WHEP) and microphone (WHIP) of a session, as a browser would: -> (video frames
    received, the viewer's resource, the WHIP answer's status, the statuses of leaving twice while
    still connected)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    sdp = {"content-type": "application/sdp"}
    viewer = RTCPeerConnection()
    viewer.addTransceiver("video", direction="recvonly")
    viewer.addTransceiver("audio", direction="recvonly")
    video: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @viewer.on("track")
    def on_track(track: Any) -> None:
        if track.kind == "video" and not video.done():
            video.set_result(track)

    mic = RTCPeerConnection()
    mic.addTrack(AudioStreamTrack())  # silence, as a muted microphone sends
    try:
        await viewer.setLocalDescription(await viewer.createOffer())
        answer = await asyncio.to_thread(api.post, f"/api/talk/sessions/{name}/whep",
                                         content=viewer.localDescription.sdp, headers=sdp)
        assert answer.status_code == 201, answer.text
        await viewer.setRemoteDescription(RTCSessionDescription(sdp=answer.text, type="answer"))
        track = await asyncio.wait_for(video, 30)
        frames = 0
        for _ in range(5):
            await asyncio.wait_for(track.recv(), 30)
            frames += 1
        await mic.setLocalDescription(await mic.createOffer())
        spoken = await asyncio.to_thread(api.post, f"/api/talk/sessions/{name}/whip",
                                         content=mic.localDescription.sdp, headers=sdp)
        if spoken.status_code == 201:
            await mic.setRemoteDescription(RTCSessionDescription(sdp=spoken.text, type="answer"))
        where = answer.headers["location"]
        left = [(await asyncio.to_thread(api.delete, where)).status_code for _ in range(2)]
        return frames, where, spoken.status_code, left
    finally:
        await viewer.close()
        await mic.close()


def test_a_talking_head_over_webrtc(plane: tuple[str, httpx.Client], face_image: Path) -> None:
    """WHEP and WHIP signalling answered where the session runs (relayed by a cluster head to its node)."""
    from streams.webrtc import restrict_host_addresses

    kind, api = plane
    started = api.post("/api/talk/sessions", json={"name": "anna", "avatar": str(face_image), "audio": "webrtc",
                                                   "out": "webrtc"})
    assert started.status_code == 201, started.text
    assert (started.json()["node"] is not None) == (kind == "cluster"), started.json()
    restrict_host_addresses(["127.0.0.1"])  # this process's ICE candidates on loopback too
    try:
        deadline = time.monotonic() + 60
        while not any(s["name"] == "anna" and s["state"] == "live" for s in api.get("/api/talk/sessions").json()):
            assert time.monotonic() < deadline, api.get("/api/talk/sessions").json()
            time.sleep(0.5)
        frames, viewer, whip, left = asyncio.run(watch_and_speak(api, "anna"))
        assert frames == 5
        assert whip == 201
        assert viewer.startswith("/api/talk/sessions/anna/whep/"), viewer
        assert left == [204, 404]  # the viewer left; then there is no such viewer
        sdp = {"content-type": "application/sdp"}
        bad = api.post("/api/talk/sessions/anna/whep", content="v=0 nonsense", headers=sdp)
        assert bad.status_code == 409, bad.text
        assert api.post("/api/talk/sessions/nobody/whep", content="v=0",
                        headers={"content-type": "application/sdp"}).status_code == 404
    finally:
        restrict_host_addresses([])
        assert api.delete("/api/talk/sessions/anna").status_code == 204


def test_every_message_is_its_typed_payload(plane: tuple[str, httpx.Client], mosquitto: Mosquitto) -> None:
    """What MQTT carries and what HTTP answers are the one typed payload of `pipeline.payloads`: each
    message validates against its type, which refuses an undeclared key, and /api/stats is one."""
    from pydantic import TypeAdapter

    from pipeline import payloads as p
    from tests.support.procs import Subscriber

    kind, api = plane
    prefix = f"fgplane-{kind}-{os.getpid()}"
    types: dict[str, Any] = {"stats": p.StatsPayload, "devices": p.DevicesPayload,
                             "state": p.StreamStatePayload | p.MovingPayload, "detections": p.DetectionsPayload,
                             "cluster": p.ClusterPayload, "events": p.EventPayload}
    wanted = {"stats", "devices", "state", "detections", "events"} | ({"cluster"} if kind == "cluster" else set())
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    try:
        def kinds() -> set[str]:
            return {m.topic.rsplit("/", 1)[-1] for m in list(sub.messages) if m.payload} & set(types)

        sub.wait_for(lambda: kinds() >= wanted, 30, f"{wanted} on {prefix}/#")
        checked: dict[str, int] = {}
        for m in list(sub.messages):
            leaf = m.topic.rsplit("/", 1)[-1]
            if leaf not in types or not m.payload or (leaf == "state" and "/talk/" in m.topic):
                continue
            body = json.loads(m.payload)
            assert TypeAdapter(types[leaf]).validate_python(body) == body, m.topic
            checked[leaf] = checked.get(leaf, 0) + 1
        assert set(checked) >= wanted, checked
    finally:
        sub.close()
    stats = api.get("/api/stats").json()
    expected = p.ClusterStatsPayload if kind == "cluster" else p.StatsPayload
    assert TypeAdapter(expected).validate_python(stats) == stats
    undeclared = {**stats, "surprise": 1}
    with pytest.raises(ValueError, match="surprise"):
        TypeAdapter(expected).validate_python(undeclared)
