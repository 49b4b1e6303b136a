"""The HTTP API's contract against a real running framegrid: real RTSP cameras, real Mosquitto, real model.

One framegrid (with a token) serves the module's tests in order; persistence across kill -9 and
the refusals at start-up use their own processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from tests.support.configs import TOKEN, env_with_token, wait_ready, write_api_config
from tests.support.media import detections, tone_on_off, write_wav
from tests.support.procs import ROOT, Framegrid, Mosquitto, RtspServer, Subscriber, free_port

CAM_PASSWORD = "Cam-Pa55-never-shown"

pytestmark = pytest.mark.slow



class Served:
    def __init__(self, fg: Framegrid, client: httpx.Client, sub: Subscriber, config: Path, rtsp: RtspServer,
                 prefix: str) -> None:
        self.fg, self.client, self.sub, self.config, self.rtsp, self.prefix = fg, client, sub, config, rtsp, prefix
        self.seen: list[str] = []  # every response body, to check for secrets

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        res = self.client.request(method, path, **kw)
        self.seen.append(res.text if "json" in res.headers.get("content-type", "") else "")
        return res

    def stream(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/api/streams/{name}").json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path],
           mosquitto: Mosquitto) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("api")
    rtsp = RtspServer(videos, user="viewer", password=CAM_PASSWORD)
    rtsp.start()
    prefix = f"fgapi-{os.getpid()}"
    port = free_port()
    cfg = write_api_config(tmp / "fg.toml", prefix, mosquitto, port, {n: rtsp.url(n) for n in ("cam1", "cam2")})
    env = env_with_token({**os.environ, "FRAMEGRID_STATE_DIR": str(tmp / "state"), "PYTHONUNBUFFERED": "1"})
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    fg = Framegrid(cfg, env, tmp / "fg.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=30)
    try:
        wait_ready(client)
        yield Served(fg, client, sub, cfg, rtsp, prefix)
        rc = fg.stop()
        assert rc == 0, fg.output()
    finally:  # whatever failed above, nothing is left running
        client.close()
        if fg.proc.poll() is None:
            fg.proc.kill()
            fg.proc.wait(10)
        sub.close()
        rtsp.kill()


def test_health_ready_and_auth(served: Served) -> None:
    anon = httpx.Client(base_url=served.client.base_url, timeout=10)
    try:
        assert anon.get("/api/health").json()["status"] == "ok"
        assert anon.get("/api/ready").json() == {"ready": True, "reasons": []}
        for path in ("/api/streams", "/api/devices", "/api/stats", "/metrics", "/api/talk/jobs"):
            res = anon.get(path)
            assert res.status_code == 401, path
            assert res.json() == {"detail": "unauthorized"}
            assert res.headers["www-authenticate"] == "Bearer"
        assert anon.get("/api/streams", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anon.get("/api/streams", headers={"Cookie": f"framegrid_token={TOKEN}"}).status_code == 200  # the page
        assert anon.get("/").status_code == 200
        assert "framegrid" in anon.get("/").text
        docs = anon.get("/docs")
        assert docs.status_code == 200
        assert "/docs-static/swagger-ui-bundle.js" in docs.text
        assert anon.get("/docs-static/swagger-ui-bundle.js").status_code == 200  # shipped, no CDN
        schema = anon.get("/openapi.json").json()
        assert {"StreamInfo", "NewStream", "StreamPatch", "DeviceOut", "JobInfo", "Ready"} <= set(
            schema["components"]["schemas"])
    finally:
        anon.close()


def test_every_operation_but_health_needs_the_token_and_bodies_are_bounded(served: Served) -> None:
    """No auth bypass: every operation of the OpenAPI schema, called without the token and with a wrong
    one, is refused with 401 (path parameters filled in, no body needed for the check), except the
    liveness and readiness probes; a request body beyond 1 MB is refused with 413 before it is read."""
    schema = served.client.get("/openapi.json").json()
    open_paths = {"/api/health", "/api/ready"}
    checked = 0
    with httpx.Client(base_url=served.client.base_url, timeout=10) as anon:
        for path, ops in schema["paths"].items():
            concrete = path.replace("{", "").replace("}", "")  # /api/streams/name, /api/faults/slots/slot, ...
            for method in ops:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    if path in open_paths:
                        continue
                    with anon.stream(method.upper(), concrete, headers=headers) as res:
                        assert res.status_code == 401, (method, path, headers, res.status_code)
                    checked += 1
    assert checked >= 2 * 20, checked
    big = {"name": "big", "url": "rtsp://127.0.0.1/x", "model": "shapes", "comment": "x" * 2_000_000}
    res = served.call("POST", "/api/streams", json=big)
    assert res.status_code == 413, res.status_code
    assert "larger than 1000000 bytes" in res.text, res.status_code
    res = served.call("PATCH", "/api/streams/cam1", json={"max_fps": 1, "pad": "y" * 2_000_000})
    assert res.status_code == 413
    assert "big" not in [s["name"] for s in served.call("GET", "/api/streams").json()]


def test_streams_list_get_and_errors(served: Served) -> None:
    served.sub.wait_for(lambda: all(len(detections(served.sub, n)) >= 3 for n in ("cam1", "cam2")), 60,
                        "detections from both cameras")
    streams = served.call("GET", "/api/streams").json()
    assert [s["name"] for s in streams] == ["cam1", "cam2"]
    cam1 = served.stream("cam1")
    assert cam1["state"] == "streaming"
    assert cam1["slot"] is not None
    assert cam1["device"] == "cpu"
    assert "viewer:***@" in cam1["url"]
    assert CAM_PASSWORD not in json.dumps(cam1)
    assert cam1["published"] > 0
    assert set(cam1["drops"]) >= {"stale", "too_old", "error"}
    assert served.call("GET", "/api/streams/nope").status_code == 404

    def post(body: dict[str, Any]) -> httpx.Response:
        return served.call("POST", "/api/streams", json=body)

    good = {"name": "cam3", "url": served.rtsp.url("cam2"), "model": "shapes"}
    res = post({**good, "max_fps": -1})
    assert res.status_code == 422
    assert res.json()["detail"][0]["loc"] == ["body", "max_fps"]
    res = post({**good, "colour": "red"})
    assert res.status_code == 422
    assert res.json()["detail"][0]["loc"] == ["body", "colour"]
    res = post({**good, "model": "nope"})
    assert res.status_code == 422
    assert res.json()["detail"][0]["loc"] == ["body", "model"]
    assert "unknown model 'nope'" in res.json()["detail"][0]["msg"]
    res = post({**good, "name": "bad name!"})
    assert res.status_code == 422
    assert res.json()["detail"][0]["loc"] == ["body", "name"]
    res = post({**good, "url": "/no/such/file.mp4"})
    assert res.status_code == 422
    assert res.json()["detail"][0]["loc"] == ["body", "url"]
    res = post({**good, "name": "cam1"})
    assert res.status_code == 409
    assert served.call("PATCH", "/api/streams/nope", json={"max_fps": 2}).status_code == 404
    res = served.call("PATCH", "/api/streams/cam1", json={"url": "rtsp://elsewhere/x"})
    assert res.status_code == 422
    assert res.json()["detail"][0]["loc"] == ["body", "url"]
    assert served.call("DELETE", "/api/streams/nope").status_code == 404
    assert served.call("POST", "/api/devices/cuda:7/drain").status_code == 404


def test_add_patch_delete_without_disturbing_others(served: Served) -> None:
    before = served.stream("cam1")
    res = served.call("POST", "/api/streams", json={"name": "cam3", "url": served.rtsp.url("cam2"),
                                                    "model": "shapes", "max_fps": 4})
    assert res.status_code == 201, res.text
    assert res.json()["name"] == "cam3"
    assert "viewer:***@" in res.json()["url"]
    served.sub.wait_for(lambda: len(detections(served.sub, "cam3")) >= 5, 60, "detections from the added stream")
    overlay = json.loads(served.config.with_name("fg.overlay.json").read_text())
    assert overlay["streams"]["cam3"]["config"]["model"] == "shapes"
    assert oct(served.config.with_name("fg.overlay.json").stat().st_mode & 0o777) == "0o600"

    served.sub.wait_for(lambda: served.stream("cam3")["state"] == "streaming", 30, "cam3 streaming")
    streaming = served.stream("cam3")
    res = served.call("PATCH", "/api/streams/cam3", json={"max_fps": 1})
    assert res.status_code == 200
    assert res.json()["max_fps"] == 1
    # max_fps alone is applied live: the source keeps its connection
    assert (res.json()["since"], res.json()["reconnects"]) == (streaming["since"], streaming["reconnects"])
    n = len(detections(served.sub, "cam3"))
    time.sleep(5)
    added = len(detections(served.sub, "cam3")) - n
    assert 2 <= added <= 7, f"{added} results in 5 s at max_fps 1"

    res = served.call("PATCH", "/api/streams/cam3", json={"enabled": False})
    assert res.status_code == 200
    assert res.json()["state"] == "disabled"
    n = len(detections(served.sub, "cam3"))
    time.sleep(2)
    assert len(detections(served.sub, "cam3")) <= n + 1  # at most one already in flight
    assert served.call("PATCH", "/api/streams/cam3", json={"enabled": True}).json()["enabled"] is True
    served.sub.wait_for(lambda: len(detections(served.sub, "cam3")) > n + 2, 30, "the resumed stream")

    assert served.call("DELETE", "/api/streams/cam3").status_code == 204
    assert served.call("GET", "/api/streams/cam3").status_code == 404
    assert "cam3" not in json.loads(served.config.with_name("fg.overlay.json").read_text())["streams"]
    after = served.stream("cam1")
    # cam1 ran on: same state since before, results kept coming, no reconnect
    assert after["since"] == before["since"]
    assert after["reconnects"] == before["reconnects"]
    assert after["published"] > before["published"] + 10


def test_snapshot_and_mjpeg(served: Served) -> None:
    served.sub.wait_for(lambda: len(detections(served.sub, "cam1")) >= 1, 60, "a result from cam1")
    res = served.call("GET", "/api/streams/cam1/snapshot.jpg")
    assert res.status_code == 200
    assert res.headers["content-type"] == "image/jpeg"
    plain = cv2.imdecode(np.frombuffer(res.content, np.uint8), cv2.IMREAD_COLOR)
    assert plain.shape == (360, 640, 3)
    boxed_res = served.call("GET", "/api/streams/cam1/snapshot.jpg?boxes=1")
    assert boxed_res.headers["x-frame-seq"] >= res.headers["x-frame-seq"]
    boxed = cv2.imdecode(np.frombuffer(boxed_res.content, np.uint8), cv2.IMREAD_COLOR)
    if boxed_res.headers["x-frame-seq"] == res.headers["x-frame-seq"]:
        assert np.abs(boxed.astype(int) - plain.astype(int)).max() > 100  # boxes drawn on the same frame
    assert served.call("GET", "/api/streams/nope/snapshot.jpg").status_code == 404

    parts = []
    t0 = time.monotonic()
    with served.client.stream("GET", "/api/streams/cam1/mjpeg?fps=30") as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("multipart/x-mixed-replace")
        # never cached, never held back by a proxy's buffer (nginx honours X-Accel-Buffering)
        assert res.headers["x-accel-buffering"] == "no"
        assert "no-cache" in res.headers["cache-control"]
        buf = b""
        for chunk in res.iter_bytes():
            buf += chunk
            while (start := buf.find(b"\xff\xd8")) >= 0 and (end := buf.find(b"\xff\xd9", start)) >= 0:
                parts.append(buf[start:end + 2])
                buf = buf[end + 2:]
            if len(parts) >= 6:
                break
    took = time.monotonic() - t0
    assert all(cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) is not None for p in parts)
    assert took >= 5 / 4 * 0.8, f"6 frames in {took:.2f}s: the 4 fps cap did not hold"
    # the client left: the server goes on serving
    assert served.call("GET", "/api/health").status_code == 200


def test_devices_stats_models_metrics(served: Served) -> None:
    served.sub.wait_for(lambda: all(len(detections(served.sub, n)) >= 3 for n in ("cam1", "cam2")), 60,
                        "detections from both cameras")
    devices = served.call("GET", "/api/devices").json()
    cpu = next(d for d in devices if d["id"] == "cpu")
    assert cpu["memory_total_bytes"] > 0
    assert cpu["slots"]
    assert not cpu["drained"]
    placed = sorted(s for slot in cpu["slots"] for s in slot["streams"])
    assert placed == ["cam1", "cam2"]
    # the only device cannot be drained: its streams would have nowhere to go
    res = served.call("POST", "/api/devices/cpu/drain")
    assert res.status_code == 409
    assert "no healthy slot on another device" in res.json()["detail"]
    assert served.call("POST", "/api/devices/cpu/resume").json() == {"device": "cpu", "moved": []}
    with served.client.stream("GET", "/api/live") as res:  # server-sent events, what the page shows
        assert res.headers["content-type"].startswith("text/event-stream")
        assert res.headers["x-accel-buffering"] == "no"
        line = next(x for x in res.iter_lines() if x.startswith("data: "))
    live = json.loads(line.removeprefix("data: "))
    assert [s["name"] for s in live["streams"]] == ["cam1", "cam2"]
    assert live["mqtt"]["connected"] is True
    assert any(d["id"] == "cpu" for d in live["devices"])
    stats = served.call("GET", "/api/stats").json()
    assert set(stats["streams"]) == {"cam1", "cam2"}
    assert stats["mqtt"]["connected"] is True
    models = served.call("GET", "/api/models").json()
    assert models[0]["name"] == "shapes"
    assert models[0]["loaded"]
    assert "circle" in models[0]["classes"]

    from prometheus_client.parser import text_string_to_metric_families

    text = served.call("GET", "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    published = {s.labels["stream"]: s.value for s in families["framegrid_frames_published"].samples
                 if s.name.endswith("_total")}
    assert published["cam1"] > 0
    assert published["cam2"] > 0
    decode_cpu = {s.labels["stream"]: s.value for s in families["framegrid_decode_cpu_seconds"].samples
                  if s.name.endswith("_total")}
    assert decode_cpu["cam1"] > 0  # the decoder's own CPU time, from its thread's clock
    events = {s.labels["type"] for s in families["framegrid_events"].samples if s.labels.get("stream") == "cam1"}
    assert "new" in events  # the cameras' objects were tracked into events
    for name in ("framegrid_latency_seconds", "framegrid_stage_seconds", "framegrid_batch_size",
                 "framegrid_slot_busy_seconds", "framegrid_frames_dropped", "framegrid_mqtt_connected",
                 "framegrid_device_memory_total_bytes", "framegrid_stream_state"):
        assert name in families, name
    stages = {s.labels["stage"] for s in families["framegrid_stage_seconds"].samples}
    assert stages >= {"decode", "queue", "preprocess", "inference", "postprocess", "publish"}
    # the standard process and Python series, as from any Prometheus exporter
    rss = next(s.value for s in families["process_resident_memory_bytes"].samples)
    assert rss > 50e6, rss  # framegrid with a model loaded
    assert next(s.labels for s in families["python_info"].samples)["implementation"] == "CPython"
    assert "python_gc_objects_collected" in families


def test_talk_jobs(served: Served, face_image: Path, tmp_path: Path) -> None:
    audio = write_wav(tmp_path / "hello.wav", tone_on_off([(0.5, False), (1.0, True), (0.5, False)]), 16000)
    with audio.open("rb") as a, face_image.open("rb") as f:
        res = served.call("POST", "/api/talk/jobs", files={"audio": ("hello.wav", a, "audio/wav"),
                                                           "avatar": ("face.png", f, "image/png")})
    assert res.status_code == 201, res.text
    job = res.json()
    assert job["state"] in ("queued", "running")
    assert job["backend"] == "energy"

    bad = tmp_path / "not-audio.wav"
    bad.write_bytes(b"RIFF? no, just text" * 100)
    with bad.open("rb") as a:
        res = served.call("POST", "/api/talk/jobs", files={"audio": ("x.wav", a)},
                          data={"avatar_path": str(face_image)})
    assert res.status_code == 422
    assert res.json()["detail"].startswith("audio:")
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * 3_000_000)  # over max_upload_mb = 2
    with big.open("rb") as a:
        res = served.call("POST", "/api/talk/jobs", files={"audio": ("big.wav", a)},
                          data={"avatar_path": str(face_image)})
    assert res.status_code == 413
    huge = tmp_path / "huge.wav"
    huge.write_bytes(b"\0" * 5_000_000)  # the whole request over 2 x max_upload_mb: refused before parsing
    with huge.open("rb") as a:
        res = served.call("POST", "/api/talk/jobs", files={"audio": ("huge.wav", a)})
    assert res.status_code == 413
    assert "request body larger than" in res.json()["detail"]
    res = served.call("POST", "/api/talk/jobs", data={"avatar_path": str(face_image)})
    assert res.status_code == 422
    assert "audio" in res.json()["detail"]
    assert served.call("GET", "/api/talk/jobs/nope").status_code == 404

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        job = served.call("GET", f"/api/talk/jobs/{job['id']}").json()
        if job["state"] in ("done", "failed"):
            break
        time.sleep(0.5)
    assert job["state"] == "done", job
    assert job["progress"] == 1.0
    assert job["frames"] == job["total_frames"] == 50
    res = served.call("GET", job["video"])
    assert res.status_code == 200
    assert res.headers["content-type"] == "video/mp4"
    out = tmp_path / "out.mp4"
    out.write_bytes(res.content)
    from tests.support.media import probe_output

    frames, fps, seconds, _ = probe_output(out)
    assert frames == 50
    assert fps == 25
    assert abs(seconds - 2.0) < 0.1
    from tests.support.media import x264_settings

    encoded = x264_settings(out)  # api.jobs_crf / jobs_preset defaults: MuseTalk's published 18 / medium
    assert encoded["crf"] == "18.0"
    assert encoded["subme"] == "7"
    assert any(j["id"] == job["id"] for j in served.call("GET", "/api/talk/jobs").json())
    assert served.call("DELETE", f"/api/talk/jobs/{job['id']}").status_code == 204
    assert served.call("GET", f"/api/talk/jobs/{job['id']}").status_code == 404


def test_a_talk_job_from_text(served: Served, face_image: Path, tmp_path: Path) -> None:
    """`text` instead of audio: espeak-ng's speech is the job's audio; the video carries it whole and
    its frames cover it. Text with audio, or a voice espeak-ng lacks, is refused at once."""
    import av

    from tests.support.media import probe_output

    res = served.call("POST", "/api/talk/jobs", data={"avatar_path": str(face_image),
                                                      "text": "A talking head from text alone."})
    assert res.status_code == 201, res.text
    job = res.json()
    for bad in ({"text": "hi", "audio_path": str(face_image)}, {"text": "hi", "voice": "xx-none"}):
        res = served.call("POST", "/api/talk/jobs", data={"avatar_path": str(face_image), **bad})
        assert res.status_code == 422, res.text
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and job["state"] not in ("done", "failed"):
        time.sleep(0.5)
        job = served.call("GET", f"/api/talk/jobs/{job['id']}").json()
    assert job["state"] == "done", job
    out = tmp_path / "text.mp4"
    out.write_bytes(served.call("GET", job["video"]).content)
    frames, fps, seconds, _ = probe_output(out)
    assert 1.0 < seconds < 5.0
    assert abs(frames - seconds * fps) <= 2
    with av.open(str(out)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(c.streams.audio[0])])
    assert float(np.sqrt(np.mean(audio ** 2))) > 0.02  # speech, not silence


def test_talk_sessions(served: Served, face_image: Path, tmp_path: Path) -> None:
    audio = write_wav(tmp_path / "a.wav", tone_on_off([(3.0, True)]), 16000)
    body = {"name": "anna", "avatar": str(face_image), "audio": str(audio), "out": str(tmp_path / "anna.mp4")}
    res = served.call("POST", "/api/talk/sessions", json=body)
    assert res.status_code == 201, res.text
    assert res.json()["name"] == "anna"
    assert res.json()["backend"] == "energy"
    assert served.call("POST", "/api/talk/sessions", json=body).status_code == 409
    res = served.call("POST", "/api/talk/sessions", json={**body, "name": "bob", "avatar": "/no/face.png"})
    assert res.status_code == 422
    assert res.json()["detail"][0]["loc"] == ["body", "avatar"]
    assert [s["name"] for s in served.call("GET", "/api/talk/sessions").json()] == ["anna"]
    assert served.call("DELETE", "/api/talk/sessions/anna").status_code == 204
    assert served.call("DELETE", "/api/talk/sessions/anna").status_code == 404


def test_a_session_speaks_text_from_the_api_and_from_mqtt_in_order(served: Served, face_image: Path,
                                                                   mosquitto: Mosquitto, tmp_path: Path) -> None:
    """`say` through the API and on <prefix>/talk/<name>/say: espeak-ng's speech goes into the live
    session in order, its first audio within 300 ms of the request, and the file the session writes
    carries it; bad requests are refused by reason."""
    import paho.mqtt.client as paho

    from tests.support.media import probe_output

    out = tmp_path / "anna.mp4"
    body = {"name": "anna", "avatar": str(face_image), "audio": "mqtt", "out": str(out)}
    assert served.call("POST", "/api/talk/sessions", json=body).status_code == 201
    res = served.call("POST", "/api/talk/sessions/anna/say", json={"text": "Hello, this is framegrid speaking."})
    assert res.status_code == 202, res.text
    assert res.json()["id"].startswith("anna-")
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{served.prefix}-say")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        pub.publish(f"{served.prefix}/talk/anna/say", json.dumps({"text": "And this came over MQTT."}),
                    qos=1).wait_for_publish(5)
    finally:
        pub.loop_stop()
        pub.disconnect()
    figures: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        figures = next(s for s in served.call("GET", "/api/talk/sessions").json() if s["name"] == "anna")["figures"]
        if figures.get("say", {}).get("said") == 2 and figures["say"]["waiting"] == 0:
            break
        time.sleep(0.3)
    assert figures["say"]["said"] == 2, figures
    assert figures["say"]["failed"] == 0
    assert 0 < figures["say"]["first_audio_ms"] < 300, figures
    time.sleep(1.5)  # the last second of speech (at most LOOKAHEAD_S waits in the session) is rendered
    # refused, by reason: no such session, no pushed audio, empty text, an unknown voice (said later, counted)
    assert served.call("POST", "/api/talk/sessions/nobody/say", json={"text": "hi"}).status_code == 404
    assert served.call("POST", "/api/talk/sessions/anna/say", json={"text": ""}).status_code == 422
    filed = {**body, "name": "filed", "audio": str(write_wav(tmp_path / "t.wav", tone_on_off([(2.0, True)]), 16000)),
             "out": str(tmp_path / "filed.mp4")}
    assert served.call("POST", "/api/talk/sessions", json=filed).status_code == 201
    res = served.call("POST", "/api/talk/sessions/filed/say", json={"text": "hi"})
    assert res.status_code == 409
    assert "mqtt" in res.json()["detail"]
    res = served.call("POST", "/api/talk/sessions/anna/say", json={"text": "hi", "voice": "xx-none"})
    assert res.status_code == 202
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and figures["say"]["failed"] == 0:
        figures = next(s for s in served.call("GET", "/api/talk/sessions").json() if s["name"] == "anna")["figures"]
        time.sleep(0.2)
    assert figures["say"]["failed"] == 1
    assert "voice" in figures["say"]["last_error"]
    for name in ("anna", "filed"):
        assert served.call("DELETE", f"/api/talk/sessions/{name}").status_code == 204
    import av

    with av.open(str(out)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(c.streams.audio[0])])
    loud = np.array([np.sqrt(np.mean(audio[i:i + 640] ** 2)) for i in range(0, len(audio) - 640, 640)]) > 0.02
    assert loud.sum() >= 2.0 * 25, loud.sum()  # both sentences: over 2 s of speech in the file
    n, _, _, _ = probe_output(out)
    assert n > 100


LONG_TEXT = ("This is a long sentence that goes on for several seconds, so that there is plenty of time "
             "to interrupt it in the middle, as a user talking over an assistant would do.")


def speech_runs(path: Path) -> list[tuple[float, float]]:
    """(start, end) seconds of the loud runs of a file's audio (gaps under 0.3 s joined)."""
    import av

    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(c.streams.audio[0])])
    loud = [float(np.sqrt(np.mean(audio[i:i + 640] ** 2))) > 0.02 for i in range(0, len(audio) - 640, 640)]
    runs: list[list[float]] = []
    for k, on in enumerate(loud):
        if on and runs and k / 25 - runs[-1][1] < 0.3:
            runs[-1][1] = (k + 1) / 25
        elif on:
            runs.append([k / 25, (k + 1) / 25])
    return [(a, b) for a, b in runs]


