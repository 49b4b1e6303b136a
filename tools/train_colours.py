#!/usr/bin/env python3
"""Train the test classifier: yolo11n-cls from its yaml on crops of shapes, labelled by colour.

A second model that runs on each tracked object's crop (`[models.x] type = "classify"`) needs a
classifier the tests can run; none can be downloaded, so framegrid trains a small one: crops of
one shape (any of the three) on the cluttered backgrounds of `streams.synthetic`, painted in a
red, green or blue family of colours, the label being that family. It writes
`models/colours-yolo11n-cls.pt` and its figures to `models/colours-yolo11n-cls.json`; the tests use
the committed output and never run this.

    .venv/bin/python -m tools.train_colours                 # the committed weights
    .venv/bin/python -m tools.train_colours --epochs 2 --train 60    # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from detectors.offline import prepare_ultralytics_offline

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ("blue", "green", "red")  # the classes, in id order (ultralytics sorts folder names)


def colour_of(rng: np.random.Generator, family: str) -> tuple[int, int, int]:
    """A BGR colour of a family: its channel high, the others low to middling (cameras are not pure)."""
    main = int(rng.integers(150, 256))
    low = [int(rng.integers(0, 110)) for _ in range(2)]
    channel = {"blue": 0, "green": 1, "red": 2}[family]
    bgr = [*low[:channel], main, *low[channel:]]
    return bgr[0], bgr[1], bgr[2]


def render_crop(seed: int, family: str, size: int = 96) -> np.ndarray:
    """One shape of `family`'s colour on a background, cropped around its box with a margin."""
    from streams.synthetic import Shape, _background, draw

    rng = np.random.default_rng(seed)
    width, height = 320, 240
    img = _background(rng, width, height)
    radius = float(rng.uniform(16, 50))
    shape = Shape(int(rng.integers(0, 3)), float(rng.uniform(60, width - 60)), float(rng.uniform(60, height - 60)),
                  radius, float(rng.uniform(0, 6.3)), colour_of(rng, family))
    draw(img, [shape])
    x1, y1, x2, y2 = shape.box(width, height)
    m = float(rng.uniform(0.0, 0.25)) * (x2 - x1)  # detector boxes are not exact: crops vary
    crop = img[max(0, int(y1 - m)):int(y2 + m), max(0, int(x1 - m)):int(x2 + m)]
    import cv2

    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def write_split(folder: Path, seeds: range) -> None:
    import cv2

    for seed in seeds:
        family = COLOURS[seed % len(COLOURS)]
        (folder / family).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / family / f"{seed:06d}.jpg"), render_crop(seed, family),
                    [cv2.IMWRITE_JPEG_QUALITY, 85])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=600, help="training crops")
    ap.add_argument("--val", type=int, default=150, help="validation crops")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--imgsz", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "colours-yolo11n-cls.pt")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="framegrid-train-cls-"))
    prepare_ultralytics_offline(work / "ultralytics", for_training=True)
    from ultralytics import YOLO

    data = work / "colours"
    write_split(data / "train", range(0, args.train))
    write_split(data / "val", range(100_000, 100_000 + args.val))
    started = time.time()
    model = YOLO("yolo11n-cls.yaml")
    model.train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=32, device="cpu", workers=0,
                project=str(work / "runs"), name="cls", pretrained=False, amp=False, plots=False, verbose=False,
                seed=0, deterministic=True)
    best = work / "runs" / "cls" / "weights" / "best.pt"
    metrics = YOLO(str(best)).val(data=str(data), imgsz=args.imgsz, split="val", device="cpu", plots=False,
                                  verbose=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, args.out)
    figures = {"classes": list(COLOURS), "top1": round(float(metrics.top1), 4), "epochs": args.epochs,
               "imgsz": args.imgsz, "train": args.train, "val": args.val,
               "seconds": round(time.time() - started, 1),
               "command": " ".join(["tools/train_colours.py", *sys.argv[1:]])}
    args.out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
