"""Tracking: ultralytics' trackers fed with real time, min_hits, reconnects, and track ids on MQTT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectors import Detections
from pipeline import parse_config
from pipeline.analytics.tracking import StreamTracker, TrackerSettings
from tests.support.media import detections
from tests.support.procs import MODEL, Mosquitto, Subscriber, start_pipeline, wait_until


def boxes_at(t: float, start: np.ndarray, vel: np.ndarray, size: float = 40) -> Detections:
    c = start + vel * t
    n = len(c)
    return Detections(np.concatenate([c - size / 2, c + size / 2], 1).astype(np.float32),
                      np.full(n, 0.9, np.float32), np.zeros(n, np.int32), ("car",) * n)


def run(tracker: StreamTracker, fps: float, seconds: float, start: np.ndarray, vel: np.ndarray,
        t0: float = 1000.0) -> list[np.ndarray]:
    return [tracker.update(boxes_at(k / fps, start, vel), t0 + k / fps) for k in range(int(fps * seconds))]


@pytest.mark.parametrize("kind", ["bytetrack", "botsort"])
def test_ids_are_stable_and_announced_after_min_hits(kind: str) -> None:
    rng = np.random.default_rng(1)
    start, vel = rng.uniform(100, 1500, (20, 2)), rng.uniform(-60, 60, (20, 2))  # px/s
    out = run(StreamTracker(TrackerSettings(type=kind, min_hits=3)), 25, 4, start, vel)
    assert (out[0] == 0).all()
    assert (out[1] == 0).all()
    assert (out[2] > 0).all()
    for k in range(3, len(out)):
        assert (out[k] == out[2]).all(), f"ids changed at frame {k}"
    assert len(set(out[2].tolist())) == 20


def test_a_max_fps_gap_is_predicted_in_real_time() -> None:
    """Fast objects at 5 fps: the motion model steps the real 200 ms. Counting frames instead (one
    40 ms step per update, as the tracker alone does) loses them; by real time they keep their ids."""
    start = np.array([[100.0, 100.0], [100.0, 400.0], [100.0, 700.0]])
    vel = np.array([[260.0, 0.0], [260.0, 0.0], [260.0, 0.0]])  # 52 px per 200 ms on a 40 px box

    def warm_then_fast(tracker: StreamTracker) -> list[np.ndarray]:
        # at 25 fps the velocity is learnt, then the stream is throttled to 5 fps
        slow = run(tracker, 25, 1.0, start, vel)
        fast = [tracker.update(boxes_at(1.0 + k / 5, start, vel), 1001.0 + k / 5) for k in range(1, 11)]
        return slow + fast

    timed = warm_then_fast(StreamTracker(TrackerSettings()))
    assert (timed[-1] == timed[24]).all()
    assert (timed[-1] > 0).all()

    frames = StreamTracker(TrackerSettings())
    frames.update = _frame_counting(frames)  # type: ignore[method-assign]
    counted = warm_then_fast(frames)
    assert not (counted[-1] == counted[24]).all(), "frame counting kept the ids too: the test shows nothing"


def _frame_counting(tracker: StreamTracker) -> object:
    """The same tracker, but each update is one 1/25 s step whatever the real gap (ultralytics' own way)."""
    real = tracker.update
    state = {"k": 0}

    def update(det: Detections, t: float) -> np.ndarray:
        state["k"] += 1
        return real(det, 1000.0 + state["k"] / 25)

    return update


def test_lost_tracks_are_kept_for_buffer_seconds_not_frames() -> None:
    start, vel = np.array([[200.0, 200.0]]), np.array([[20.0, 0.0]])
    for fps in (25, 5):
        tr = StreamTracker(TrackerSettings(buffer_s=1.0))
        seen = run(tr, fps, 2, start, vel)
        tid = int(seen[-1][0])
        empty = Detections.empty()
        t = 1000 + 2.0
        for k in range(int(fps * 0.6)):  # hidden for 0.6 s (< 1 s): the same id comes back
            tr.update(empty, t + k / fps)
        back = tr.update(boxes_at(2.6, start, vel), t + 0.6)
        back = tr.update(boxes_at(2.6 + 1 / fps, start, vel), t + 0.6 + 1 / fps)
        assert int(back[0]) == tid, f"{fps} fps: id {tid} not kept over 0.6 s"
        for k in range(int(fps * 1.6)):  # hidden for 1.6 s (> 1 s): a new id
            tr.update(empty, t + 1 + k / fps)
        later = [tr.update(boxes_at(5 + k / fps, start, vel), t + 3 + k / fps) for k in range(3)]
        assert int(later[-1][0]) not in (0, tid), f"{fps} fps: an old track was revived after 1.6 s"


def test_restart_ends_tracks_and_ids_never_repeat() -> None:
    start, vel = np.array([[200.0, 200.0], [600.0, 200.0]]), np.array([[10.0, 0.0], [-10.0, 0.0]])
    tr = StreamTracker(TrackerSettings())
    before = set(run(tr, 25, 1, start, vel)[-1].tolist())
    tr.restart()
    after = set(run(tr, 25, 1, start, vel, t0=1001.0)[-1].tolist())
    assert before.isdisjoint(after)
    assert min(after) > max(before)


@pytest.mark.slow
async def test_track_ids_on_mqtt_from_a_real_decoded_scene(
    tmp_path: Path, videos: dict[str, Path], scenes: dict[str, object], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    """The rendered scene's objects each keep one track id in the published detections."""
    from streams.synthetic import box_iou

    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
        "streams": {"cam": {"url": str(videos["cam1"]), "model": "shapes", "max_fps": 5},
                    "off": {"url": str(videos["cam2"]), "model": "shapes", "max_fps": 5,
                            "tracker": {"type": "none"}}},
        "pipeline": {"status_interval": 0},
    }, tmp_path)
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config)
    try:
        await wait_until(lambda: len(detections(sub, "cam")) >= 40, 60, "40 results")
    finally:
        await shutdown()
        sub.close()
    scene = scenes["cam1"]
    ids_of: dict[int, list[int]] = {}
    for msg in detections(sub, "cam")[5:]:
        truth = scene.truth_at(round(msg["pts"] * scene.fps))  # type: ignore[attr-defined]
        for obj, (box, occluded) in enumerate(zip(truth.boxes, truth.occluded, strict=True)):
            if occluded:
                continue
            best = max(msg["detections"], key=lambda d: box_iou(d["box"], box), default=None)
            if best is not None and box_iou(best["box"], box) >= 0.5 and best["track_id"]:
                ids_of.setdefault(obj, []).append(best["track_id"])
    assert len(ids_of) >= 3
    for obj, ids in ids_of.items():
        main = max(set(ids), key=ids.count)
        assert ids.count(main) / len(ids) >= 0.95, f"object {obj}: ids {ids}"
    assert all("track_id" not in d for m in detections(sub, "off") for d in m["detections"])
    assert "track" in pipeline.streams["cam"].stats.snapshot()["stage_ms_p50"]