def test_barge_in_cuts_the_utterance_being_said_and_drops_the_waiting_ones(served: Served, face_image: Path,
                                                                          tmp_path: Path) -> None:
    """A long utterance is cut 1 s after it started (DELETE .../utterances/current); then, with one
    utterance speaking and one waiting, a `say` with `interrupt` cuts the first, drops the second and
    is said. Events on <prefix>/talk/ben/events in order; in the session's file the first utterance's
    voice stops within 0.4 s of the request (the fade is 40 ms; the rest is the session's own frames
    in flight)."""
    out = tmp_path / "ben.mp4"
    body = {"name": "ben", "avatar": str(face_image), "audio": "mqtt", "out": str(out)}
    assert served.call("POST", "/api/talk/sessions", json=body).status_code == 201
    events = lambda: [m.json() for m in served.sub.of("/talk/ben/events")]  # noqa: E731
    first = served.call("POST", "/api/talk/sessions/ben/say", json={"text": LONG_TEXT}).json()["id"]
    served.sub.wait_for(lambda: any(e["event"] == "started" for e in events()), 10, "started")
    started_at = next(e["at"] for e in events() if e["event"] == "started")
    time.sleep(1.0)
    asked = time.time()
    res = served.call("DELETE", "/api/talk/sessions/ben/utterances/current")
    assert res.status_code == 200, res.text
    assert res.json()["id"] == first
    served.sub.wait_for(lambda: any(e["event"] == "interrupted" for e in events()), 5, "interrupted")
    assert served.call("DELETE", "/api/talk/sessions/ben/utterances/current").status_code == 404  # nothing said
    time.sleep(1.0)
    second = served.call("POST", "/api/talk/sessions/ben/say", json={"text": LONG_TEXT}).json()["id"]
    third = served.call("POST", "/api/talk/sessions/ben/say", json={"text": "And this waits."}).json()["id"]
    served.sub.wait_for(lambda: sum(e["event"] == "started" for e in events()) == 2, 10, "second started")
    fourth = served.call("POST", "/api/talk/sessions/ben/say", json={"text": "Stop. Listen.", "interrupt": True}
                         ).json()["id"]
    served.sub.wait_for(lambda: any(e["event"] == "finished" for e in events()), 15, "finished")
    said = [(e["utterance"], e["event"]) for e in events()]
    assert said == [(first, "started"), (first, "interrupted"), (second, "started"), (third, "interrupted"),
                    (second, "interrupted"), (fourth, "started"), (fourth, "finished")], said
    figures = next(s for s in served.call("GET", "/api/talk/sessions").json() if s["name"] == "ben")["figures"]
    assert figures["say"]["said"] == 1
    assert figures["say"]["interrupted"] == 3
    assert served.call("DELETE", "/api/talk/sessions/ben").status_code == 204
    runs = speech_runs(out)
    assert len(runs) == 3, runs  # cut, cut, said
    spoken = runs[0][1] - runs[0][0]
    cut_after = spoken - (asked - started_at)  # voice still heard after the request
    print(f"barge-in: the voice stopped {cut_after * 1000:.0f} ms after the request")
    assert cut_after < 0.4, (runs, asked - started_at)
    assert spoken < 2.0  # the whole sentence is over 6 s


