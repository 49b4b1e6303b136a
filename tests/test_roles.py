"""Camera roles, as NVR users run them: a substream (`detect_url`) decoded for detection, the main
stream (`url`) recorded by packet copy and never decoded; detections published in the main stream's
pixels. Over the real RTSP server, with the project's detector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from pipeline import parse_config
from pipeline.analytics.eventstore import query
from pipeline.api.target import LocalTarget
from pipeline.api.views import LatestResults, main_jpeg
from pipeline.config import ConfigError
from tests.support.procs import MODEL, Mosquitto, RtspServer, start_pipeline, wait_until

MAIN, SUB = (1280, 720), (640, 360)
SIDE = 34  # the object's side in the substream's pixels (twice that in the main stream's)


def camera(folder: Path, size: tuple[int, int]) -> Path:
    """The same scene at `size`: one square crosses from the left at 2 s and leaves on the right by 7 s."""
    from streams.synthetic import Actor, ScriptedScene, write_video

    k = size[0] / SUB[0]
    actor = Actor(1, 1, round(SIDE * k), (40, 200, 40), ((2, round(-40 * k), round(180 * k)),
                                                          (7, round(700 * k), round(180 * k))))
    scene = ScriptedScene("roles", 29, (actor,), 10.0, width=size[0], height=size[1])
    video = folder / f"cam-{size[0]}x{size[1]}.mp4"
    write_video(video, scene, scene.seconds, gop_seconds=1.0)
    return video


@pytest.mark.slow
async def test_a_substream_is_detected_on_and_the_main_stream_recorded_with_boxes_in_its_pixels(
    tmp_path: Path, mosquitto: Mosquitto, topic_prefix: str
) -> None:
    server = RtspServer({"main": camera(tmp_path, MAIN), "sub": camera(tmp_path, SUB)})
    server.start()
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
        "streams": {"cam": {"url": server.url("main"), "detect_url": server.url("sub"), "model": "shapes",
                            "max_fps": 5, "record": {"enabled": True, "pre_s": 1.0, "post_s": 1.0},
                            "zones": {"right": {"polygon": [[0.5, 0], [1, 0], [1, 1], [0.5, 1]]}}},
                    # not recorded: its main stream is not read but for a keyframe at start and per snapshot
                    "quiet": {"url": server.url("main"), "detect_url": server.url("sub"), "model": "shapes",
                              "max_fps": 5}},
        "pipeline": {"status_interval": 0},
        "events": {"store": str(tmp_path / "ev" / "events.db"), "end_after": 1.0},
    }, tmp_path)
    results: list[dict[str, Any]] = []
    raw: list[list[float]] = []  # the detector's boxes, in the substream's pixels

    class Keep:
        def emit(self, result: Any) -> None:
            results.append(result.payload())
            raw.extend([float(v) for v in b] for b in result.detections.boxes)

    pipeline, shutdown = await start_pipeline(config)
    pipeline.results.add_sink(Keep())
    db = pipeline.analytics.db
    try:
        await wait_until(lambda: [r for r in query(db) if r["clip_path"]], 60, "an event's clip")
        record, quiet = pipeline.ingest.records["cam"], pipeline.ingest.records["quiet"]
        decoded, main = record.source.size, record.main.size
        rows = [r for r in query(db) if r["clip_path"]]
        target = LocalTarget(pipeline, LatestResults())
        snaps = {n: await target.snapshot(n, False, main=True) for n in ("cam", "quiet")}
        figures = {n: target.stream_figures(n)["main"] for n in ("cam", "quiet")}
    finally:
        await shutdown()
        server.kill()
    assert decoded == SUB  # detection decoded the substream
    assert main == MAIN  # the main stream was opened (packets only)
    boxes = [d["box"] for r in results for d in r["detections"]]
    assert boxes, "no detection"
    assert all((r["width"], r["height"]) == MAIN for r in results)
    # in the main stream's pixels: each box is the detector's (substream) box scaled by 2 both ways
    assert len(boxes) == len(raw)
    for got, det in zip(boxes, raw, strict=True):
        assert all(abs(g - 2 * d) <= 0.11 for g, d in zip(got, det, strict=True)), (got, det)
    sides = sorted((b[2] - b[0] + b[3] - b[1]) / 2 for b in raw if b[0] > 0 and b[2] < SUB[0])
    assert SIDE <= sides[len(sides) // 2] <= 2 * SIDE, sides  # the square, found in the substream
    assert max(b[2] for b in boxes) > SUB[0]  # it crossed past what the substream's pixels reach
    # the event's state speaks the same pixels, and its zone (given as fractions) was entered
    row = rows[-1]
    assert "right" in row["zones"], row
    assert max(row["data"]["box"][0], row["data"]["box"][2]) > SUB[0], row["data"]
    # a main snapshot is the main stream's keyframe at full size: the reader's (recorded), or grabbed
    # on demand (the quiet stream's main was read twice: its size at start, then this snapshot)
    for name, got in snaps.items():
        assert got is not None
        picture = cv2.imdecode(np.frombuffer(got[1], np.uint8), cv2.IMREAD_COLOR)
        assert picture.shape == (MAIN[1], MAIN[0], 3), name
        assert picture.std() > 5, name  # a scene, not a blank
    cam, q = figures["cam"], figures["quiet"]
    assert (cam["read"], cam["state"], cam["size"]) == ("recorded", "streaming", list(MAIN)), cam
    assert cam["packets"] > 0, cam
    assert (q["read"], q["state"], q["size"], q["grabs"]) == ("on demand", "ok", list(MAIN), 2), q
    assert quiet.main is not None
    assert quiet.main.source is None  # no reader
    # the clip is the main stream, copied: its codec and size
    with av.open(row["clip_path"]) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.width, s.codec_context.height) == ("h264", *MAIN)


def test_roles_are_checked_where_they_are_configured(tmp_path: Path) -> None:
    base = {"models": {"m": {"type": "yolo", "weights": str(MODEL)}}}
    same = {"url": "rtsp://cam/main", "detect_url": "rtsp://cam/main", "model": "m"}
    with pytest.raises(ConfigError, match=r"streams.a: .*detect_url is the url"):
        parse_config({**base, "streams": {"a": same}}, tmp_path)
    pixels = {"url": "rtsp://cam/main", "detect_url": "rtsp://cam/sub", "model": "m",
              "zones": {"door": {"polygon": [[10, 10], [300, 10], [300, 200]]}}}
    with pytest.raises(ConfigError, match=r"zones.door: with detect_url, give the corners as fractions"):
        parse_config({**base, "streams": {"a": pixels}}, tmp_path)
    with pytest.raises(ConfigError, match=r"stream_defaults.detect_url: not a default"):
        parse_config({**base, "stream_defaults": {"detect_url": "rtsp://x"},
                      "streams": {"a": {"url": "rtsp://cam/main", "model": "m"}}}, tmp_path)
    secret = {"url": "rtsp://u:mainpw@cam/main", "detect_url": "rtsp://u:subpw@cam/sub", "model": "m"}
    cfg = parse_config({**base, "streams": {"a": secret}}, tmp_path)
    assert {"mainpw", "subpw"} <= set(cfg.secrets())


async def test_a_main_snapshot_of_a_stream_with_one_url_is_refused_by_name(tmp_path: Path) -> None:
    from pipeline.core.ingest import Ingest
    from pipeline.errors import Invalid
    from streams import SYSTEM_CLOCK

    cfg = parse_config({"models": {"m": {"type": "yolo", "weights": str(MODEL)}},
                        "streams": {"door": {"url": "rtsp://cam/main", "model": "m"}}}, tmp_path)
    record = Ingest(SYSTEM_CLOCK, cfg.streams).records["door"]
    with pytest.raises(Invalid, match=r"stream door has one URL.*main= needs detect_url"):
        await main_jpeg(record)
