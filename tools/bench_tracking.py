#!/usr/bin/env python3
"""Cost of tracking one stream's results: ms per update at N objects (the issue's figure is 20).

    .venv/bin/python -m tools.bench_tracking [--objects 20] [--seconds 20]

Objects move in straight lines at up to 150 px/s; each tracker type is fed at 25, 10 and 5 fps
(the real time between frames, as in the pipeline). Prints the median and p95 per update and the
id switches seen (0 expected on these straight paths).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from detectors import Detections
from pipeline.analytics.tracking import StreamTracker, TrackerSettings


def measure(kind: str, fps: float, objects: int, seconds: float) -> dict[str, float]:
    rng = np.random.default_rng(0)
    start = rng.uniform(100, 1800, (objects, 2))
    vel = rng.uniform(-60, 60, (objects, 2))
    tracker = StreamTracker(TrackerSettings(type=kind, min_hits=1))
    times, ids = [], []
    for k in range(int(fps * seconds)):
        c = start + vel * (k / fps)
        det = Detections(np.concatenate([c - 30, c + 30], 1).astype(np.float32),
                         np.full(objects, 0.8, np.float32), np.zeros(objects, np.int32), ("obj",) * objects)
        t0 = time.perf_counter()
        ids.append(tracker.update(det, k / fps))
        times.append((time.perf_counter() - t0) * 1000)
    per_object = np.stack(ids[1:])
    switches = sum(len(set(col.tolist())) - 1 for col in per_object.T)
    warm = times[len(times) // 10:]
    return {"p50_ms": float(np.median(warm)), "p95_ms": float(np.percentile(warm, 95)), "switches": switches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    print(f"{'tracker':<10} {'fps':>4} {'p50 ms':>7} {'p95 ms':>7} {'id switches':>12}  ({args.objects} objects)")
    for kind in ("bytetrack", "botsort"):
        for fps in (25, 10, 5):
            r = measure(kind, fps, args.objects, args.seconds)
            print(f"{kind:<10} {fps:>4} {r['p50_ms']:>7.3f} {r['p95_ms']:>7.3f} {r['switches']:>12}")


if __name__ == "__main__":
    main()