class EventStream:
    """Reads a server-sent event stream on a thread: its `data` objects, in order."""

    def __init__(self, served: Served, path: str, **params: Any) -> None:
        import threading

        self.events: list[dict[str, Any]] = []
        self.open = threading.Event()
        self._client = httpx.Client(base_url=served.client.base_url, headers=served.client.headers, timeout=30)
        self._thread = threading.Thread(target=self._read, args=(path, params), daemon=True)
        self._thread.start()
        assert self.open.wait(10), path

    def _read(self, path: str, params: dict[str, Any]) -> None:
        with contextlib.suppress(httpx.HTTPError), self._client.stream("GET", path, params=params) as res:
            assert res.headers["content-type"].startswith("text/event-stream")
            for line in res.iter_lines():
                self.open.set()
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))

    def close(self) -> None:
        self._client.close()
        self._thread.join(5)


def test_pushed_audio_spurts_are_utterances_and_events_come_as_server_sent_events(
        served: Served, face_image: Path, mosquitto: Mosquitto, tmp_path: Path) -> None:
    """PCM pushed over MQTT is an utterance per spurt (voiced audio until 0.6 s without): each gets an
    id and started/finished events like a `say`, and DELETE .../utterances/current cuts one being
    spoken. GET .../events streams the same events as <prefix>/talk/<name>/events, in order, and
    resumes after a given `seq`."""
    import paho.mqtt.client as paho

    body = {"name": "cleo", "avatar": str(face_image), "audio": "mqtt", "out": str(tmp_path / "cleo.mp4")}
    assert served.call("POST", "/api/talk/sessions", json=body).status_code == 201
    sse = EventStream(served, "/api/talk/sessions/cleo/events")
    mqtt = lambda: [m.json() for m in served.sub.of("/talk/cleo/events")]  # noqa: E731
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{served.prefix}-pcm")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()

    def push(seconds: float, stop: Callable[[], bool] = lambda: False) -> None:
        """A 220 Hz voice-like tone in real time, 100 ms per message."""
        tone = (0.4 * np.sin(2 * np.pi * 220 * np.arange(1600) / 16000) * 32767).astype("<i2").tobytes()
        t0 = time.monotonic()
        for k in range(round(seconds * 10)):
            if stop():
                return
            pub.publish(f"{served.prefix}/talk/cleo/audio", tone, qos=0)
            time.sleep(max(0.0, t0 + (k + 1) / 10 - time.monotonic()))

    try:
        push(1.0)  # one spurt, said whole
        served.sub.wait_for(lambda: any(e["event"] == "finished" for e in mqtt()), 10, "spurt finished")
        push(3.0, lambda: any(e["event"] == "started" and e["utterance"] != mqtt()[0]["utterance"] for e in mqtt()))
        res = served.call("DELETE", "/api/talk/sessions/cleo/utterances/current")  # cut while it is spoken
        assert res.status_code == 200, res.text
        cut = res.json()["id"]
        said = served.call("POST", "/api/talk/sessions/cleo/say", json={"text": "Yes?"}).json()["id"]
        served.sub.wait_for(lambda: sum(e["event"] == "finished" for e in mqtt()) == 2, 15, "text finished")
    finally:
        pub.loop_stop()
        pub.disconnect()
    first = mqtt()[0]["utterance"]
    kinds = [(e["utterance"], e["source"], e["event"]) for e in mqtt()]
    assert kinds == [(first, "audio", "started"), (first, "audio", "finished"), (cut, "audio", "started"),
                     (cut, "audio", "interrupted"), (said, "text", "started"), (said, "text", "finished")], kinds
    deadline = time.monotonic() + 5
    while len(sse.events) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    sse.close()
    assert [{k: v for k, v in e.items() if k != "seq"} for e in sse.events] == mqtt()
    seqs = [e["seq"] for e in sse.events]
    assert seqs == sorted(seqs)
    again = EventStream(served, "/api/talk/sessions/cleo/events", after=seqs[3])  # resume after the cut
    deadline = time.monotonic() + 5
    while len(again.events) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    again.close()
    assert [e["seq"] for e in again.events] == seqs[4:]
    assert served.call("GET", "/api/talk/sessions/nobody/events").status_code == 404
    assert served.call("DELETE", "/api/talk/sessions/cleo").status_code == 204