def test_parity_with_ultralytics_bytetrack_at_a_steady_rate() -> None:
    """At a steady frame rate the timed tracker gives exactly ultralytics' ByteTrack ids (with
    framegrid's additions to the association turned off)."""
    from argparse import Namespace

    from ultralytics.trackers.byte_tracker import BYTETracker

    from pipeline.analytics.tracking import _Boxes

    rng = np.random.default_rng(5)
    start, vel = rng.uniform(100, 1500, (12, 2)), rng.uniform(-120, 120, (12, 2))
    ours = StreamTracker(TrackerSettings(min_hits=1, class_penalty=0, duplicate_iou=1, partial_ratio=0,
                                           first_reach=False, match_thresh=0.8))
    theirs = BYTETracker(Namespace(track_high_thresh=0.25, track_low_thresh=0.1, new_track_thresh=0.25,
                                   track_buffer=30, match_thresh=0.8, fuse_score=True))
    for k in range(100):
        det = boxes_at(k / 10, start, vel)
        keep = rng.random(len(det)) > 0.1  # some detections missed now and then
        det = Detections(det.boxes[keep], det.confidences[keep] * rng.uniform(0.5, 1, keep.sum()).astype(np.float32),
                         det.class_ids[keep], tuple(np.array(det.labels)[keep]))
        mine = ours.update(det, 1000 + k / 10)
        out = theirs.update(_Boxes(det.boxes, det.confidences, det.class_ids.astype(np.float32)))
        ref = np.zeros(len(det), np.int64)
        for row in out:
            ref[int(row[7])] = int(row[4])
        assert (mine == ref).all(), f"frame {k}: {mine} vs {ref}"


def one(box: list[float], cls: int = 0, score: float = 0.9) -> Detections:
    return dets([(box, cls, score)])


def dets(rows: list[tuple[list[float], int, float]]) -> Detections:
    return Detections(
        np.array([r[0] for r in rows], np.float32).reshape(-1, 4),
        np.array([r[2] for r in rows], np.float32),
        np.array([r[1] for r in rows], np.int32),
        tuple(("car", "bus")[r[1]] for r in rows),
    )


