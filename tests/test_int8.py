"""INT8 on the CPU: the bundled model's OpenVINO export quantized (NNCF) on a folder of calibration
frames, cached by those frames, finding what the float model finds; a config asking for it without
usable calibration images is refused with the key that is wrong."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import pytest

from detectors.runtimes import installed
from pipeline import ConfigError, parse_config
from streams.synthetic import box_iou, render_image, render_occluded_image
from tests.support.procs import MODEL

pytestmark = pytest.mark.skipif(not installed("openvino"), reason="OpenVINO needed")
IMGSZ = 320


def frame(seed: int) -> tuple:
    return (render_image if seed % 2 else render_occluded_image)(seed, 1280, 720)


def calibration_folder(folder: Path, count: int, first: int = 700_000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        cv2.imwrite(str(folder / f"{k:03d}.jpg"), frame(first + k)[0])
    return folder


def f1(found: list, truth: list, iou: float) -> float:
    """Boxes of `found` matched to `truth` (same class, IoU >= iou), each at most once."""
    tp = fp = fn = 0
    for a, b in zip(truth, found, strict=True):
        used: set[int] = set()
        for box, cls in zip(a[0], a[1], strict=True):
            hits = [(box_iou(box, y), j) for j, (y, c) in enumerate(zip(b[0], b[1], strict=True))
                    if j not in used and c == cls]
            best = max(hits, default=(0.0, -1))
            if best[0] >= iou:
                tp += 1
                used.add(best[1])
            else:
                fn += 1
        fp += len(b[0]) - len(used)
    return 2 * tp / max(1, 2 * tp + fp + fn)


def test_int8_is_calibrated_on_the_folder_cached_and_finds_what_float_finds(tmp_path: Path) -> None:
    from detectors.openvino import OpenVinoYoloDetector

    work = tmp_path / "models"
    work.mkdir()
    weights = Path(shutil.copyfile(MODEL, work / MODEL.name))
    for export in MODEL.parent.glob(f"{MODEL.stem}.{IMGSZ}.fp32.*_openvino_model"):  # the float export: cached
        shutil.copytree(export, work / export.name)
    calib = calibration_folder(tmp_path / "calib", 24)
    # two slots loading at once: one quantizes, the other waits for it and takes the same export
    slots = [OpenVinoYoloDetector("m", weights, imgsz=IMGSZ, precision="int8", calibration=calib) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda d: d.load(), slots))
    assert slots[0].export_path == slots[1].export_path
    assert not list(work.glob("*.part")), list(work.iterdir())
    for d in slots:
        d.close()
    frames = [frame(810_000 + s) for s in range(40)]
    answers = {}
    options: dict[str, dict[str, Any]] = {"float": {}, "int8": {"precision": "int8", "calibration": calib}}
    for label, kw in options.items():
        det = OpenVinoYoloDetector("m", weights, imgsz=IMGSZ, confidence=0.25, threads=2, max_batch=4, **kw)
        det.load()
        answers[label] = [(d.boxes.tolist(), d.class_ids.tolist()) for d in (det.infer([im])[0] for im, _ in frames)]
        if label == "int8":
            assert det.export_path is not None
            assert ".int8." in det.export_path.name
            import openvino as ov

            ops = {op.get_type_name() for op in ov.Core().read_model(next(det.export_path.glob("*.xml"))).get_ops()}
            assert "FakeQuantize" in ops, "no quantized op in the INT8 export"
            made = det.export_path.stat().st_mtime
        det.close()
    truth = [(list(t.boxes), list(t.class_ids)) for _, t in frames]
    agree = f1(answers["int8"], answers["float"], 0.5)
    on_truth = f1(answers["int8"], truth, 0.5), f1(answers["float"], truth, 0.5)
    print(f"int8 vs float F1 {agree:.3f}; vs truth int8 {on_truth[0]:.3f}, float {on_truth[1]:.3f}")
    assert agree >= 0.93, agree
    assert on_truth[0] >= on_truth[1] - 0.03, on_truth

    again = OpenVinoYoloDetector("m", weights, imgsz=IMGSZ, precision="int8", calibration=calib)
    again.load()  # the same frames: the cached export, not a second quantization
    assert again.export_path is not None
    assert again.export_path.stat().st_mtime == made
    again.close()
    (calib / "000.jpg").write_bytes(cv2.imencode(".jpg", frame(900_000)[0])[1].tobytes())
    other = OpenVinoYoloDetector("m", weights, imgsz=IMGSZ, precision="int8", calibration=calib)
    assert other._resolve_export() != again.export_path, "other frames reused the export calibrated on the first"


def model_table(tmp_path: Path, **extra: object) -> dict:
    return {"models": {"m": {"type": "yolo", "weights": str(MODEL), "imgsz": IMGSZ, **extra}},
            "streams": {"cam": {"url": "rtsp://127.0.0.1:1/x", "model": "m"}}}


def test_int8_without_usable_calibration_frames_is_refused_by_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(model_table(tmp_path, cpu_precision="int8"), tmp_path)
    assert any(key.startswith("models.m") and "calibration" in msg for key, msg in info.value.errors), info.value

    few = calibration_folder(tmp_path / "few", 3)
    with pytest.raises(ConfigError) as info:
        parse_config(model_table(tmp_path, cpu_precision="int8", calibration="few"), tmp_path)
    assert ("models.m.calibration", f"calibration folder {few} holds 3 image(s) (.jpg/.png); INT8 calibration "
            "needs at least 16, a few hundred frames from the cameras are best") in info.value.errors

    with pytest.raises(ConfigError) as info:
        parse_config(model_table(tmp_path, cpu_precision="int8", calibration="few", backend="onnxruntime"), tmp_path)
    assert any("OpenVINO export" in msg for _, msg in info.value.errors), info.value

    calibration_folder(tmp_path / "enough", 16)
    cfg = parse_config(model_table(tmp_path, cpu_precision="int8", calibration="enough"), tmp_path)
    assert cfg.models["m"].calibration == tmp_path / "enough"