def test_clients_name_only_network_streams_and_files_inside_media_dirs(served: Served, face_image: Path,
                                                                      tmp_path: Path) -> None:
    """No path a client gives reads or writes outside api.media_dirs (here pytest's base folder):
    absolute paths, `..`, a symlink out, FFmpeg's file-reading protocols; network URLs pass."""
    outside = Path("/etc/hostname")
    link = tmp_path / "innocent.mp4"
    link.symlink_to(outside)
    base = served.config.parent.parent
    for url in (str(outside), f"file:{outside}", str(link), f"{base}/../../../etc/hostname",
                "../" * 12 + "etc/hostname", f"concat:{outside}", f"subfile,,start,0,end,0,,:{outside}", "pipe:0",
                "data:text/plain,abc", "a\x00b.mp4"):
        res = served.call("POST", "/api/streams", json={"name": "evil", "url": url, "model": "shapes"})
        assert res.status_code == 422, (url, res.status_code, res.text)
        assert res.json()["detail"][0]["loc"] == ["body", "url"], res.text
        if str(base) not in url:
            assert str(base) not in res.text  # says what was refused, not which folders are allowed
    assert "evil" not in [s["name"] for s in served.call("GET", "/api/streams").json()]
    for data in ({"avatar_path": str(outside), "audio_path": str(outside)}, {"avatar_path": str(link)}):
        res = served.call("POST", "/api/talk/jobs", data=data)
        assert res.status_code == 422, res.text
        assert "api.media_dirs" in res.text, res.text
    body = {"name": "eve", "avatar": str(face_image), "audio": "mqtt", "out": str(tmp_path / "eve.mp4")}
    for key, value in (("avatar", str(outside)), ("out", "/tmp/framegrid-evil.mp4"),
                       ("out", str(tmp_path / "../../../x.m3u8")), ("out", "file:///tmp/x.mp4"),
                       ("audio", f"concat:{outside}"), ("audio", str(link))):
        res = served.call("POST", "/api/talk/sessions", json={**body, key: value})
        assert res.status_code == 422, (key, value, res.text)
        assert res.json()["detail"][0]["loc"] == ["body", key], (key, value, res.text)
    assert not Path("/tmp/framegrid-evil.mp4").exists()
    assert served.call("GET", "/api/talk/sessions").json() == []