def behind_a_bar(settings: TrackerSettings) -> tuple[int, int]:
    """An 80 px object at 100 px/s (25 fps) slides behind a 70 px bar and out the other side; the
    detector sees the part not behind the bar while it is at least 20 px wide. -> (id before, after)."""
    tracker, bar, before, after = StreamTracker(settings), (450.0, 520.0), 0, 0
    for k in range(200):
        x1 = 100.0 + 4.0 * k
        x2 = x1 + 80
        parts = [(x1, min(x2, bar[0])), (max(x1, bar[1]), x2)]
        x1, x2 = max(parts, key=lambda p: p[1] - p[0])
        if x2 - x1 < 20:
            continue
        ids = tracker.update(one([x1, 100, x2, 180]), 1000 + k / 25)
        if k == 80:
            before = int(ids[0])
        after = int(ids[0])
    return before, after


def test_an_object_cut_by_an_occluder_keeps_its_id() -> None:
    """A box shrinking against an occluder would teach the Kalman filter a slow speed and a small
    size just before the object vanishes; its reappearing half then misses the coasting track. Taken
    as cut views of a whole object, the track coasts at the right speed and size and takes it back."""
    before, after = behind_a_bar(TrackerSettings())
    assert before > 0
    assert after == before
    before, after = behind_a_bar(TrackerSettings(partial_ratio=0))
    assert before > 0, "without cut views the id survived too: the test shows nothing"
    assert after != before, "without cut views the id survived too: the test shows nothing"


def test_an_object_passing_behind_another_keeps_its_id() -> None:
    """An 80 px object at 100 px/s (25 fps) passes behind a standing one of its size: unseen while more
    than half hidden, its lost track coasts across the other's box. ultralytics drops a lost track that
    coincides with a tracked one as a duplicate, and the object came out under a new id; kept as hidden,
    it takes its id back when it comes out."""
    tracker, front, ids_of_mover = StreamTracker(TrackerSettings()), [400.0, 100.0, 480.0, 180.0], []
    for k in range(120):
        x1 = 200.0 + 4.0 * k
        seen = abs(x1 - front[0]) >= 40  # at least half of it shows
        rows = [(front, 0, 0.9)] + ([([x1, 100, x1 + 80, 180], 0, 0.9)] if seen else [])
        ids = tracker.update(dets(rows), 1000 + k / 25)
        if seen and ids[1]:
            ids_of_mover.append(int(ids[1]))
    assert len(ids_of_mover) > 80
    assert set(ids_of_mover) == {ids_of_mover[0]}, ids_of_mover


def test_the_tracks_own_class_breaks_a_tie() -> None:
    """Two detections overlap a track's prediction: the one of the track's class takes it, although the
    other overlaps a little more (crossing objects of different classes keep their ids)."""

    def run_with(settings: TrackerSettings) -> tuple[int, np.ndarray]:
        tracker = StreamTracker(settings)
        for k in range(10):
            first = tracker.update(one([100 + 4 * k, 100, 180 + 4 * k, 180]), 1000 + k / 25)
        x = 100 + 4 * 10
        ids = tracker.update(
            dets([([x, 100, x + 80, 180], 1, 0.9), ([x + 3, 100, x + 83, 180], 0, 0.9)]), 1000 + 10 / 25
        )
        return int(first[0]), ids

    track, ids = run_with(TrackerSettings())
    assert ids[1] == track
    assert ids[0] != track
    track, ids = run_with(TrackerSettings(class_penalty=0))
    assert ids[0] == track, "class-agnostic association took the other one too: the test shows nothing"


def test_a_second_class_on_the_same_object_starts_no_track() -> None:
    """The detector often gives a half-hidden object two classes: the second box starts no track."""

    def ids_seen(settings: TrackerSettings) -> set[int]:
        tracker, seen = StreamTracker(settings), set()
        for k in range(20):
            box = [100 + 4 * k, 100, 180 + 4 * k, 180]
            rows = [(box, 0, 0.9)] + ([([box[0] + 2, 101, box[2] + 1, 181], 1, 0.6)] if k >= 5 else [])
            seen |= {int(i) for i in tracker.update(dets(rows), 1000 + k / 25) if i}
        return seen

    assert len(ids_seen(TrackerSettings())) == 1
    assert len(ids_seen(TrackerSettings(duplicate_iou=1))) == 2, "the duplicate made no track anyway"


def painted(rows: list[tuple[list[float], tuple[int, int, int]]], size: tuple[int, int] = (720, 1280)
            ) -> tuple[Detections, np.ndarray]:
    """Same-class boxes and a grey frame with each box filled in its colour."""
    image = np.full((*size, 3), 120, np.uint8)
    for box, colour in rows:
        x1, y1, x2, y2 = (int(v) for v in box)
        image[max(0, y1):max(0, y2), max(0, x1):max(0, x2)] = colour
    return dets([(box, 0, 0.9) for box, _ in rows]), image


