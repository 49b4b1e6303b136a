"""Zones, lines, events (new -> update -> end), the SQLite event store and snapshots."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from detectors import Detections
from pipeline import parse_config
from pipeline.analytics.events import StreamEvents
from pipeline.analytics.eventstore import EventStore, query
from pipeline.analytics.webhooks import sign
from pipeline.config import EventsConfig, StreamConfig
from pipeline.core.zones import crossing, inside, resolve
from tests.support.hooks import HookServer
from tests.support.media import event
from tests.support.procs import MODEL, ROOT, Mosquitto, Subscriber, start_pipeline, wait_until


# -- geometry ------------------------------------------------------------------------------------------
def test_zone_and_line_geometry() -> None:
    square = resolve([[0, 0], [0.5, 0], [0.5, 1], [0, 1]], 640, 360)  # fractions of the frame
    assert square == [(0, 0), (320, 0), (320, 360), (0, 360)]
    assert inside((100, 100), square)
    assert inside((320, 100), square)
    assert not inside((321, 100), square)
    assert resolve([[10, 20], [300, 20], [300, 200]], 640, 360) == [(10, 20), (300, 20), (300, 200)]  # pixels
    a, b = (320.0, 0.0), (320.0, 360.0)  # downwards: its left is x > 320 (image coordinates, y down)
    assert crossing((330, 100), (310, 100), a, b) == "in"
    assert crossing((310, 100), (330, 100), a, b) == "out"
    assert crossing((310, 100), (315, 100), a, b) is None
    assert crossing((330, 400), (310, 400), a, b) is None  # beyond the segment's end
    assert crossing((320, 100), (310, 100), a, b) is None  # starting on the line is no crossing


# -- the event state machine ----------------------------------------------------------------------------
def result(t: float, boxes: list[list[float]], ids: list[int], scores: list[float] | None = None,
           labels: tuple[str, ...] | None = None, mono: float | None = None) -> Any:
    n = len(boxes)
    det = Detections(np.array(boxes, np.float32).reshape(n, 4), np.array(scores or [0.8] * n, np.float32),
                     np.zeros(n, np.int32), labels or ("car",) * n)
    frame = SimpleNamespace(captured_at=t, captured_mono=t if mono is None else mono, width=640, height=360)
    stream = SimpleNamespace(main_scale=lambda width, height: None)  # one URL: nothing scaled
    return SimpleNamespace(track_ids=np.array(ids, np.int64), frame=frame, detections=det, attributes=None,
                           stream=stream)


def engine(**events: Any) -> tuple[StreamEvents, list[dict[str, Any]], list[tuple[str, str, Any]]]:
    cfg = StreamConfig.model_validate({
        "url": "x", "model": "m",
        "zones": {"left": {"polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]], "min_frames": 2},
                  "people_only": {"polygon": [[0, 0], [1, 0], [1, 1], [0, 1]], "objects": ["person"]}},
        "lines": {"mid": {"points": [[0.5, 0], [0.5, 1]]}}})
    out: list[dict[str, Any]] = []
    counts: list[tuple[str, str, Any]] = []
    # the rules below are about announced objects: announced at first sight unless a test says otherwise
    ev = StreamEvents("cam", cfg, EventsConfig(**{"min_seen_s": 0.0, **events}),
                      lambda k, s, p: counts.append((k, s, p)))
    return ev, out, counts


def collect(out: list[dict[str, Any]]) -> Any:
    """An `Emit` that keeps each published event's type and states (internal `_...` ones left out)."""
    def emit(kind: str, before: Any, after: Any, changed: list[str], obj: Any, res: Any) -> None:
        if not kind.startswith("_"):
            out.append({"type": kind, "before": before, "after": after, "changed": changed})

    return emit


def feed(ev: StreamEvents, out: list[dict[str, Any]], r: Any) -> None:
    ev.on_result(r, collect(out))


