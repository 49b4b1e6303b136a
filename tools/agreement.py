"""Agreement: do framegrid's published detections equal the model's own answers?

Camera files of several shapes are rendered here (1920x1080, 1280x720, portrait 720x1280, 4:3
960x720, the odd 1000x562, and one stream that changes from 1280x720 to 960x720 mid-stream),
played as live cameras through the real pipeline (sources, batchers, slots, result sinks), and
every frame framegrid publishes is compared with `ultralytics.YOLO(weights).predict(frame)` on
the same decoded frame (the same file decoded in the same order, FFmpeg's BGR conversion), with
ultralytics' defaults. Boxes are matched greedily per class; a pair counts when its IoU reaches
the threshold. Per camera: frames compared, F1 and the largest confidence difference of the
matched pairs.

    .venv/bin/python -m tools.agreement --backend torch auto --imgsz 320 640 --json agreement.json
    .venv/bin/python -m tools.agreement --backend int8 --imgsz 320 640   # the model quantized to INT8

The test suite asserts the targets on these cameras (tests/test_agreement.py); the benchmark
reports the same numbers beside its speeds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streams.synthetic import box_iou

ROOT = Path(__file__).resolve().parent.parent

MODEL = ROOT / "models" / "shapes-yolo11n.pt"
CAMERAS: dict[str, tuple[int, int]] = {
    "1080p": (1920, 1080), "720p": (1280, 720), "portrait": (720, 1280), "4x3": (960, 720), "odd": (1000, 562),
}
CHANGE = ((1280, 720), (960, 720))  # the camera whose resolution changes halfway
TARGETS = {"torch": (0.9, 0.99, 0.02), "auto": (0.7, 0.97, None)}  # backend: (IoU, F1 at least, conf within)

Box = tuple[np.ndarray, int, float]  # xyxy, class id, confidence


def render_cameras(folder: Path, seconds: float = 3.0, fps: float = 25.0,
                   shapes: dict[str, tuple[int, int]] | None = None, change: bool = True) -> dict[str, Path]:
    """Camera files of every shape (made once per folder); `change` adds the size-changing one."""
    from streams.synthetic import camera_scene, write_video

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, (w, h)) in enumerate((shapes or CAMERAS).items()):
        path = folder / f"{name}-{w}x{h}.mp4"
        if not path.exists():
            write_video(path, camera_scene(w, h, fps, seed=100 + i), seconds, gop_seconds=2.0)
        out[name] = path
    if change:
        path = folder / "change.ts"
        if not path.exists():
            half = round(seconds * fps / 2)
            parts = []
            for k, (w, h) in enumerate(CHANGE):
                part = folder / f"change-{k}.ts"
                write_video(part, camera_scene(w, h, fps, seed=200), seconds / 2, gop_seconds=2.0, start=k * half)
                parts.append(part.read_bytes())
                part.unlink()
            path.write_bytes(b"".join(parts))  # MPEG-TS segments joined byte-wise: one stream, new size
        out["change"] = path
    return out


def run_framegrid(cameras: dict[str, Path], weights: Path, imgsz: int, backend: str, batch_size: int = 4,
                  timeout: float = 120.0, **model: Any) -> dict[str, dict[int, tuple[tuple[int, int], list[Box]]]]:
    """Play the files as live cameras through the pipeline; per camera, frame index -> (size, boxes)."""
    from pipeline import Pipeline, parse_config
    from streams import StreamState

    cfg = parse_config({
        "mqtt": {"url": "embedded", "embedded_port": 0, "topic_prefix": "agreement"},
        "models": {"m": {"type": "yolo", "weights": str(weights), "imgsz": imgsz, "backend": backend,
                         "batch_size": batch_size, **model}},
        "streams": {name: {"url": str(path), "model": "m", "loop": False} for name, path in cameras.items()},
        "pipeline": {"status_interval": 0, "max_frame_age": 5.0},
    }, ROOT)
    got: dict[str, dict[int, tuple[tuple[int, int], list[Box]]]] = {name: {} for name in cameras}

    class Keep:
        def emit(self, result: Any) -> None:
            d, f = result.detections, result.frame
            got[result.stream.name][f.index] = ((f.width, f.height), [
                (b, int(c), float(s)) for b, c, s in zip(d.boxes, d.class_ids, d.confidences, strict=True)])

    async def main() -> None:
        async with Pipeline(cfg, sinks=[Keep()]) as pipeline:
            deadline = time.monotonic() + timeout
            final = {StreamState.ENDED, StreamState.FAILED}
            while time.monotonic() < deadline and not pipeline.done:
                if all(r.state in final for r in pipeline.streams.values()):
                    break
                await asyncio.sleep(0.1)
            failed = {n: r.error for n, r in pipeline.streams.items() if r.state is StreamState.FAILED}
            if failed:
                raise RuntimeError(f"cameras failed: {failed}")
            await asyncio.sleep(0.5)  # the last batch in flight

    asyncio.run(main())
    return got


def reference(path: Path, indices: Sequence[int], weights: Path, imgsz: int) -> dict[int, list[Box]]:
    """`YOLO(weights).predict(frame, imgsz=imgsz)` on the given frames of the file, decoded by PyAV."""
    import av

    from detectors import prepare_ultralytics_offline

    prepare_ultralytics_offline()
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    wanted, out = set(indices), {}
    with av.open(str(path)) as container:
        for i, vf in enumerate(container.decode(video=0)):
            if i in wanted:
                r = model.predict(vf.to_ndarray(format="bgr24"), imgsz=imgsz, verbose=False)[0].boxes
                out[i] = [(b, int(c), float(s)) for b, c, s in
                          zip(r.xyxy.numpy(), r.cls.numpy(), r.conf.numpy(), strict=True)]
            if len(out) == len(wanted):
                break
    return out


def match(ours: list[Box], theirs: list[Box], threshold: float) -> list[tuple[Box, Box]]:
    """Greedy one-to-one pairs of the same class, best IoU first, at IoU >= threshold."""
    pairs = sorted(((box_iou(a[0], b[0]), i, j) for i, a in enumerate(ours) for j, b in enumerate(theirs)
                    if a[1] == b[1]), reverse=True)
    used_a, used_b, out = set(), set(), []
    for v, i, j in pairs:
        if v < threshold:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((ours[i], theirs[j]))
    return out


def score(ours: dict[int, list[Box]], theirs: dict[int, list[Box]], threshold: float) -> dict[str, Any]:
    tp = n_ours = n_theirs = 0
    conf_diff = 0.0
    for i, ref in theirs.items():
        got = ours[i]
        pairs = match(got, ref, threshold)
        tp, n_ours, n_theirs = tp + len(pairs), n_ours + len(got), n_theirs + len(ref)
        conf_diff = max([conf_diff] + [abs(a[2] - b[2]) for a, b in pairs])
    total = n_ours + n_theirs
    return {"iou": threshold, "f1": round(2 * tp / total, 4) if total else 1.0, "boxes_framegrid": n_ours,
            "boxes_ultralytics": n_theirs, "max_conf_diff": round(conf_diff, 4)}


def calibration_frames(folder: Path, count: int = 120) -> Path:
    """Frames of other camera scenes (not the ones measured), as a user saves them from the cameras:
    what `--backend int8` is calibrated on."""
    import cv2

    from streams.synthetic import camera_scene

    out = folder / "calibration"
    out.mkdir(parents=True, exist_ok=True)
    per = -(-count // len(CAMERAS))
    for i, (w, h) in enumerate(CAMERAS.values()):
        for k, (image, _) in enumerate(camera_scene(w, h, seed=300 + i).frames(3 * per)):
            if k % 3 == 0:
                cv2.imwrite(str(out / f"{i}-{k:04d}.jpg"), image)
    return out


def measure(folder: Path, weights: Path = MODEL, imgsz: int = 320, backend: str = "auto", seconds: float = 3.0,
            thresholds: Sequence[float] = (0.9, 0.7), **model: Any) -> dict[str, Any]:
    """Agreement per camera shape for one backend and input size (`int8`: OpenVINO with the model
    quantized, calibrated on other scenes' frames)."""
    cameras = render_cameras(folder, seconds)
    if backend == "int8":
        backend, model = "openvino", {**model, "cpu_precision": "int8", "calibration": str(calibration_frames(folder))}
    got = run_framegrid(cameras, weights, imgsz, backend, **model)
    out: dict[str, Any] = {}
    for name, path in cameras.items():
        frames = got[name]
        ref = reference(path, sorted(frames), weights, imgsz)
        ours = {i: boxes for i, (_, boxes) in frames.items()}
        sizes = sorted({f"{w}x{h}" for (w, h), _ in frames.values()})
        out[name] = {"frames": len(ref), "sizes": sizes, **{f"at_{t}": score(ours, ref, t) for t in thresholds}}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", nargs="+", default=["torch", "auto"],
                    help="torch, auto, openvino, onnxruntime, or int8 (OpenVINO, cpu_precision int8)")
    ap.add_argument("--imgsz", type=int, nargs="+", default=[320])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each camera file")
    ap.add_argument("--weights", type=Path, default=MODEL)
    ap.add_argument("--folder", type=Path, default=Path("agreement-cameras"), help="where the camera files go")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    report = []
    print(f"{'backend':<8} {'imgsz':>5} {'camera':<9} {'frames':>6} {'F1@0.9':>7} {'F1@0.7':>7} {'conf diff':>9}")
    for backend in args.backend:
        for imgsz in args.imgsz:
            res = measure(args.folder, args.weights, imgsz, backend, args.seconds)
            report.append({"backend": backend, "imgsz": imgsz, "cameras": res})
            for name, r in res.items():
                print(f"{backend:<8} {imgsz:>5} {name:<9} {r['frames']:>6} {r['at_0.9']['f1']:>7.3f} "
                      f"{r['at_0.7']['f1']:>7.3f} {r['at_0.9']['max_conf_diff']:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