RED, BLUE = (40, 40, 220), (220, 60, 40)


def meeting(settings: TrackerSettings, fps: float = 5) -> list[dict[tuple[int, int, int], int]]:
    """Two same-class objects at 5 fps come at each other, nearly touch and turn back (two people
    meeting in a corridor): at the frame after they turn, each one's motion points at the other's box."""
    tracker, out = StreamTracker(settings), []
    for k in range(int(fps * 4)):
        t = k / fps
        d = 150 * (t if t < 2 else 4 - t)  # towards each other for 2 s, then back
        a, b = 300 + d, 980 - d
        rows = [([a - 35, 300, a + 35, 370], RED), ([b - 35, 310, b + 35, 380], BLUE)]
        det, image = painted(rows)
        ids = tracker.update(det, 1000 + t, image)
        out.append({colour: int(i) for (_, colour), i in zip(rows, ids, strict=True) if i})
    return out


def test_appearance_keeps_ids_of_look_alike_classes_apart_where_they_meet() -> None:
    """A red and a blue object of one class meet and turn back at 5 fps: with appearance each keeps
    its id; without it (IoU and motion only) the ids swap."""
    def ids(settings: TrackerSettings) -> dict[tuple[int, int, int], set[int]]:
        seen = meeting(settings)
        return {c: {frame[c] for frame in seen if c in frame} for c in (RED, BLUE)}

    kept = ids(TrackerSettings())
    assert len(kept[RED]) == 1, kept
    assert len(kept[BLUE]) == 1, kept
    assert kept[RED] != kept[BLUE], kept
    blind = ids(TrackerSettings(appearance=0, reid_distance=0))
    assert len(blind[RED]) > 1 or len(blind[BLUE]) > 1, blind  # the case needs the look
    # the descriptor tells the colours apart, and a colour from itself under noise
    rng = np.random.default_rng(0)
    _, image = painted([([100, 100, 200, 200], RED), ([300, 100, 400, 200], BLUE)])
    noisy = np.clip(image.astype(int) + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    from pipeline.analytics.tracking import appearance

    boxes = np.array([[100, 100, 200, 200], [300, 100, 400, 200]], np.float32)
    a, b = appearance(image, boxes), appearance(noisy, boxes)
    assert float(a[0] @ b[0]) > 0.9
    assert float(a[1] @ b[1]) > 0.9
    assert float(a[0] @ a[1]) < 0.3
    # boxes at or beyond the frame's edges (a wide frame: bottom and right apart) still get a look
    edges = np.array([[100, 730, 160, 790], [1250, 100, 1300, 160], [-50, -50, 10, 10], [600, 720, 660, 720]],
                     np.float32)
    looks = appearance(np.full((720, 1280, 3), 90, np.uint8), edges)
    assert np.allclose(np.linalg.norm(looks, axis=1), 1.0, atol=1e-4)


def test_an_object_that_leaves_and_comes_back_elsewhere_keeps_its_id_by_its_look() -> None:
    """A red object leaves the frame on the right and comes back 3 s later from the bottom (beyond
    `buffer_s`, far from where it went): the same id by appearance; a blue newcomer of its class
    and size gets a new one; with re-identification off, the red one gets a new id too."""
    def scene(settings: TrackerSettings) -> tuple[set[int], set[int], set[int]]:
        tracker = StreamTracker(settings)
        before, after, blue = set(), set(), set()
        for k in range(40):  # 8 s at 5 fps
            t = k / 5
            rows = []
            if t < 2:
                x = 1000 + 150 * t
                rows.append(([x - 35, 300, x + 35, 370], RED))
            elif t >= 5:
                y = 720 - 100 * (t - 5)
                rows.append(([400, y - 35, 470, y + 35], RED))
            if t >= 5.4:
                rows.append(([800, 200, 870, 270], BLUE))
            det, image = painted(rows) if rows else (Detections.empty(), np.full((720, 1280, 3), 120, np.uint8))
            ids = tracker.update(det, 1000 + t, image)
            for (_, colour), i in zip(rows, ids, strict=True):
                if i:
                    (blue if colour == BLUE else before if t < 2 else after).add(int(i))
        return before, after, blue

    before, after, blue = scene(TrackerSettings())
    assert len(before) == 1, before
    assert after == before, (before, after)
    assert len(blue) == 1, blue
    assert blue != before, (before, blue)
    before, after, _ = scene(TrackerSettings(reid_distance=0))
    assert after, after
    assert after.isdisjoint(before), (before, after)
