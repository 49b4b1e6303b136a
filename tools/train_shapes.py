#!/usr/bin/env python3
"""Train the demo/test detector: yolo11n from its yaml on synthetic shapes, on the CPU.

No pretrained weights can be downloaded, so framegrid ships a small model it trained itself.
This script renders a dataset with `streams.synthetic`, trains yolo11n from scratch, validates
it, copies the best weights to `models/shapes-yolo11n.pt` and writes the figures to
`models/shapes-yolo11n.json`. It is slow (about 10 minutes on two cores); the tests use its
committed output and never run it.

    .venv/bin/python -m tools.train_shapes            # defaults used for the committed weights
    .venv/bin/python -m tools.train_shapes --epochs 5 --train 50   # quick smoke run

`--occluded N` adds N images of half-hidden objects (`streams.synthetic.render_occluded_image`:
shapes over each other, across the frame's edge, behind bars) to training and a fifth as many to
validation; `--start` fine-tunes from existing weights instead of the yaml.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from detectors.offline import prepare_ultralytics_offline
from streams.synthetic import CLASSES, render_image, render_occluded_image

ROOT = Path(__file__).resolve().parent.parent


def write_split(folder: Path, seeds: range, width: int, height: int, occluded: bool = False) -> None:
    import cv2

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        img, truth = (render_occluded_image if occluded else render_image)(seed, width, height)
        # JPEG at moderate quality: the model should see compression artefacts like a camera's.
        cv2.imwrite(str(folder / "images" / f"{seed:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 80])
        lines = []
        for c, (x1, y1, x2, y2) in zip(truth.class_ids, truth.boxes, strict=True):
            cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
            w, h = (x2 - x1) / width, (y2 - y1) / height
            lines.append(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        (folder / "labels" / f"{seed:06d}.txt").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=300, help="training images")
    ap.add_argument("--val", type=int, default=60, help="validation images")
    ap.add_argument("--occluded", type=int, default=0, help="training images of half-hidden objects")
    ap.add_argument("--start", type=Path, help="fine-tune these weights (default: from the yolo11n yaml)")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "shapes-yolo11n.pt")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="framegrid-train-"))
    prepare_ultralytics_offline(work / "ultralytics", for_training=True)
    from ultralytics import YOLO

    t0 = time.time()
    write_split(work / "data" / "train", range(0, args.train), args.width, args.height)
    write_split(work / "data" / "val", range(100_000, 100_000 + args.val), args.width, args.height)
    write_split(work / "data" / "train", range(200_000, 200_000 + args.occluded), args.width, args.height, True)
    occluded_val = args.occluded // 5
    write_split(work / "data" / "val", range(300_000, 300_000 + occluded_val), args.width, args.height, True)
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    data_yaml = work / "shapes.yaml"
    data_yaml.write_text(f"path: {work / 'data'}\ntrain: train/images\nval: val/images\nnames:\n{names}\n")
    render_s = time.time() - t0

    model = YOLO(str(args.start) if args.start else "yolo11n.yaml")
    t1 = time.time()
    model.train(
        data=str(data_yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=0,
        device="cpu", project=str(work / "runs"), name="shapes", exist_ok=True, plots=False,
        amp=False, pretrained=bool(args.start), verbose=False, seed=0, deterministic=True,
    )
    train_s = time.time() - t1
    best = work / "runs" / "shapes" / "weights" / "best.pt"
    metrics = YOLO(str(best)).val(data=str(data_yaml), imgsz=args.imgsz, batch=args.batch,
                                  workers=0, device="cpu", plots=False, verbose=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, args.out)
    figures = {
        "weights": args.out.name,
        "classes": list(CLASSES),
        "train_images": args.train,
        "val_images": args.val,
        "occluded_train_images": args.occluded,
        "occluded_val_images": occluded_val,
        "started_from": args.start.name if args.start else "yolo11n.yaml",
        "image_size": [args.width, args.height],
        "imgsz": args.imgsz,
        "epochs": args.epochs,
        "batch": args.batch,
        "render_seconds": round(render_s, 1),
        "train_seconds": round(train_s, 1),
        "val_map50": round(float(metrics.box.map50), 4),
        "val_map50_95": round(float(metrics.box.map), 4),
        "command": "tools/train_shapes.py " + " ".join(sys.argv[1:]),
    }
    args.out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
