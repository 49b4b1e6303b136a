"""Hostile cameras (`tools/fuzz_streams.py`: MPEG-TS over TCP, encoded here and then damaged) beside
a healthy RTSP camera, in one real framegrid process: every hostile stream reports counted decode
errors or reconnects, the healthy one keeps its rate, memory stays bounded and nothing crashes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.media import rss_mb
from tests.support.procs import MODEL, Framegrid, Mosquitto, RtspServer, Subscriber
from tools.fuzz_streams import CASES, FuzzCamera

RUN_S = 45.0
FPS = 5



@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hostile_cameras_are_counted_or_reconnected_and_spare_the_others(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str, framegrid_env: dict[str, str]
) -> None:
    cams = {case: FuzzCamera(case).start() for case in CASES}
    rtsp = RtspServer({"good": videos["cam1"]})
    rtsp.start()
    lines = ["[mqtt]", f'url = "{mosquitto.url}"', f'topic_prefix = "{topic_prefix}"', "stats_interval = 1",
             "[api]", "enabled = false", "[pipeline]", "status_interval = 0",
             "[models.shapes]", 'type = "yolo"', f'weights = "{MODEL}"', "imgsz = 320",
             "[streams.good]", f'url = "{rtsp.url("good")}"', 'model = "shapes"', f"max_fps = {FPS}"]
    for case, cam in cams.items():
        lines += [f"[streams.{case}]", f'url = "{cam.url}"', 'model = "shapes"', f"max_fps = {FPS}",
                  "open_timeout = 3", "stall_timeout = 3", "reconnect_base = 0.3", "reconnect_cap = 1"]
    cfg = tmp_path / "fuzz.toml"
    cfg.write_text("\n".join(lines) + "\n")
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    fg = Framegrid(cfg, framegrid_env, tmp_path / "fg.log")
    try:
        sub.wait_for(lambda: len(sub.of("/streams/good/detections")) >= 5, 120, "the healthy camera publishing")
        t0 = time.time()
        rss: list[tuple[float, float]] = []
        while time.time() - t0 < RUN_S:
            assert fg.proc.poll() is None, fg.output()[-5000:]
            rss.append((time.time() - t0, rss_mb(fg.proc.pid)))
            time.sleep(2.0)
        stats = [m.json() for m in sub.of("/stats") if m.at > t0]
        last = stats[-1]["streams"]

        def detections(stream: str, since: float) -> list[dict[str, Any]]:
            return [m.json() for m in sub.of(f"/streams/{stream}/detections") if m.at > since]

        # the healthy camera keeps its rate beside them (window: the last 30 s)
        good = detections("good", t0 + RUN_S - 30)
        print({case: {k: last[case].get(k) for k in ("state", "reconnects", "decode_errors", "corrupt_frames", "fps_in",
                                                     "fps_processed")} for case in CASES})
        assert len(good) >= 0.8 * FPS * 30, (len(good), last["good"])

        def states(stream: str) -> set[str]:
            return {json.loads(m.payload)["state"] for m in sub.of(f"/streams/{stream}/state") if m.payload}

        for case in CASES:
            s = last[case]
            counted = s["decode_errors"] > 0 or s["reconnects"] > 0
            assert counted, (case, s)
            assert cams[case].connections >= 2, (case, cams[case].connections)  # it came back after each hang-up
        # damaged streams still give what survives; the stalled one gives nothing and is reconnected
        for case in ("bitflips", "truncated", "garbage", "hevc_garbage", "timestamps", "codec_change", "resolution",
                     "fast"):
            assert detections(case, t0), case
        # damage the decoder finds is counted: packets it refuses, frames it flags as concealed
        for case in ("bitflips", "truncated", "garbage"):
            assert last[case]["decode_errors"] + last[case]["corrupt_frames"] > 0, (case, last[case])
        # the stalled camera: reconnected after each stall_timeout; only the frame or two in its first bytes
        stalled = detections("stall", t0)
        assert "reconnecting" in states("stall"), len(stalled)
        assert len(stalled) <= 3 * cams["stall"].connections, len(stalled)
        # one connection changes resolution three times: every size was decoded and detected on
        sizes = {(d["width"], d["height"]) for d in detections("resolution", t0)}
        assert {(320, 240), (16, 16), (640, 360)} <= sizes, sizes
        # a camera at 4x its announced rate: served at max_fps, the surplus counted as dropped
        assert last["fast"]["fps_in"] > 2 * FPS, last["fast"]
        assert last["fast"]["fps_processed"] <= FPS * 1.3, last["fast"]
        # memory stays bounded: no growth from the first half of the run to the second
        first = max(v for t, v in rss if t < RUN_S / 2)
        second = max(v for t, v in rss if t >= RUN_S / 2)
        print(f"RSS MB: first half max {first:.0f}, second half max {second:.0f}")
        assert second <= first * 1.25, rss
        assert fg.stop() == 0, fg.output()[-5000:]
        log = fg.output()
        assert "Traceback" not in log, log[-5000:]
    finally:
        sub.close()
        rtsp.kill()
        for cam in cams.values():
            cam.stop()
