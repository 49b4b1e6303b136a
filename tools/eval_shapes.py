#!/usr/bin/env python3
"""Recall and precision of a shapes detector on plain and on half-hidden test images.

The images are rendered by `streams.synthetic` from seeds no training run uses (training takes
0-99,999 plain, 100,000+ validation, 200,000+ and 300,000+ half-hidden): a true object is found by a
detection of its class at IoU >= 0.5 (each detection finds one object at most). Truth on a
half-hidden image holds an object while at least half of it shows (the tracking benchmarks' rule).

    .venv/bin/python -m tools.eval_shapes                     # the bundled model
    .venv/bin/python -m tools.eval_shapes --weights old.pt    # another, to compare
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streams.synthetic import box_iou, render_image, render_occluded_image

ROOT = Path(__file__).resolve().parent.parent
SETS = (("half-hidden", render_occluded_image, 950_000), ("plain", render_image, 960_000))


def evaluate(weights: Path, images: int, imgsz: int) -> dict[str, dict[str, float]]:
    from detectors.runtimes import build_detector

    det = build_detector("torch", "shapes", weights, imgsz=imgsz, confidence=0.25, iou=0.7, device="cpu",
                         threads=None, half=False, max_batch=1, max_detections=300, agnostic=False)
    det.load()
    out = {}
    try:
        for name, render, base in SETS:
            found = missed = extra = 0
            for seed in range(base, base + images):
                image, truth = render(seed)
                d = det.infer([image])[0]
                boxes, classes, used = d.boxes.tolist(), d.class_ids.tolist(), set()
                for cls, box in zip(truth.class_ids, truth.boxes, strict=True):
                    ours = [(box_iou(box, b), j) for j, b in enumerate(boxes) if j not in used and classes[j] == cls]
                    best = max(ours, default=(0.0, -1))
                    if best[0] >= 0.5:
                        found += 1
                        used.add(best[1])
                    else:
                        missed += 1
                extra += len(boxes) - len(used)
            out[name] = {"recall": found / max(1, found + missed), "precision": found / max(1, found + extra),
                         "objects": found + missed}
    finally:
        det.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=ROOT / "models" / "shapes-yolo11n.pt")
    ap.add_argument("--images", type=int, default=150, help="images of each kind")
    ap.add_argument("--imgsz", type=int, default=320)
    args = ap.parse_args()
    for name, r in evaluate(args.weights, args.images, args.imgsz).items():
        print(f"{name:<12} recall {r['recall']:.3f} precision {r['precision']:.3f} ({r['objects']:.0f} objects)")


if __name__ == "__main__":
    main()
