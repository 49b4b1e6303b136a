"""Which way of bringing a decoded frame to the model's size keeps the model's answers, and at what cost?

    .venv/bin/python -m tools.compare_resize [--imgsz 320] [--seconds 3]

For camera files of several shapes (tools/agreement.py renders them), every third frame is
prepared in several ways and run through the torch detector; each answer is compared with
`YOLO(weights).predict(frame)` on FFmpeg's full-size BGR conversion of the same frame:

  exact          FFmpeg's BGR at the source size, then OpenCV bilinear (what framegrid does)
  sws-<filter>   FFmpeg converting and scaling in one pass straight to the letterboxed size
                 (fast_bilinear was framegrid's former decode path; area, bilinear, bicubic)
  bgr+cv-area    FFmpeg's BGR at the source size, then OpenCV's area filter

Per shape and way: F1 at IoU 0.9 and 0.7, the largest confidence difference, and the median
milliseconds to prepare one frame (one thread).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools.agreement import MODEL, render_cameras, score

ROOT = Path(__file__).resolve().parent.parent


def ways(geo: Any) -> dict[str, Any]:
    import cv2

    def sws(name: str) -> Any:
        return lambda vf: vf.to_ndarray(format="bgr24", width=geo.new_w, height=geo.new_h, interpolation=name,
                                        threads=1)

    return {
        "exact": lambda vf: vf.to_ndarray(format="bgr24", threads=1),
        "sws-fast_bilinear": sws("FAST_BILINEAR"),
        "sws-bilinear": sws("BILINEAR"),
        "sws-area": sws("AREA"),
        "sws-bicubic": sws("BICUBIC"),
        "bgr+cv-area": lambda vf: cv2.resize(vf.to_ndarray(format="bgr24", threads=1), (geo.new_w, geo.new_h),
                                             interpolation=cv2.INTER_AREA),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--weights", type=Path, default=MODEL)
    args = ap.parse_args()
    import av

    from detectors import YoloDetector, prepare_ultralytics_offline
    from detectors.letterbox import geometry

    prepare_ultralytics_offline()
    from ultralytics import YOLO

    cameras = render_cameras(Path(tempfile.mkdtemp(prefix="framegrid-resize-")), args.seconds, change=False)
    reference_model = YOLO(str(args.weights), task="detect")
    det = YoloDetector("m", args.weights, imgsz=args.imgsz)
    det.load()
    print(f"{'camera':<9} {'way':<18} {'F1@0.9':>7} {'F1@0.7':>7} {'conf diff':>9} {'ms/frame':>8}")
    for name, path in cameras.items():
        with av.open(str(path)) as c:
            frames = list(c.decode(video=0))[::3]
        w, h = frames[0].width, frames[0].height
        geo = geometry(w, h, args.imgsz)
        ref = {}
        for i, vf in enumerate(frames):
            r = reference_model.predict(vf.to_ndarray(format="bgr24"), imgsz=args.imgsz, verbose=False)[0].boxes
            ref[i] = [(b, int(k), float(s)) for b, k, s in zip(r.xyxy.numpy(), r.cls.numpy(), r.conf.numpy(),
                                                               strict=True)]
        for way, prepare in ways(geo).items():
            ours, ms = {}, []
            for i, vf in enumerate(frames):
                t0 = time.perf_counter()
                image = prepare(vf)
                ms.append((time.perf_counter() - t0) * 1000)
                d = det.infer([image])[0]
                sx, sy = w / image.shape[1], h / image.shape[0]  # a pre-scaled image: back to source pixels
                boxes = d.boxes * np.array([sx, sy, sx, sy], np.float32)
                ours[i] = [(b, int(k), float(s)) for b, k, s in zip(boxes, d.class_ids, d.confidences, strict=True)]
            s9, s7 = score(ours, ref, 0.9), score(ours, ref, 0.7)
            print(f"{name:<9} {way:<18} {s9['f1']:>7.3f} {s7['f1']:>7.3f} {s9['max_conf_diff']:>9.3f} "
                  f"{np.median(ms):>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
