#!/usr/bin/env python3
"""Cost of tracking one stream's results: ms per update at N objects (the issue's figure is 20).

    .venv/bin/python -m tools.bench_tracking [--objects 20] [--seconds 20]

Objects move in straight lines at up to 85 px/s, bouncing off the frame's edges; each tracker type
is fed at 25, 10 and 5 fps (the real time between frames, as in the pipeline), with the frame (1920x1080, each object a
coloured box: appearance on, the defaults) and without it (`--no-image`: motion only). Prints the
median and p95 per update and the id switches seen (0 expected on these straight paths).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from detectors import Detections
from pipeline.analytics.tracking import StreamTracker, TrackerSettings


def _inside(c: np.ndarray, size: np.ndarray, margin: float = 30.0) -> np.ndarray:
    """Positions folded back into the frame (objects bounce off its edges, as a detector sees them)."""
    span = size - 2 * margin
    u = np.mod(c - margin, 2 * span)
    return margin + np.where(u > span, 2 * span - u, u)


def measure(kind: str, fps: float, objects: int, seconds: float, image: bool = True) -> dict[str, float]:
    rng = np.random.default_rng(0)
    start = rng.uniform(100, 1800, (objects, 2))
    vel = rng.uniform(-60, 60, (objects, 2))
    colours = rng.integers(0, 256, (objects, 3))
    tracker = StreamTracker(TrackerSettings(type=kind, min_hits=1))
    times, ids = [], []
    frame = np.full((1080, 1920, 3), 110, np.uint8)
    for k in range(int(fps * seconds)):
        c = _inside(start + vel * (k / fps), np.array([1920.0, 1080.0]))
        boxes = np.concatenate([c - 30, c + 30], 1).astype(np.float32)
        det = Detections(boxes, np.full(objects, 0.8, np.float32), np.zeros(objects, np.int32), ("obj",) * objects)
        if image:
            frame[:] = 110
            for (x1, y1, x2, y2), colour in zip(boxes.astype(int).clip(0), colours, strict=True):
                frame[y1:y2, x1:x2] = colour
        t0 = time.perf_counter()
        ids.append(tracker.update(det, k / fps, frame if image else None))
        times.append((time.perf_counter() - t0) * 1000)
    per_object = np.stack(ids[1:])
    switches = sum(len(set(col.tolist())) - 1 for col in per_object.T)
    warm = times[len(times) // 10:]
    return {"p50_ms": float(np.median(warm)), "p95_ms": float(np.percentile(warm, 95)), "switches": switches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--no-image", action="store_true", help="motion only (no frame: no appearance)")
    args = ap.parse_args()
    print(f"{'tracker':<10} {'fps':>4} {'p50 ms':>7} {'p95 ms':>7} {'id switches':>12}  ({args.objects} objects)")
    for kind in ("bytetrack", "botsort"):
        for fps in (25, 10, 5):
            r = measure(kind, fps, args.objects, args.seconds, not args.no_image)
            print(f"{kind:<10} {fps:>4} {r['p50_ms']:>7.3f} {r['p95_ms']:>7.3f} {r['switches']:>12}")


if __name__ == "__main__":
    main()
