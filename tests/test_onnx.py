"""ONNX Runtime backend: export cache and accuracy parity with the torch backend."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from detectors import YoloDetector
from detectors.export import cache_path
from detectors.onnx import OnnxYoloDetector, letterbox, nms
from streams.synthetic import MovingScene, render_image

from .conftest import MODEL
from .test_e2e import iou


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    shutil.copyfile(MODEL, folder / MODEL.name)
    return folder / MODEL.name


def test_export_is_cached_and_keyed(weights: Path) -> None:
    d = OnnxYoloDetector("m", weights, imgsz=320)
    d.load()
    assert d.onnx_path == cache_path(weights, 320) and d.onnx_path.parent == weights.parent
    mtime = d.onnx_path.stat().st_mtime_ns
    again = OnnxYoloDetector("m", weights, imgsz=320)
    again.load()  # reuses the file: no second export
    assert again.onnx_path == d.onnx_path and d.onnx_path.stat().st_mtime_ns == mtime
    assert cache_path(weights, 640) != d.onnx_path  # a different input size is a different graph
    assert d.class_names == ("circle", "square", "triangle")


def test_same_objects_as_torch(weights: Path) -> None:
    ort_det = OnnxYoloDetector("m", weights, imgsz=320, confidence=0.3)
    ort_det.load()
    torch_det = YoloDetector("m", weights, imgsz=320, confidence=0.3)
    torch_det.load()
    images = [render_image(s)[0] for s in range(910_000, 910_012)]
    images += [img for img, _ in list(MovingScene(seed=31).frames(40))[::8]]
    a = ort_det.infer(images)
    b = torch_det.infer(images)
    compared = 0
    for da, db in zip(a, b, strict=True):
        assert sorted(da.labels) == sorted(db.labels)
        for lab, box in zip(db.labels, db.boxes, strict=True):
            assert max(iou(box, bb) for la, bb in zip(da.labels, da.boxes, strict=True) if la == lab) >= 0.9
            compared += 1
    assert compared >= 30


def test_letterbox_and_nms() -> None:
    img = np.zeros((360, 640, 3), np.uint8)
    out, gain, left, top = letterbox(img, 320)
    assert out.shape == (320, 320, 3) and gain == 0.5 and left == 0 and top == 70
    assert (out[:70] == 114).all() and (out[70:250] == 0).all()
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


def test_backend_is_chosen_by_config(weights: Path, tmp_path: Path) -> None:
    from pipeline import default_detector_factory, parse_config

    cfg = parse_config({"models": {"m": {"type": "yolo", "weights": str(weights), "backend": "onnxruntime",
                                         "threads": 2}}}, tmp_path)
    det = default_detector_factory("m", cfg.models["m"])
    assert isinstance(det, OnnxYoloDetector) and det.threads == 2
    with pytest.raises(Exception, match="models.m.backend"):
        parse_config({"models": {"m": {"type": "yolo", "weights": str(weights), "backend": "tensorrt"}}}, tmp_path)
