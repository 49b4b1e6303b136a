"""Bad input while running: each bad stream or model fails alone, clearly, without leaking secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.media import detections
from tests.support.procs import MODEL, Framegrid, Mosquitto, Subscriber, free_port

SECRET = "Do-Not-Leak-77"


@pytest.mark.slow
def test_bad_streams_and_bad_model_fail_alone(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str,
    framegrid_env: dict[str, str],
) -> None:
    not_video = tmp_path / "clip.mp4"
    not_video.write_bytes(b"\x00garbage, not a video" * 200)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    port = free_port()  # nothing listens here
    cfg = tmp_path / "fg.toml"
    cfg.write_text(f"""
[mqtt]
url = "{mosquitto.url}"
topic_prefix = "{topic_prefix}"
stats_interval = 1
[models.shapes]
type = "yolo"
weights = "{MODEL}"
imgsz = 320
[models.broken]
type = "yolo"
weights = "{corrupt}"
[pipeline]
status_interval = 1
[api]
enabled = false
[streams.good]
url = "{videos['cam1']}"
model = "shapes"
max_fps = 5
[streams.unreachable]
url = "rtsp://admin:{SECRET}@127.0.0.1:{port}/live"
model = "shapes"
open_timeout = 2
reconnect_cap = 1
[streams.notvideo]
url = "{not_video}"
model = "shapes"
[streams.badmodel]
url = "{videos['cam2']}"
model = "broken"
""")
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    try:
        fg = Framegrid(cfg, framegrid_env, tmp_path / "fg.log")

        def state(name: str) -> dict[str, object]:
            msgs = sub.of(f"/streams/{name}/state")
            return msgs[-1].json() if msgs else {}

        sub.wait_for(lambda: len(detections(sub, "good")) >= 10, 90, "detections from the good stream")
        sub.wait_for(lambda: state("unreachable").get("reconnects", 0) >= 2, 30, "unreachable reconnecting")
        sub.wait_for(lambda: state("notvideo").get("state") == "failed", 10, "notvideo failed")
        sub.wait_for(lambda: state("badmodel").get("state") == "failed", 10, "badmodel failed")
        before_stop = {n: state(n) for n in ("unreachable", "notvideo", "badmodel")}
        rc = fg.stop()
    finally:
        sub.close()
    assert rc == 0, fg.output()
    assert state("good")["state"] == "stopped"
    unreachable = before_stop["unreachable"]
    assert unreachable["state"] == "reconnecting"
    assert "Connection refused" in str(unreachable["error"])
    assert "admin:***@" in str(unreachable["url"])
    assert "clip.mp4" in str(before_stop["notvideo"]["error"])
    assert "model broken unavailable" in str(before_stop["badmodel"]["error"])
    assert not detections(sub, "badmodel")
    assert not detections(sub, "unreachable")
    log = fg.output()
    assert "unreachable" in log
    assert "notvideo" in log
    everything = log + "".join(m.payload.decode(errors="replace") for m in sub.messages)
    assert SECRET not in everything
