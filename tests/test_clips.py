"""Event clips: the camera's packets around each event, copied into one MP4 per event (no re-encode),
served with range requests, played by Chromium; one disk budget for clips and snapshots; a full
disk fails a clip clearly and the next one is written again."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from pipeline import parse_config
from pipeline.analytics.eventstore import EventStore, query, segments
from streams.recorder import ClipResult, StreamRecorder
from tests.support.procs import MODEL, Mosquitto, RtspServer, start_pipeline, wait_until

GOP_S = 1.0  # the source's keyframe interval (write_video's default)


def probe(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        times = [float(f.time) for f in c.decode(s)]
        return {"codec": s.codec_context.name, "size": (s.codec_context.width, s.codec_context.height),
                "frames": len(times), "first": min(times), "last": max(times)}


@pytest.fixture(scope="module")
def scene_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streams.synthetic import Actor, ScriptedScene, write_video

    # one object comes in from the left at 3 s and leaves on the right before 8 s; nothing before or after
    scene = ScriptedScene("clip", 29, (Actor(1, 1, 34, (40, 200, 40), ((3, -40, 180), (8, 700, 180))),), 12.0,
                          width=640, height=360)
    video = tmp_path_factory.mktemp("clipsrc") / "clip.mp4"
    write_video(video, scene, scene.seconds, gop_seconds=GOP_S)
    return video


@pytest.mark.slow
async def test_event_clip_over_rtsp_is_a_stream_copy_around_the_event(
    tmp_path: Path, scene_video: Path, mosquitto: Mosquitto, topic_prefix: str
) -> None:
    from pipeline.api import local_api

    server = RtspServer({"cam": scene_video})
    server.start()
    pre, post = 2.0, 1.5
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
        "stream_defaults": {"record": {"enabled": True, "pre_s": pre, "post_s": post, "continuous": True,
                                       "segment_s": 5}},
        "streams": {"cam": {"url": server.url("cam"), "model": "shapes", "max_fps": 5}},
        "pipeline": {"status_interval": 0},
        "events": {"store": str(tmp_path / "ev" / "events.db"), "end_after": 1.0},
    }, tmp_path)
    pipeline, shutdown = await start_pipeline(config)
    api = local_api(pipeline, None)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app), base_url="http://framegrid")
    db = pipeline.analytics.db
    try:
        def clipped() -> list[dict[str, Any]]:
            return [r for r in query(db) if r["clip_path"]]

        await wait_until(lambda: clipped(), 60, "an event's clip")
        row = clipped()[-1]  # the first
        events = (await client.get("/api/events")).json()
        listed = next(e for e in events if e["id"] == row["id"])
        whole = await client.get(f"/api/events/{row['id']}/clip.mp4")
        part = await client.get(f"/api/events/{row['id']}/clip.mp4", headers={"Range": "bytes=100-299"})
        missing = await client.get("/api/events/nope/clip.mp4")
        figures = pipeline.stats_payload()["recording"]
        # continuous recording alongside: its segments listed and served by the API
        await wait_until(lambda: segments(db), 30, "a continuous segment")
        listed_segments = (await client.get("/api/recordings", params={"stream": "cam"})).json()
        segment = listed_segments[0]
        segment_file = await client.get(f"/api/recordings/{segment['id']}.mp4")
        segment_part = await client.get(f"/api/recordings/{segment['id']}.mp4", headers={"Range": "bytes=0-99"})
        none_later = (await client.get("/api/recordings", params={"since": segment["end_time"] + 3600})).json()
        no_segment = await client.get("/api/recordings/cam-1.mp4")
    finally:
        await shutdown()
        await client.aclose()
        server.kill()
    path = Path(row["clip_path"])
    assert path.parent.parent.parent == tmp_path / "ev" / "clips"  # <clips>/<stream>/<day>/<event>.mp4
    # a copy of the camera's own stream: same codec and size as the source
    source, clip = probe(scene_video), probe(path)
    assert clip["codec"] == source["codec"] == "h264"
    assert clip["size"] == source["size"]
    # it covers the event with its pre- and post-roll: from the keyframe at or before start - pre_s (at
    # most one GOP plus the ring's margin earlier) to at least end + post_s
    start, end = row["start_time"], row["end_time"]
    assert row["clip_start"] <= start - pre + 0.05, (row["clip_start"], start)
    assert row["clip_start"] >= start - pre - GOP_S - 0.5
    assert row["clip_end"] >= end + post - 0.05, (row["clip_end"], end)
    assert row["clip_end"] <= end + post + GOP_S
    # the file's own timeline spans what the store says, every frame there and decodable
    span = clip["last"] - clip["first"]
    assert abs(span - (row["clip_end"] - row["clip_start"])) < 0.3, (span, row)
    assert clip["frames"] >= int(span * 25 * 0.95)
    assert row["clip_size"] == path.stat().st_size == len(whole.content)
    # served whole and in ranges (a player seeks), listed with the event
    assert whole.status_code == 200
    assert whole.headers["content-type"] == "video/mp4"
    assert part.status_code == 206
    assert part.content == whole.content[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(whole.content)}"
    assert missing.status_code == 404
    assert listed["clip"]["size"] == row["clip_size"]
    assert figures["streams"]["cam"]["clips_written"] >= 1
    stored = segments(db)[0]
    assert segment["stream"] == "cam"
    assert segment["size"] == stored["size"] == len(segment_file.content)
    assert segment["end_time"] - segment["start_time"] >= 4.5  # about segment_s, cut at a keyframe
    assert segment_file.status_code == 200
    assert probe_bytes(segment_file.content, tmp_path / "segment.mp4")["codec"] == "h264"
    assert segment_part.status_code == 206
    assert segment_part.content == segment_file.content[:100]
    assert none_later == []
    assert no_segment.status_code == 404
    assert figures["streams"]["cam"]["disk_full"] is False
    # memory stays bounded: the ring held the pre-roll, its margin and a GOP, not the whole stream
    assert figures["streams"]["cam"]["ring_s"] <= pre + 3.0 + GOP_S + 1.0


def probe_bytes(data: bytes, path: Path) -> dict[str, Any]:
    path.write_bytes(data)
    return probe(path)


def feed(recorder: StreamRecorder, video: Path, t0: float, realtime: bool = False) -> float:
    """Demux `video` into the recorder as if it arrived live from `t0` (wall); returns the last time."""
    with av.open(str(video)) as c:
        s = c.streams.video[0]
        recorder.opened(s)
        t = t0
        for pkt in c.demux(s):
            if pkt.pts is None:
                continue
            t = t0 + float(pkt.pts * pkt.time_base)
            if realtime:
                time.sleep(max(0.0, t - time.time()))
            recorder.packet(pkt, t)
    return t


def test_a_full_disk_fails_one_clip_clearly_and_the_next_is_written(tmp_path: Path, scene_video: Path) -> None:
    done: list[ClipResult] = []
    clock = [0.0]
    recorder = StreamRecorder("cam", tmp_path, 1.0, 1.0, 600, done.append, lambda: clock[0])
    full = tmp_path / "full.mp4"
    Path(str(full) + ".part").symlink_to("/dev/full")  # every write there fails with ENOSPC
    recorder.begin("full", 3.0, full)
    recorder.finish("full", 5.0)
    clock[0] = feed(recorder, scene_video, 0.0)
    wait_for = time.monotonic() + 10
    while not done and time.monotonic() < wait_for:
        time.sleep(0.05)
    assert [r.key for r in done] == ["full"]
    assert done[0].path is None
    assert "space" in (done[0].error or "").lower()
    assert recorder.figures()["disk_full"] is True
    assert recorder.figures()["clips_failed"] == 1
    assert not full.exists()
    # space again: the next clip is written, and the state clears
    ok = tmp_path / "ok.mp4"
    recorder.begin("ok", 15.0, ok)
    recorder.finish("ok", 17.0)
    clock[0] = feed(recorder, scene_video, 12.0)
    recorder.close()
    assert [r.key for r in done] == ["full", "ok"]
    assert done[1].path == ok
    assert done[1].start <= 14.0
    assert done[1].end >= 18.0
    assert recorder.figures()["disk_full"] is False
    assert probe(ok)["frames"] >= 4 * 25 * 0.95


def test_one_budget_for_clips_and_snapshots_oldest_first_and_per_label_days(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.db", 30, 1000, 100, media_bytes=2500,
                       retain_days={"default": 10, "person": 1})
    store.start()
    now = time.time()
    files = {}
    for i, (label, age_days) in enumerate([("car", 5), ("car", 4), ("person", 2), ("car", 3), ("car", 0.1)]):
        eid = f"cam-{i}"
        after = {"id": eid, "track_id": i, "label": label, "first_seen": now - age_days * 86400,
                 "last_seen": now - age_days * 86400 + 5, "best_score": 0.9, "entered_zones": []}
        store.put({"v": 1, "stream": "cam", "type": "end", "before": None, "after": after,  # type: ignore[typeddict-item]
                   "changed": []})
        clip, crop, frame = (tmp_path / f"{eid}.{x}" for x in ("mp4", "crop.jpg", "jpg"))
        clip.write_bytes(b"c" * 600)
        crop.write_bytes(b"j" * 100)
        frame.write_bytes(b"j" * 100)
        store.set_snapshot(eid, str(crop), str(frame))
        store.set_clip(eid, str(clip), 600, after["first_seen"] - 1, after["last_seen"] + 1)
        files[eid] = (clip, crop, frame)
    old_segment, new_segment = tmp_path / "old-segment.mp4", tmp_path / "new-segment.mp4"
    old_segment.write_bytes(b"s" * 10)
    new_segment.write_bytes(b"s" * 10)
    store.add_segment("cam", str(old_segment), 10, now - 11 * 86400, now - 11 * 86400 + 60)  # past the default
    store.add_segment("cam", str(new_segment), 10, now - 60, now)
    store.close()
    # 5 x 800 bytes against 2500: the person's media go by its 1 day, then the oldest until it fits
    again = EventStore(tmp_path / "events.db", 30, 1000, 100, media_bytes=2500,
                       retain_days={"default": 10, "person": 1})
    again.start()  # retention runs at start
    rows = {r["id"]: r for r in query(tmp_path / "events.db", limit=10)}
    assert len(rows) == 5  # every event stays
    kept = {eid for eid, r in rows.items() if r["clip_path"]}
    assert kept == {"cam-1", "cam-3", "cam-4"}
    for eid, paths in files.items():
        assert all(p.exists() for p in paths) == (eid in kept)
    assert not old_segment.exists()  # continuous segments: the same budget, `continuous` or the default days
    assert new_segment.exists()
    assert again.media_size == 3 * 800 + 10
    assert again.media_deleted == 3
    again.close()


@pytest.mark.slow
async def test_chromium_plays_an_event_clip_from_the_page(tmp_path: Path, scene_video: Path, mosquitto: Mosquitto,
                                                          topic_prefix: str) -> None:
    import uvicorn

    from pipeline.api import local_api
    from tests.support.procs import free_port

    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
        "streams": {"cam": {"url": str(scene_video), "model": "shapes", "max_fps": 5,
                            "record": {"enabled": True, "pre_s": 1.0, "post_s": 1.0}}},
        "pipeline": {"status_interval": 0},
        "events": {"store": str(tmp_path / "ev" / "events.db"), "end_after": 1.0},
    }, tmp_path)
    pipeline, shutdown = await start_pipeline(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(local_api(pipeline, None).app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    driver = None
    try:
        await wait_until(lambda: any(r["clip_path"] for r in query(pipeline.analytics.db)), 60, "a clip")
        driver = await asyncio.to_thread(chromium)
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{port}/")
        played = await asyncio.to_thread(play_first_clip, driver)
    finally:
        if driver is not None:
            driver.quit()
        server.should_exit = True
        await serving
        await shutdown()
    assert played["error"] is None, played
    assert played["ended"] is True, played
    assert played["duration"] > 1.0, played
    assert played["width"] == 640, played


def chromium() -> Any:
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or "chromedriver"),
                            options=options)


def play_first_clip(driver: Any) -> dict[str, Any]:
    """Click the first event card's clip button and wait for its <video> to end (or fail)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    button = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".event .clip"))
    button.click()
    driver.set_script_timeout(60)
    result: dict[str, Any] = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const v = document.querySelector('.event video');"
        "const report = () => done({ended: v.ended, error: v.error && v.error.message || (v.error ? 'error' : null),"
        " duration: v.duration, width: v.videoWidth});"
        "v.playbackRate = 4; v.addEventListener('ended', report); v.addEventListener('error', report);"
        "v.play().catch((e) => done({ended: false, error: String(e), duration: v.duration, width: v.videoWidth}));")
    return result