def test_nothing_secret_in_responses_or_log(served: Served) -> None:
    for text in served.seen:
        assert CAM_PASSWORD not in text
        assert TOKEN not in text
    log = served.fg.output()
    assert CAM_PASSWORD not in log
    assert TOKEN not in log


def test_changes_survive_kill_9(tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto,
                                framegrid_env: dict[str, str]) -> None:
    port = free_port()
    prefix = f"fgkill-{os.getpid()}"
    cfg = write_api_config(tmp_path / "fg.toml", prefix, mosquitto, port, {"cam1": str(videos["cam1"])}, token=None)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    try:
        fg = Framegrid(cfg, framegrid_env, tmp_path / "fg1.log")
        wait_ready(client)
        assert client.post("/api/streams", json={"name": "cam2", "url": str(videos["cam2"]), "model": "shapes",
                                                 "max_fps": 3}).status_code == 201
        assert client.patch("/api/streams/cam1", json={"max_fps": 2}).status_code == 200
        fg.proc.send_signal(signal.SIGKILL)  # acknowledged = persisted: nothing may be lost now
        fg.proc.wait(10)
        fg.stop()
        overlay = json.loads((tmp_path / "fg.overlay.json").read_text())
        assert overlay["streams"] == {"cam1": {"patch": {"max_fps": 2.0}},
                                      "cam2": {"config": {"max_fps": 3.0, "model": "shapes",
                                                          "url": str(videos["cam2"])}}}
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(cfg)], cwd=ROOT,
                             capture_output=True, text=True, env=framegrid_env)
        assert out.returncode == 0
        assert "fg.overlay.json" in out.stdout
        assert "2 stream(s)" in out.stdout

        fg = Framegrid(cfg, framegrid_env, tmp_path / "fg2.log")
        wait_ready(client)
        streams = {s["name"]: s for s in client.get("/api/streams").json()}
        assert set(streams) == {"cam1", "cam2"}
        assert streams["cam1"]["max_fps"] == 2
        n = len(detections(sub, "cam2"))
        sub.wait_for(lambda: len(detections(sub, "cam2")) >= n + 5, 60, "the added stream after the restart")
        assert client.delete("/api/streams/cam1").status_code == 204  # a TOML stream: deleted by the overlay
        assert fg.stop() == 0
        assert json.loads((tmp_path / "fg.overlay.json").read_text())["streams"]["cam1"] is None

        (tmp_path / "fg.overlay.json").write_text('{"v": 1, "streams": {"x": {"config": {"url": 3}}}}')
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(cfg)], cwd=ROOT,
                             capture_output=True, text=True, env=framegrid_env)
        assert out.returncode == 2
        assert "fg.overlay.json" in out.stderr
        assert "streams.x.url" in out.stderr
    finally:
        client.close()
        sub.close()