def test_an_object_crossing_a_line_and_a_zone_gives_one_event_each() -> None:
    ev, out, counts = engine(update_interval=10.0, end_after=2.0)
    # a car drives right to left across the middle at 5 fps: x from 500 to 100, 40 px per frame
    for k in range(11):
        x = 500 - 40 * k
        feed(ev, out, result(1000 + k / 5, [[x - 20, 150, x + 20, 190]], [7], scores=[0.8 + 0.01 * k]))
    types = [e["type"] for e in out]
    assert types[0] == "new"
    assert types.count("new") == 1
    changed = [c for e in out for c in e["changed"]]
    assert changed.count("crossed:mid:in") == 1
    assert changed.count("entered:left") == 1
    assert not any(c.startswith("left:") for c in changed)
    assert not any("people_only" in c for c in changed)  # a car is not a person
    assert ("lines", "mid", {"v": 1, "in": 1, "out": 0}) in counts
    assert ("zones", "left/car", 1) in counts
    assert ("zones", "left/all", 1) in counts
    last = out[-1]["after"]
    assert last["zones"] == ["left"]
    assert last["entered_zones"] == ["left"]
    assert last["crossings"][0]["line"] == "mid"
    # min_frames 2: inside from x=300 (the first frame at x <= 320 is 300 -> enters on the second, 260)
    entered = next(e for e in out if "entered:left" in e["changed"])
    assert entered["after"]["box"][0] == pytest.approx(260 - 20)
    assert entered["before"]["zones"] == []
    assert entered["after"]["zones"] == ["left"]
    # unseen for end_after (2 s): its event ends, and the zone count goes back to 0
    feed(ev, out, result(1000 + 2 + 2.1, [], []))
    assert out[-1]["type"] == "end"
    assert out[-1]["after"]["zones"] == []
    assert ("zones", "left/car", 0) in counts[counts.index(("zones", "left/car", 1)):]


def test_a_flicker_starts_no_event_and_a_track_that_lasts_starts_one_from_its_first_sighting() -> None:
    """min_seen_s 0.5 at 5 fps: track 8 seen on 2 frames (a duplicate box) is never announced, counted
    or ended; track 7 is announced on its 4th frame (0.6 s) with what happened before (entered the
    zone) in its `new`, its first sighting as `first_seen`, and only then counted."""
    ev, out, counts = engine(min_seen_s=0.5, update_interval=10.0, end_after=2.0)
    for k in range(8):  # car 7 drives left from x=340 (into the zone on its 2nd frame, min_frames 2)
        x = 340 - 20 * k
        boxes, ids = [[x - 20, 150, x + 20, 190]], [7]
        if k in (1, 2):
            boxes.append([x - 18, 152, x + 22, 192])
            ids.append(8)
        n = len(counts)
        feed(ev, out, result(1000 + k / 5, boxes, ids))
        if k < 3:
            assert not out, k
            assert ("zones", "left/car", 1) not in counts[n:]
    assert [(e["type"], e["after"]["track_id"]) for e in out] == [("new", 7)]
    assert out[0]["after"]["first_seen"] == pytest.approx(1000.0)
    assert "entered:left" in out[0]["changed"]
    assert out[0]["after"]["zones"] == ["left"]
    assert ("zones", "left/car", 1) in counts
    assert ("objects", "car", 2) not in counts  # the flicker was never counted
    feed(ev, out, result(1000 + 8 / 5 + 2.1, [], []))
    assert [(e["type"], e["after"]["track_id"]) for e in out] == [("new", 7), ("end", 7)]
    assert ev.discarded == 1


def test_a_wall_clock_step_neither_ends_nor_prolongs_an_event() -> None:
    """The wall clock steps forward an hour, then back two, while objects are tracked: object 4 (gone just
    before the step forward) is not ended early, object 5 (gone just before the step back) is not kept
    alive, object 3 stays one event; the published stamps follow the wall clock."""
    ev, out, _ = engine(end_after=2.0, update_interval=60.0)
    wall, mono = 1_000_000.0, 500.0
    ended_at: dict[int, float] = {}
    last_seen_mono: dict[int, float] = {}
    for k in range(34):  # 5 fps; +1 h at frame 10, -2 h at frame 20
        wall += 0.2 + (3600 if k == 10 else 0) - (7200 if k == 20 else 0)
        mono += 0.2
        present = [(3, [500, 150, 540, 190])] + ([(4, [100, 250, 140, 290])] if k <= 8 else []) + \
                  ([(5, [300, 50, 340, 90])] if k <= 18 else [])
        for tid, _ in present:
            last_seen_mono[tid] = mono
        n = len(out)
        feed(ev, out, result(wall, [b for _, b in present], [t for t, _ in present], mono=mono))
        for e in out[n:]:
            if e["type"] == "end":
                ended_at[e["after"]["track_id"]] = mono
    assert set(ended_at) == {4, 5}
    for tid in (4, 5):  # ended by the monotonic clock: end_after (2 s) unseen, within one frame
        assert 2.0 <= ended_at[tid] - last_seen_mono[tid] <= 2.2 + 1e-9, (tid, ended_at[tid] - last_seen_mono[tid])
    kinds = [(e["type"], e["after"]["track_id"]) for e in out]
    assert kinds.count(("new", 3)) == 1
    five = next(e for e in out if e["type"] == "end" and e["after"]["track_id"] == 5)
    assert five["after"]["last_seen"] == pytest.approx(1_000_000.0 + 19 * 0.2 + 3600)  # a stamp: the wall's