def test_a_store_from_before_clips_is_migrated_with_its_events(tmp_path: Path) -> None:
    import sqlite3

    from pipeline.analytics.eventstore import MIGRATIONS

    db = tmp_path / "events.db"
    conn = sqlite3.connect(db)
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO events (id, stream, label, track_id, start_time, end_time, best_score, zones, data, "
                 "crop_path, frame_path, updated_at) VALUES ('cam-1-1', 'cam', 'car', 1, ?, ?, 0.9, '[]', '{}', "
                 "NULL, NULL, ?)", (time.time() - 60, time.time() - 50, time.time()))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = EventStore(db, 30, 1000, 100)
    store.start()
    store.close()
    (row,) = query(db)
    assert row["id"] == "cam-1-1"
    assert row["clip_path"] is None
    assert row["clip_size"] == 0
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3


def test_continuous_segments_follow_each_other_without_a_gap(tmp_path: Path, scene_video: Path) -> None:
    done: list[ClipResult] = []
    clock = [0.0]
    recorder = StreamRecorder("cam", tmp_path, 1.0, 1.0, 600, done.append, lambda: clock[0], segment_s=5.0)
    source = probe(scene_video)
    with av.open(str(scene_video)) as c:
        s = c.streams.video[0]
        recorder.opened(s)
        for pkt in c.demux(s):
            if pkt.pts is None:
                continue
            clock[0] = float(pkt.pts * pkt.time_base)
            recorder.packet(pkt, clock[0])
            time.sleep(0.002)  # the writer keeps up as it would with a live camera
    recorder.close()
    segments = [r for r in done if r.key.startswith("segment:")]
    assert len(segments) == 3  # 12 s in segments of 5 s (each cut at the next keyframe)
    assert all(r.path is not None and r.path.parent.parent.name == "continuous" for r in segments)
    probes = [probe(r.path) for r in segments if r.path is not None]
    assert [p["codec"] for p in probes] == ["h264"] * 3
    # every frame of the camera in exactly one segment, in order, each segment from a keyframe
    assert sum(p["frames"] for p in probes) == source["frames"]
    for a, b in itertools.pairwise(segments):
        assert 0 < b.start - a.end < 0.05  # the next one starts with the frame after this one's last
    assert [round(r.start) for r in segments] == [0, 5, 10]
