#!/usr/bin/env python3
"""Tracking accuracy on rendered scenes with known identities: framegrid vs ultralytics' track().

    .venv/bin/python -m tools.bench_mot [--seconds 6 8 10 12] [--fps 25 10 5] [--json out.json]

Scenes (`streams.synthetic.tracking_scenes`): crossing paths, occlusion by a static bar, stop and
go, leaving and re-entering; 960x540 H.264 at 25 fps, decoded with PyAV. Each is rendered at every
`--seconds` (the same paths, so a shorter scene is a faster one): one scene's score turns on a
handful of ambiguous frames, so the means are taken over all of them. At each `max_fps` the
frames a framegrid stream would take are kept (the same phase rule as `StreamFeed`), and both
systems see exactly those frames:

  framegrid    the model through framegrid's detector (torch backend: the same answers as
               ultralytics, see tools/agreement.py) and `pipeline.analytics.tracking.StreamTracker` with
               its defaults, fed the frames' real timestamps
  ultralytics  `YOLO(weights).track(frame, persist=True)` with its default ByteTrack, as a user
               would call it (it counts frames, not time)

Scored with TrackEval (HOTA, CLEAR's MOTA, Identity's IDF1) against the scene's truth on those
frames; framegrid's tracks also go through its event engine (default `[events]`), and the events it
starts per true object are reported (what a user of the events sees). Targets (issue 13): framegrid
IDF1 >= 0.85 at 25 and 10 fps, >= 0.7 at 5 fps, and at least ultralytics' on the same scenes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

MODEL = ROOT / "models" / "shapes-yolo11n.pt"
IMGSZ = 320


def sampled_frames(video: Path, max_fps: float) -> list[tuple[int, float, np.ndarray]]:
    """(index, seconds, BGR) of the frames a stream at `max_fps` would process (StreamFeed's phase)."""
    import av

    out, due = [], 0.0
    with av.open(str(video)) as c:
        stream = c.streams.video[0]
        for i, frame in enumerate(c.decode(stream)):
            t = float(frame.pts * frame.time_base)
            if t + 1e-6 >= due:
                out.append((i, t, frame.to_ndarray(format="bgr24")))
                interval = 1.0 / max_fps
                due = (due + interval) if t - due < interval else t + interval
    return out


def track_framegrid(
    frames: list[tuple[int, float, np.ndarray]],
    frame_steps: bool = False,
    imgsz: int = IMGSZ,
    events: list[tuple[float, int, int, Any, np.ndarray]] | None = None,
    weights: Path = MODEL,
    **tracker: Any,
) -> list[list[tuple[int, list[float]]]]:
    """Each frame's confirmed (track id, box); `events` (if given) gets what the event engine needs."""
    from detectors.runtimes import build_detector
    from pipeline.analytics.tracking import StreamTracker
    from pipeline.config import TrackerConfig

    det = build_detector(
        "torch",
        "shapes",
        weights,
        imgsz=imgsz,
        confidence=0.25,
        iou=0.7,
        device="cpu",
        threads=None,
        half=False,
        max_batch=1,
        max_detections=300,
        agnostic=False,
    )
    det.load()
    given = {k: v for k, v in tracker.items() if v is not None}
    tracker = StreamTracker(TrackerConfig(**given))
    out = []
    for k, (_, t, image) in enumerate(frames):
        d = det.infer([image])[0]
        ids = tracker.update(d, k / 25 if frame_steps else t, image)  # frame_steps: time as a frame count
        out.append([(int(i), [float(v) for v in b]) for i, b in zip(ids, d.boxes, strict=True) if i])
        if events is not None:
            events.append((t, image.shape[1], image.shape[0], d, ids))
    det.close()
    return out


def events_started(steps: list[tuple[float, int, int, Any, np.ndarray]], **events: Any) -> int:
    """The `new` events framegrid's event engine (`pipeline.analytics.events.StreamEvents`, default
    `[events]`) starts from these tracked results: what a user of the events sees per object."""
    from types import SimpleNamespace

    from pipeline.analytics.events import StreamEvents
    from pipeline.config import EventsConfig, StreamConfig

    engine = StreamEvents(
        "cam",
        StreamConfig.model_validate({"url": "x", "model": "m"}),
        EventsConfig(**{k: v for k, v in events.items() if v is not None}),
        lambda *_: None,
    )
    started = 0

    def emit(kind: str, *_: Any) -> None:
        nonlocal started
        started += kind == "new"

    stream = SimpleNamespace(main_scale=lambda width, height: None)  # one URL per camera: nothing scaled
    for t, w, h, d, ids in steps:
        frame = SimpleNamespace(captured_at=t, captured_mono=t, width=w, height=h)
        result = SimpleNamespace(track_ids=ids, frame=frame, detections=d, attributes=None, stream=stream)
        engine.on_result(result, emit)  # type: ignore[arg-type]
    return started


def track_ultralytics(
    frames: list[tuple[int, float, np.ndarray]], imgsz: int = IMGSZ, weights: Path = MODEL
) -> list[list[tuple[int, list[float]]]]:
    from detectors.offline import prepare_ultralytics_offline

    prepare_ultralytics_offline()
    from ultralytics import YOLO

    model = YOLO(str(weights))
    out = []
    for _, _, image in frames:
        r = model.track(image, persist=True, imgsz=imgsz, verbose=False, tracker="bytetrack.yaml")[0]
        rows = []
        if r.boxes is not None and r.boxes.id is not None:
            for tid, box in zip(r.boxes.id.int().tolist(), r.boxes.xyxy.tolist(), strict=True):
                rows.append((int(tid), [float(v) for v in box]))
        out.append(rows)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def score(
    truth: list[list[tuple[int, tuple[float, ...]]]], tracks: list[list[tuple[int, list[float]]]]
) -> dict[str, float]:
    """HOTA, MOTA, IDF1 (and ID switches) with TrackEval, IoU similarity."""
    from trackeval.metrics import CLEAR, HOTA, Identity

    gt_map: dict[int, int] = {}
    tr_map: dict[int, int] = {}
    data: dict[str, Any] = {"gt_ids": [], "tracker_ids": [], "similarity_scores": []}
    for gt, tr in zip(truth, tracks, strict=True):
        g = np.array([gt_map.setdefault(i, len(gt_map)) for i, _ in gt], int)
        t = np.array([tr_map.setdefault(i, len(tr_map)) for i, _ in tr], int)
        data["gt_ids"].append(g)
        data["tracker_ids"].append(t)
        data["similarity_scores"].append(
            _iou(np.array([b for _, b in gt], float).reshape(-1, 4), np.array([b for _, b in tr], float).reshape(-1, 4))
        )
    data.update(
        num_timesteps=len(truth),
        num_gt_ids=len(gt_map),
        num_tracker_ids=len(tr_map),
        num_gt_dets=sum(len(x) for x in data["gt_ids"]),
        num_tracker_dets=sum(len(x) for x in data["tracker_ids"]),
    )
    quiet = {"PRINT_CONFIG": False}
    hota = HOTA(quiet).eval_sequence(data)
    clear = CLEAR(quiet).eval_sequence(data)
    ident = Identity(quiet).eval_sequence(data)
    return {
        "HOTA": float(np.mean(hota["HOTA"])),
        "MOTA": float(clear["MOTA"]),
        "IDF1": float(ident["IDF1"]),
        "IDSW": int(clear["IDSW"]),
        "tracks": len(tr_map),
        "objects": len(gt_map),
    }


def evaluate(
    scene: Any, video: Path, max_fps: float, systems: tuple[str, ...] = ("framegrid", "ultralytics"), **framegrid: Any
) -> dict[str, dict[str, float]]:
    frames = sampled_frames(video, max_fps)
    truth = [scene.tracks_at(i) for i, _, _ in frames]
    truth = [[(aid, box) for aid, _, box in rows] for rows in truth]
    out = {}
    for system in systems:
        imgsz = framegrid.get("imgsz") or IMGSZ
        steps: list[tuple[float, int, int, Any, np.ndarray]] = []
        if system == "framegrid":
            tracks = track_framegrid(frames, events=steps, **framegrid)
        else:
            tracks = track_ultralytics(frames, imgsz, framegrid.get("weights", MODEL))
        out[system] = score(truth, tracks)
        if system == "framegrid":
            out[system]["events"] = events_started(steps)
    return out


def main() -> None:
    from streams.synthetic import held_out_scene, tracking_scenes, write_video

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--seconds",
        type=float,
        nargs="+",
        default=[6.0, 8.0, 10.0, 12.0],
        help="durations of each scene (speeds: the paths are the same)",
    )
    ap.add_argument("--fps", type=float, nargs="+", default=[25, 10, 5])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--scenes", nargs="+", help="only these scenes (crossing, occlusion, stop_go, leave_reenter)")
    ap.add_argument(
        "--held-out",
        type=int,
        nargs="+",
        metavar="SEED",
        help="instead: random 1280x720 scenes of these seeds (streams.synthetic.held_out_scene), never tuned on",
    )
    ap.add_argument("--buffer-s", type=float, help="framegrid's tracker.buffer_s (default: the config's)")
    ap.add_argument("--min-hits", type=int, help="framegrid's tracker.min_hits (default: the config's)")
    ap.add_argument("--class-penalty", type=float, help="framegrid's tracker.class_penalty (default: the config's)")
    ap.add_argument("--duplicate-iou", type=float, help="framegrid's tracker.duplicate_iou (default: the config's)")
    ap.add_argument("--partial-ratio", type=float, help="framegrid's tracker.partial_ratio (default: the config's)")
    ap.add_argument("--imgsz", type=int, default=IMGSZ, help="inference size (640 suits --held-out's 1280x720)")
    ap.add_argument("--weights", type=Path, default=MODEL, help="the detector both systems run (the bundled one)")
    ap.add_argument("--appearance", type=float, help="framegrid's tracker.appearance (default: the config's)")
    ap.add_argument("--appearance-gate", type=float, help="framegrid's tracker.appearance_gate (default: the config's)")
    ap.add_argument("--reid-distance", type=float, help="framegrid's tracker.reid_distance (default: the config's)")
    ap.add_argument("--systems", nargs="+", default=["framegrid", "ultralytics"], choices=["framegrid", "ultralytics"])
    ap.add_argument(
        "--frame-steps",
        action="store_true",
        help="feed framegrid's tracker a frame count as its time (ultralytics' way), to measure what real time changes",
    )
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"{'scene':<14} {'s':>3} {'fps':>4} {'system':<12} {'HOTA':>6} {'MOTA':>6} {'IDF1':>6} {'IDSW':>5} "
            f"{'tracks':>7} {'events':>6}"
        )
        scenes = (
            [held_out_scene(seed) for seed in args.held_out]
            if args.held_out
            else [
                scene
                for seconds in args.seconds
                for scene in tracking_scenes(seconds)
                if not args.scenes or scene.name in args.scenes
            ]
        )
        for scene in scenes:
            video = Path(tmp) / f"{scene.name}-{scene.seconds:g}.mp4"
            write_video(video, scene, scene.seconds)
            for fps in args.fps:
                result = evaluate(
                    scene,
                    video,
                    fps,
                    tuple(args.systems),
                    buffer_s=args.buffer_s,
                    min_hits=args.min_hits,
                    class_penalty=args.class_penalty,
                    duplicate_iou=args.duplicate_iou,
                    partial_ratio=args.partial_ratio,
                    appearance=args.appearance,
                    appearance_gate=args.appearance_gate,
                    reid_distance=args.reid_distance,
                    frame_steps=args.frame_steps,
                    imgsz=args.imgsz,
                    weights=args.weights,
                )
                for system, r in result.items():
                    rows.append({"scene": scene.name, "seconds": scene.seconds, "fps": fps, "system": system, **r})
                    print(
                        f"{scene.name:<14} {scene.seconds:>3g} {fps:>4g} {system:<12} "
                        f"{r['HOTA']:>6.3f} {r['MOTA']:>6.3f} "
                        f"{r['IDF1']:>6.3f} {r['IDSW']:>5} {r['tracks']:>4}/{r['objects']}"
                        + (f" {r['events']:>4}" if "events" in r else ""),
                        flush=True,
                    )
    print()
    names = list(dict.fromkeys(r["scene"] for r in rows))
    print(f"means: HOTA MOTA IDF1, tracks and events started per true object, then IDF1 per scene ({', '.join(names)})")
    for fps in args.fps:
        for system in args.systems:
            sel = [r for r in rows if r["fps"] == fps and r["system"] == system]
            per = " ".join(f"{np.mean([r['IDF1'] for r in sel if r['scene'] == n]):.3f}" for n in names)
            print(
                f"{fps:>4g} fps {system:<12} {np.mean([r['HOTA'] for r in sel]):.3f} "
                f"{np.mean([r['MOTA'] for r in sel]):.3f} {np.mean([r['IDF1'] for r in sel]):.3f} "
                f"{sum(r['tracks'] for r in sel) / max(1, sum(r['objects'] for r in sel)):.2f} "
                + (
                    f"{sum(r['events'] for r in sel) / max(1, sum(r['objects'] for r in sel)):.2f}"
                    if all("events" in r for r in sel)
                    else "   -"
                )
                + f"   {per}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