def test_a_results_latency_ignores_a_wall_clock_step_between_capture_and_publish() -> None:
    from pipeline.core.results import Result
    from streams.frame import Frame

    frame = Frame("cam", 0, np.zeros((8, 8, 3), np.uint8), captured_at=1_000_000.0, pts=None, decode_ms=1.0,
                  captured_mono=50.0)
    stepped_back = Result(None, 1, "m", frame, 996_400.1, 996_400.2, None, published_mono=50.2)  # type: ignore[arg-type]
    assert stepped_back.latency_ms == pytest.approx(200.0)


def test_updates_are_rate_limited_but_zone_changes_are_not() -> None:
    ev, out, _ = engine(update_interval=5.0)
    for k in range(20):  # still in the right half, its score rising every frame
        feed(ev, out, result(1000 + k / 5, [[500, 150, 540, 190]], [3], scores=[0.5 + 0.02 * k]))
    updates = [e for e in out if e["type"] == "update"]
    assert len(updates) == 1
    assert "best_score" in updates[0]["changed"]
    assert updates[0]["after"]["best_score"] > updates[0]["before"]["best_score"]
    ev2, out2, _ = engine(update_interval=5.0)
    for k, x in enumerate([500, 300, 260, 500, 520, 300, 280]):  # in, out, in again within 5 s
        feed(ev2, out2, result(1000 + k / 5, [[x - 20, 150, x + 20, 190]], [4]))
    changed = [c for e in out2 for c in e["changed"]]
    assert changed.count("entered:left") == 2
    assert changed.count("left:left") == 1


def test_stationary_and_reconnect_end_all() -> None:
    ev, out, _ = engine(stationary_after=1.0, update_interval=0.0)
    for k in range(10):
        feed(ev, out, result(1000 + k / 5, [[500, 150, 540, 190], [100 + 30 * k, 50, 140 + 30 * k, 90]], [1, 2]))
    stationary = [e for e in out if "stationary" in e["changed"]]
    assert [e["after"]["track_id"] for e in stationary] == [1]
    ev.end_all(collect(out))
    assert sorted(e["after"]["track_id"] for e in out if e["type"] == "end") == [1, 2]
    assert not ev.objects


# -- the store ------------------------------------------------------------------------------------------

