"""No secret ever leaks: with passwords for a camera and the broker and an API token, framegrid runs
at debug log level through faults (a camera that goes away, one that never answers, a refused
request) and every log line, MQTT message, HTTP answer, /metrics and child process command line is
searched for the secrets and their URL-encoded forms: zero hits."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from urllib.parse import quote, quote_plus

import paho.mqtt.client as paho
import pytest

from tests.support.procs import MODEL, Framegrid, RtspServer, free_port
from tests.support.tls import PASSWORD, PREFIX, Pki, secure_broker, shared_subdir

CAMERA_PASSWORD = "cam-Pa$$w0rd!x"  # sub-delimiters: allowed as they are in a URL, encoded differently
TOKEN = f"tok-{uuid.uuid4().hex}"


def forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}


def children_cmdlines(pid: int) -> list[str]:
    """Command lines of every descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    family, out = {pid}, []
    grew = True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    for p in family:
        try:
            out.append((Path("/proc") / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return out


@pytest.mark.slow
def test_no_secret_in_logs_mqtt_http_metrics_or_command_lines(
    tmp_path: Path, videos: dict[str, Path], framegrid_env: dict[str, str], shared_dir: Path, pki: Pki,
) -> None:
    import httpx

    broker = secure_broker(shared_subdir(shared_dir, "leak"), pki, pki.server)
    camera = RtspServer({"cam1": videos["cam1"]}, user="viewer", password=CAMERA_PASSWORD)
    camera.start()
    api_port = free_port()
    cam_url = f"rtsp://viewer:{CAMERA_PASSWORD}@127.0.0.1:{camera.port}/cam1"
    dead_url = f"rtsp://viewer:{CAMERA_PASSWORD}@127.0.0.1:{free_port()}/nobody"
    config = tmp_path / "fg.toml"
    config.write_text(f"""
[mqtt]
url = "{broker.url}"
username = "framegrid"
password = "${{MQTT_PASSWORD}}"
ca_file = "{pki.ca}"
topic_prefix = "{PREFIX}"
stats_interval = 1
[api]
listen = "127.0.0.1:{api_port}"
token = "${{FRAMEGRID_TOKEN}}"
[log]
level = "debug"
[pipeline]
status_interval = 1
[events]
mqtt_snapshots = true
[models.shapes]
type = "yolo"
weights = "{MODEL}"
imgsz = 320
[streams.cam]
url = "{cam_url}"
model = "shapes"
max_fps = 5
stall_timeout = 3
reconnect_cap = 1.0
[streams.cam.lines.mid]
points = [[0.5, 0.0], [0.5, 1.0]]
[streams.dead]
url = "{dead_url}"
model = "shapes"
reconnect_cap = 1.0
""")
    env = {**framegrid_env, "MQTT_PASSWORD": PASSWORD, "FRAMEGRID_TOKEN": TOKEN}
    seen: list[str] = []
    watcher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"leak-{uuid.uuid4().hex[:6]}")
    watcher.tls_set(ca_certs=str(pki.ca))
    watcher.username_pw_set("watcher", "watch-it")
    watcher.on_message = lambda _c, _u, msg: seen.append(f"{msg.topic} {msg.payload.decode(errors='replace')}")
    watcher.on_connect = lambda c, _u, _f, _rc, _p=None: c.subscribe("#", qos=1)
    watcher.connect("127.0.0.1", broker.port)
    watcher.loop_start()
    fg = Framegrid(config, env, tmp_path / "fg.log")
    answers: list[str] = []
    cmdlines: list[str] = []
    try:
        base = f"http://127.0.0.1:{api_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(f"{PREFIX}/streams/cam/detections" in m for m in seen):
            time.sleep(0.5)
        assert any(f"{PREFIX}/streams/cam/detections" in m for m in seen), fg.output()[-3000:]
        cmdlines += children_cmdlines(fg.proc.pid)
        camera.kill()  # a fault: the camera goes away, framegrid reconnects (and logs why)
        time.sleep(5)
        camera.start()
        time.sleep(5)
        cmdlines += children_cmdlines(fg.proc.pid)
        with httpx.Client(base_url=base, timeout=10) as http:
            for path in ("/api/health", "/api/ready", "/api/streams", "/api/streams/cam", "/api/streams/dead",
                         "/api/models", "/api/devices", "/api/stats", "/api/events", "/metrics", "/openapi.json",
                         "/api/streams/nope", "/api/talk/sessions", "/"):
                r = http.get(path, headers=auth)
                answers.append(f"{path} {r.status_code} {r.headers} {r.text}")
            for headers in ({}, {"Authorization": "Bearer wrong"}):  # refused requests
                r = http.get("/api/streams", headers=headers)
                assert r.status_code == 401
                answers.append(f"401 {r.headers} {r.text}")
            # a refused change whose body carries the camera's password
            r = http.post("/api/streams", headers=auth, json={"name": "x", "url": cam_url, "model": "nope"})
            assert r.status_code == 422
            answers.append(f"422 {r.text}")
            r = http.patch("/api/streams/cam", headers=auth, json={"max_fps": -1})
            answers.append(f"{r.status_code} {r.text}")
        assert fg.stop() == 0
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        camera.kill()
        broker.stop()
    log = fg.output()
    assert "streams/dead" in " ".join(seen)
    assert "reconnecting" in " ".join(seen)
    assert "DEBUG" in log  # at debug level
    haystacks = {"log": log, "mqtt": "\n".join(seen), "http": "\n".join(answers), "cmdlines": "\n".join(cmdlines),
                 "overlay": "".join(p.read_text() for p in tmp_path.glob("*.overlay.json"))}
    assert len(haystacks["mqtt"]) > 1000
    assert len(haystacks["http"]) > 1000
    for secret in (CAMERA_PASSWORD, PASSWORD, TOKEN):
        for form in forms(secret):
            for where, text in haystacks.items():
                assert form not in text, f"a secret ({form[:3]}...) in the {where}"