def test_refuses_exposed_api_without_token_and_taken_port(tmp_path: Path, mosquitto: Mosquitto,
                                                          framegrid_env: dict[str, str]) -> None:
    cfg = write_api_config(tmp_path / "fg.toml", "x", mosquitto, 8080, {}, token=None)
    cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:8080"', 'listen = "0.0.0.0:8080"'))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=ROOT, capture_output=True,
                         text=True, env=framegrid_env, timeout=60)
    assert out.returncode == 2
    assert "api" in out.stderr
    assert "not a loopback address: set api.token" in out.stderr

    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = write_api_config(tmp_path / "fg2.toml", "x", mosquitto, port, {}, token=None)
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=ROOT,
                             capture_output=True, text=True, env=framegrid_env, timeout=60)
    assert out.returncode == 2
    assert f"api.listen 127.0.0.1:{port}: Address already in use" in out.stderr


def test_musetalk_job_on_two_lipsync_slots(tmp_path: Path, tiny: Path, face_image: Path,
                                           mosquitto: Mosquitto, framegrid_env: dict[str, str]) -> None:
    """A MuseTalk job through the API: tiny random models of the real classes, its segments dealt to
    both lip-sync slots of the running framegrid (the same renderer as `framegrid talk`)."""
    port = free_port()
    cfg = tmp_path / "fg.toml"
    cfg.write_text(f'[mqtt]\nurl = "{mosquitto.url}"\ntopic_prefix = "fgjob-{os.getpid()}"\n'
                   f'[api]\nlisten = "127.0.0.1:{port}"\nmedia_dirs = ["{tmp_path.parent}"]\n'
                   f'[lipsync]\nweights = "{tiny}"\nslots = 2\nbatch_size = 4\n'
                   '[pipeline]\nstatus_interval = 0\n')
    wav = write_wav(tmp_path / "speech.wav", tone_on_off([(0.6, True), (0.4, False), (0.52, True)]), 16_000)
    fg = Framegrid(cfg, framegrid_env, tmp_path / "fg.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_ready(client)
        res = client.post("/api/talk/jobs", data={"avatar_path": str(face_image), "audio_path": str(wav),
                                                  "backend": "musetalk"})
        assert res.status_code == 201, res.text
        job_id = res.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = client.get(f"/api/talk/jobs/{job_id}").json()
            if job["state"] in ("done", "failed"):
                break
            time.sleep(0.5)
        assert job["state"] == "done", job
        assert job["frames"] == job["total_frames"] == 38  # 1.52 s -> 38 frames of 40 ms
        out = tmp_path / "out.mp4"
        out.write_bytes(client.get(f"/api/talk/jobs/{job_id}/video").content)
        from tests.support.media import probe_output

        frames, fps, seconds, _ = probe_output(out)
        assert frames == 38
        assert fps == 25
        assert abs(seconds - 1.52) <= 0.05
        slots = client.get("/api/devices").json()[-1]["slots"]
        assert len([s for s in slots if s["model"] == "lipsync"]) == 2
        batches = {n: s["batches"] for n, s in client.get("/api/stats").json()["lipsync"]["slots"].items()}
        assert len(batches) == 2, batches
        assert all(b > 0 for b in batches.values()), batches  # both slots rendered
    finally:
        client.close()
        assert fg.stop() == 0, fg.output()
    log = fg.output()
    assert "talk job" in log
    assert "done" in log


def test_queued_talk_jobs_survive_kill_9(tmp_path: Path, face_image: Path, mosquitto: Mosquitto,
                                         framegrid_env: dict[str, str]) -> None:
    port = free_port()
    bob = f'[talk.bob]\navatar = "{face_image}"\naudio = "mqtt"\nout = "{tmp_path / "bob.mp4"}"\n'
    cfg = write_api_config(tmp_path / "fg.toml", f"fgjobs-{os.getpid()}", mosquitto, port, {}, token=None, extra=bob)
    wav = write_wav(tmp_path / "long.wav", tone_on_off([(4.0, True), (4.0, False)]), 16000)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        fg = Framegrid(cfg, framegrid_env, tmp_path / "fg1.log")
        wait_ready(client)
        ids = [client.post("/api/talk/jobs", data={"avatar_path": str(face_image), "audio_path": str(wav)})
               .json()["id"] for _ in range(3)]
        states = [client.get(f"/api/talk/jobs/{i}").json()["state"] for i in ids]
        assert client.get(f"/api/talk/jobs/{ids[-1]}/video").status_code == 409  # not done yet
        # a live session started through the API, and the configured one stopped through it
        res = client.post("/api/talk/sessions", json={"name": "anna", "avatar": str(face_image), "audio": "mqtt",
                                                      "out": str(tmp_path / "anna.mp4")})
        assert res.status_code == 201, res.text
        assert client.delete("/api/talk/sessions/bob").status_code == 204
        fg.proc.send_signal(signal.SIGKILL)  # with jobs accepted and not done
        fg.proc.wait(10)
        fg.stop()
        assert "queued" in states, states  # one worker on this machine: the later ones were waiting

        fg = Framegrid(cfg, framegrid_env, tmp_path / "fg2.log")
        wait_ready(client)
        deadline = time.monotonic() + 120
        jobs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            jobs = [client.get(f"/api/talk/jobs/{i}").json() for i in ids]
            if all(j["state"] in ("done", "failed") for j in jobs):
                break
            time.sleep(0.5)
        assert [j["state"] for j in jobs] == ["done"] * 3, jobs
        assert all(j["frames"] == 200 for j in jobs)
        assert "queued again after a restart" in fg.output()
        # the sessions as the API left them: anna back (started again), bob still stopped
        sessions = {s["name"]: s for s in client.get("/api/talk/sessions").json()}
        assert set(sessions) == {"anna"}, sessions
        assert sessions["anna"]["state"] in ("starting", "live"), sessions
        assert fg.stop() == 0
    finally:
        client.close()