def test_store_migrates_filters_and_retains(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    store = EventStore(db, max_age_days=1, max_events=5, max_queue=1000)
    store.start()
    now = time.time()
    store.put(event(1, now - 3 * 86400))  # older than max_age_days
    for i in range(2, 10):
        store.put(event(i, now - 100 + i))
    store.put(event(9, now - 100 + 9, "end"))
    store.close()
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 3  # (2: clips, 3: segments)
    assert len(query(db)) == 9
    assert query(db, event_id=event(9, now - 91)["after"]["id"])[0]["end_time"] is not None
    store = EventStore(db, max_age_days=1, max_events=5, max_queue=1000)
    store.start()  # retention at start: the old one and the oldest beyond 5 go
    store.close()
    rows = query(db)
    assert [r["track_id"] for r in rows] == [9, 8, 7, 6, 5]
    assert query(db, label="person") == []
    assert len(query(db, since=now - 100 + 8)) == 2


def test_store_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    script = f"""
import time
from pipeline.analytics.eventstore import EventStore
from tests.support.media import event
store = EventStore(__import__("pathlib").Path({str(db)!r}), 30, 100000, 1000)
store.start()
i = 0
while True:
    i += 1
    store.put(event(i, time.time()))
    if i % 50 == 0:
        time.sleep(0.01)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        # read while it writes, from the start (the file exists before its schema does)
        while time.monotonic() < deadline and len(query(db, limit=1000)) < 500:
            time.sleep(0.1)
    finally:  # never leave the writer running (it would load the machine for the rest of the suite)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.close()
    assert kept >= 500
    store = EventStore(db, 30, 100000, 1000)  # restart: opens, migrates nothing, writes on
    store.start()
    store.put(event(10**6, time.time()))
    store.close()
    assert len(query(db, limit=10**6)) == kept + 1


# -- through the real pipeline and a real broker ----------------------------------------------------------
HOOK_SECRET = "hook-secret-7f3a"
@pytest.mark.slow
async def test_events_zone_counts_store_and_snapshots_from_a_real_scene(
    tmp_path: Path, mosquitto: Mosquitto, topic_prefix: str
) -> None:
    import httpx

    from pipeline.api import local_api
    from pipeline.core.zones import anchor_of
    from streams.synthetic import Actor, ScriptedScene, write_video

    # the zone is the frame's left half, the line its middle: A starts inside and leaves, B comes in,
    # C comes in, stops, and goes out again (different heights: nobody hides anybody)
    scene = ScriptedScene("events", 21, (
        Actor(1, 0, 30, (40, 40, 230), ((3, 80, 70), (13, 560, 70))),
        Actor(2, 1, 30, (40, 200, 40), ((3, 560, 180), (13, 80, 180))),
        Actor(3, 2, 32, (230, 60, 40), ((3, 540, 290), (7, 180, 290), (10, 180, 290), (16, 560, 290))),
    ), 18.0, width=640, height=360)  # still for 3 s: a late start of the pipeline misses no crossing
    video = tmp_path / "events.mp4"
    write_video(video, scene, scene.seconds)
    hooks = HookServer(fail_first=2)  # the receiver is down for the first two tries: retried, not lost
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
        "streams": {"cam": {"url": str(video), "model": "shapes", "max_fps": 5, "loop": False,
                            "zones": {"left": {"polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}},
                            "lines": {"mid": {"points": [[0.5, 0], [0.5, 1]]}}}},
        "pipeline": {"status_interval": 0},
        "events": {"store": str(tmp_path / "ev" / "events.db"), "update_interval": 1.0, "mqtt_snapshots": True},
        "webhooks": [{"url": hooks.url("/all"), "secret": HOOK_SECRET, "events": ["new", "end"]},
                     {"url": hooks.url("/people"), "name": "people", "labels": ["person"]}],
    }, tmp_path)
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config)
    processed: list[tuple[int, float]] = []  # (seq, pts) of every result, as the pipeline made it

    class Processed:
        def emit(self, result: Any) -> None:
            processed.append((result.seq, result.frame.pts))

    pipeline.results.add_sink(Processed())
    api = local_api(pipeline, None)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app), base_url="http://framegrid")
    try:
        # until every crossing of the script was seen (a loaded machine processes fewer frames: fine)
        await wait_until(lambda: any(m.json()["pts"] >= 14.5 for m in sub.of("/streams/cam/detections")), 120,
                         "results past the scene's last crossing")
        live = (await client.get("/api/events")).json()
        assert any(e["end_time"] is None for e in live)  # objects still seen
        seen = next(e for e in live if e["end_time"] is None)
        snap = await client.get(f"/api/events/{seen['id']}/snapshot.jpg?crop=1")
        assert snap.status_code == 200
        assert snap.content[:2] == b"\xff\xd8"
    finally:
        await shutdown()  # every live object's event ends
        await client.aclose()
    await asyncio_sleep(1.0)
    sub.close()
    hooks.close()
    hook_figures = pipeline.analytics.webhooks.figures()
    shots = [m for m in sub.messages if "/streams/cam/snapshot/" in m.topic]
    assert shots
    assert all(m.payload[:2] == b"\xff\xd8" for m in shots)

    events = [m.json() for m in sub.of("/events")]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        assert e["v"] == 1
        assert e["stream"] == "cam"
        by_id.setdefault(e["after"]["id"], []).append(e)
    assert len(by_id) == 3, "one event per object: an identity was lost"
    for seq in by_id.values():  # new -> update* -> end, one each
        kinds = [e["type"] for e in seq]
        assert kinds[0] == "new", kinds
        assert kinds[-1] == "end", kinds
        assert kinds.count("new") == kinds.count("end") == 1, kinds

    # the webhook got every new and end event MQTT carried (the ends at shutdown too), each signed over
    # its exact body, after the receiver's first two failures were retried; the `person` hook got none
    assert [r.status for r in hooks.requests[:2]] == [500, 500]
    delivered = [r for r in hooks.accepted() if r.path == "/all"]
    for r in delivered:
        assert r.headers["X-Framegrid-Signature"] == sign(HOOK_SECRET, r.body), r.headers
        assert r.headers["Content-Type"] == "application/json"
    posted = [json.loads(r.body) for r in delivered]
    assert sorted((e["type"], e["after"]["id"]) for e in posted) == sorted(
        (e["type"], e["after"]["id"]) for e in events if e["type"] in ("new", "end"))
    assert not [r for r in hooks.requests if r.path == "/people"]
    assert hook_figures["webhook-1"]["sent"] == len(delivered) == 6
    assert hook_figures["webhook-1"]["retried"] >= 2
    assert hook_figures["webhook-1"]["failed"] == hook_figures["webhook-1"]["dropped"] == 0
    assert hook_figures["people"]["sent"] == 0

    # every line crossing of the truth, on the frames processed, is one event
    results = [m.json() for m in sub.of("/streams/cam/detections")]
    received = sorted(m["seq"] for m in results)
    missed = sorted(set(range(1, len(processed) + 1)) - set(received))
    assert received == list(range(1, len(received) + 1)), ("the subscriber missed results", len(processed), missed)
    assert len(received) == len(processed), (
        "the subscriber missed results",
        len(processed),
        sorted(set(range(1, len(processed) + 1)) - set(received)),
    )
    truth_crossings: list[str] = []
    published_crossings = [c.rsplit(":", 1)[1] for e in events for c in e["changed"] if c.startswith("crossed:mid")]
    last_x: dict[int, float] = {}
    starts_inside = 0
    for _, pts in sorted(processed)[2:]:  # from when the first tracks were announced (min_hits 2)
        index = round(pts * scene.fps)
        for a, shape in zip(scene.actors, scene.shapes_at(index), strict=True):
            x = anchor_of(shape.box(scene.width, scene.height), "bottom_center")[0]
            starts_inside += a.id not in last_x and x < 320
            if a.id in last_x and (last_x[a.id] < 320) != (x < 320):  # (a frame exactly on the line: right side)
                # the line runs downwards: its right-hand side (`in`) is the frame's left half
                truth_crossings.append("in" if x < 320 else "out")
            last_x[a.id] = x
    # the script crosses four times; a loaded machine may skip a stretch of frames (keep-latest), and
    # what it did not process it cannot count: the truth is taken on the processed frames
    gaps = [(a, b) for (_, a), (_, b) in zip(sorted(processed), sorted(processed)[1:], strict=False) if b - a > 1.0]
    assert len(truth_crossings) >= 2, ("the results missed most of the scene", gaps)
    assert sorted(published_crossings) == sorted(truth_crossings), (published_crossings, truth_crossings)
    # the zone is the frame's left half: leaving it is crossing the line outwards, once each
    left = sum(1 for e in events for c in e["changed"] if c == "left:left")
    assert left == truth_crossings.count("out")
    # entering it: crossing inwards, or being first seen inside (an object's `new` event), once each
    entered = sum(1 for e in events for c in e["changed"] if c == "entered:left")
    assert entered == truth_crossings.count("in") + starts_inside, (entered, truth_crossings)
    last = sub.of("/streams/cam/lines/mid")[-1].json()
    assert (last["in"], last["out"]) == (truth_crossings.count("in"), truth_crossings.count("out"))
    zone_topics = {m.topic.split("/zones/")[1] for m in sub.of("") if "/zones/" in m.topic}
    assert "left/all" in zone_topics

    # the store has each event, ended; snapshots were written for the ended ones
    db = tmp_path / "ev" / "events.db"
    rows = query(db, limit=1000)
    assert {r["id"] for r in rows} == set(by_id)
    assert all(r["end_time"] is not None for r in rows)
    with_snap = [r for r in rows if r["crop_path"]]
    assert with_snap
    assert all(Path(r["crop_path"]).is_file() and Path(r["frame_path"]).is_file() for r in with_snap)
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "events", str(tmp_path / "none.toml"), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2  # a missing config is named
    cfg = tmp_path / "fg.toml"
    cfg.write_text(f'[events]\nstore = "{db}"\n')
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "events", str(cfg), "--stream", "cam", "--since", "1h", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert {r["id"] for r in json.loads(out.stdout)} == set(by_id)


async def asyncio_sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


def test_snapshots_are_bounded_per_stream(tmp_path: Path) -> None:
    from pipeline.analytics.events import TrackedObject
    from pipeline.analytics.snapshots import Snapshots

    shots = Snapshots(tmp_path, max_per_stream=2)
    image = np.full((360, 640, 3), 90, np.uint8)
    for i in range(4):
        obj = TrackedObject(f"cam-{i}-0", "cam", i, "car", 0.9, 0.9, [100, 100, 200, 200], 0.0, 0.0, (640, 360))
        res = SimpleNamespace(frame=SimpleNamespace(captured_at=float(i), image=image))
        shots({"type": "new"}, obj, res)
        assert obj.snapshot  # a view is being kept for it
        shots({"type": "end"}, obj, None)
    shots.close()
    files = sorted(p.name for p in (tmp_path / "cam").iterdir())
    assert files == ["cam-2-0-crop.jpg", "cam-2-0-frame.jpg", "cam-3-0-crop.jpg", "cam-3-0-frame.jpg"]
    assert shots.written == 4


def test_snapshot_views_waiting_for_the_encoder_are_bounded(tmp_path: Path) -> None:
    """Each waiting view holds its whole frame: with the encoder busy, superseded views are cancelled
    and beyond MAX_PENDING new ones are skipped (counted), so memory cannot grow with the backlog."""
    import threading

    from pipeline.analytics import snapshots as snap
    from pipeline.analytics.events import TrackedObject

    shots = snap.Snapshots(tmp_path, max_per_stream=100)
    gate = threading.Event()
    shots._pool.submit(gate.wait)  # the encoder is busy until the gate opens
    image = np.full((1080, 1920, 3), 90, np.uint8)
    objs = [
        TrackedObject(f"cam-{i}-0", "cam", i, "car", 0.5, 0.5, [100, 100, 200, 200], 0.0, 0.0, (1920, 1080))
        for i in range(20)
    ]
    for t in range(3):  # each object gets a better view every second: the older one is superseded
        for obj in objs:
            obj.score = 0.5 + 0.1 * t
            shots({"type": "update"}, obj, SimpleNamespace(frame=SimpleNamespace(captured_at=float(t), image=image)))
    import gc

    frames = sum(1 for o in gc.get_referrers(image) if isinstance(o, list | tuple))  # views holding the frame
    # every second: the first MAX_PENDING objects' views replace their own (cancelled) ones, the rest are skipped
    assert shots._pending == snap.MAX_PENDING, (shots._pending, shots.skipped)
    assert shots.skipped == (20 - snap.MAX_PENDING) * 3, (shots._pending, shots.skipped)
    assert frames == snap.MAX_PENDING, frames  # not one per superseded view still in the executor's queue
    gate.set()
    for obj in objs:
        shots({"type": "end"}, obj, None)
    shots.close()
    assert shots._pending == 0
    assert shots.written == snap.MAX_PENDING


def test_processes_opening_one_new_store_together_migrate_it_once(tmp_path: Path) -> None:
    """Cluster nodes on one machine share the config's events folder: opened at the same moment by
    several writers, the store is created once (before, two raced: 'table events already exists')."""
    import threading

    from pipeline.analytics.eventstore import MIGRATIONS, connect, migrate

    path = tmp_path / "events.db"
    barrier, errors, versions = threading.Barrier(8), [], []

    def open_store() -> None:
        try:
            barrier.wait(30)
            conn = connect(path)  # all at once: the switch to WAL races too
            try:
                migrate(conn)
                versions.append(conn.execute("PRAGMA user_version").fetchone()[0])
            finally:
                conn.close()
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=open_store) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert versions == [len(MIGRATIONS)] * 8
    conn = sqlite3.connect(path)
    assert [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ] == ["events_label_start", "events_media", "events_start", "events_stream_start", "segments_start"]
    conn.close()


def test_a_stalled_store_drops_new_writes_and_counts_them(tmp_path: Path) -> None:
    """The writer's queue is bounded: with its thread not draining, the bound holds, the excess is
    counted, and what fit is written once the writer runs."""
    store = EventStore(tmp_path / "events.db", 30, 100000, max_queue=10)
    now = time.time()
    for i in range(25):  # not started: nothing drains
        store.put(event(i, now + i))
    assert store.dropped == 15
    store.start()
    store.close()
    assert len(query(tmp_path / "events.db", limit=100)) == 10


# -- webhooks: the hook's own rules, against a real local HTTP server ---------------------------------------
def hook_event(kind: str, label: str = "car", stream: str = "cam") -> Any:
    state = {"id": f"{stream}-1-0", "track_id": 1, "label": label, "score": 0.9, "best_score": 0.9,
             "box": [0.0, 0.0, 1.0, 1.0], "zones": [], "entered_zones": [], "crossings": [], "first_seen": 0.0,
             "last_seen": 0.0, "stationary": False, "has_snapshot": False}
    return {"v": 1, "stream": stream, "type": kind, "before": None, "after": state, "changed": []}


async def test_a_webhook_filters_bounds_refuses_and_keeps_its_url_secret(caplog: pytest.LogCaptureFixture) -> None:
    import httpx

    from pipeline.analytics.webhooks import Webhooks
    from pipeline.config import ConfigError, WebhookConfig

    with HookServer() as server:
        url = server.url("/h").replace("http://", "http://user:hook-pass@")
        hooks = Webhooks([WebhookConfig(url=url, labels=["car"], streams=["cam"], max_queue=2, retries=3)],
                         ["webhook-1"], ("hook-pass",))
        (hook,) = hooks.hooks
        for event in (hook_event("new"), hook_event("update"), hook_event("new", label="dog"),
                      hook_event("new", stream="other"), hook_event("end"), hook_event("end")):
            hooks.put(event)
        assert hook.queue.qsize() == 2  # update: not asked for; dog, other: filtered; the third: no room
        assert hook.dropped == 1
        async with httpx.AsyncClient() as client:
            while not hook.queue.empty():
                assert await hook.deliver(client, hook.queue.get_nowait())
        assert [json.loads(r.body)["type"] for r in server.accepted()] == ["new", "end"]
        assert "X-Framegrid-Signature" not in server.requests[0].headers  # no secret, no signature
    with HookServer(fail_first=100) as down:  # always 500: retried, then given up and counted
        hooks = Webhooks([WebhookConfig(url=down.url(), retries=1)], ["webhook-1"], ())
        async with httpx.AsyncClient() as client:
            assert not await hooks.hooks[0].deliver(client, hook_event("new"))
        assert len(down.requests) == 2
        assert hooks.figures()["webhook-1"] == {"url": down.url(), "queued": 0, "sent": 0, "failed": 1, "dropped": 0,
                                                "retried": 1, "last_error": "HTTP 500"}
    refused = httpx.MockTransport(lambda request: httpx.Response(403))  # a 4xx is the receiver's no: once
    hooks = Webhooks([WebhookConfig(url="http://127.0.0.1:9/h", retries=5)], ["webhook-1"], ())
    async with httpx.AsyncClient(transport=refused) as client:
        assert not await hooks.hooks[0].deliver(client, hook_event("new"))
    assert hooks.hooks[0].retried == 0
    assert "hook-pass" not in caplog.text
    with pytest.raises(ConfigError) as bad:
        parse_config({"webhooks": [{"url": "ftp://x/h"}]}, Path("."))
    assert bad.value.errors == [("webhooks[0].url", "must be an http:// or https:// URL with a host "
                                                    "(got 'ftp://x/h')")]
    with pytest.raises(ConfigError) as twice:
        parse_config({"webhooks": [{"url": "http://a/h", "name": "a"}, {"url": "http://b/h", "name": "a"}]},
                     Path("."))
    assert sorted(k for k, _ in twice.value.errors) == ["webhooks[0].name", "webhooks[1].name"], twice.value.errors
