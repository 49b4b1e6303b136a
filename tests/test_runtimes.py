"""Inference runtimes: export cache, parity with torch, device-side preprocessing, backend choice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from detectors import YoloDetector
from detectors.export import cache_path
from detectors.letterbox import batch_groups, geometry, letterbox, letterbox_torch
from detectors.onnx import OnnxYoloDetector, nms
from detectors.openvino import OpenVinoYoloDetector
from detectors.runtimes import CPU_PREFERENCE, installed, resolve_backend
from streams.synthetic import MovingScene, render_image
from tests.support.media import iou
from tests.support.procs import MODEL


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    shutil.copyfile(MODEL, folder / MODEL.name)
    return folder / MODEL.name


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Stills plus frames of the moving ground-truth scene the e2e tests stream."""
    out = [render_image(s)[0] for s in range(910_000, 910_008)]
    out += [img for img, _ in list(MovingScene(seed=31).frames(60))[::6]]
    return out


@pytest.fixture(scope="module")
def torch_reference(weights: Path, images: list[np.ndarray]) -> list:
    """What ultralytics' own `YOLO(weights).predict` finds, one image at a time (not framegrid's code)."""
    from types import SimpleNamespace

    from detectors import prepare_ultralytics_offline

    prepare_ultralytics_offline()
    from ultralytics import YOLO

    model = YOLO(str(weights))
    out = []
    for img in images:
        r = model.predict(img, imgsz=320, conf=0.3, verbose=False)[0]
        out.append(SimpleNamespace(labels=[r.names[int(c)] for c in r.boxes.cls], boxes=r.boxes.xyxy.numpy()))
    return out


def same_objects(a: list, b: list) -> int:
    """Assert per image: equal label multisets, every reference box matched at IoU >= 0.9."""
    compared = 0
    for da, db in zip(a, b, strict=True):
        assert sorted(da.labels) == sorted(db.labels)
        for lab, box in zip(db.labels, db.boxes, strict=True):
            assert max(iou(box, bb) for la, bb in zip(da.labels, da.boxes, strict=True) if la == lab) >= 0.9
            compared += 1
    return compared


@pytest.mark.parametrize("cls", [OnnxYoloDetector, OpenVinoYoloDetector], ids=["onnxruntime", "openvino"])
def test_export_is_cached_and_keyed(weights: Path, cls: type) -> None:
    d = cls("m", weights, imgsz=320, threads=2)
    d.load()
    assert d.export_path == cache_path(weights, 320, cls.export_format)
    assert d.export_path.parent == weights.parent
    mtime = d.export_path.stat().st_mtime_ns
    again = cls("m", weights, imgsz=320, threads=2)
    again.load()  # reuses the export: no second one
    assert again.export_path == d.export_path
    assert d.export_path.stat().st_mtime_ns == mtime
    assert d.class_names == ("circle", "square", "triangle")
    # what changes the graph changes the key
    keys = {cache_path(weights, 320, cls.export_format), cache_path(weights, 640, cls.export_format),
            cache_path(weights, 320, cls.export_format, "fp16")}
    assert len(keys) == 3
    assert cache_path(weights, 320, "onnx") != cache_path(weights, 320, "openvino")


@pytest.mark.parametrize(
    ("cls", "extra"),
    [
        (OnnxYoloDetector, {}),
        (OpenVinoYoloDetector, {"inference_precision": "f32"}),
        (OpenVinoYoloDetector, {"inference_precision": "auto"}),
    ],
    ids=["onnxruntime", "openvino-f32", "openvino-auto"],
)
def test_same_objects_as_torch(
    weights: Path, images: list[np.ndarray], torch_reference: list, cls: type, extra: dict[str, str]
) -> None:
    """Every runtime, at every precision it may pick by itself (OpenVINO's `auto` is bf16 on CPUs
    with BF16 units), finds the same objects as torch."""
    det = cls("m", weights, imgsz=320, confidence=0.3, threads=2, **extra)
    det.load()
    assert same_objects(det.infer(images), torch_reference) >= 30
    # one image at a time (square input) finds the same as the rectangular batch
    single = [det.infer([img])[0] for img in images[:6]]
    assert same_objects(single, torch_reference[:6]) >= 10


def test_letterbox_matches_ultralytics() -> None:
    from detectors import prepare_ultralytics_offline

    prepare_ultralytics_offline()
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(0)
    for h, w in [(360, 640), (480, 640), (1080, 1920), (200, 100), (320, 320), (97, 211)]:
        img = rng.integers(0, 255, (h, w, 3), np.uint8)
        for rect in (False, True):
            ours = letterbox(img, geometry(w, h, 320, 32, rect=rect))
            theirs = LetterBox((320, 320), auto=rect, stride=32)(image=img)
            assert ours.shape == theirs.shape, (h, w, rect)
            assert np.array_equal(ours, theirs), (h, w, rect)
    # each picture gets its own rectangle, as ultralytics gives it alone; one call per input size
    groups = batch_groups([(360, 640), (480, 640), (1080, 1920), (720, 1280)], 320)
    assert [(idx, {(g.out_w, g.out_h) for g in geos}) for idx, geos in groups] == [
        ([0, 2, 3], {(320, 192)}),
        ([1], {(320, 256)}),
    ]
    assert [g.src_w for g in groups[0][1]] == [640, 1920, 1280]  # each keeps its own scale
    assert {
        (g.out_w, g.out_h) for _, geos in batch_groups([(360, 640), (480, 640)], 320, rect=False) for g in geos
    } == {(320, 320)}


def test_device_side_preprocessing_matches_ultralytics(weights: Path, images: list[np.ndarray]) -> None:
    """The GPU path's letterbox/normalise/layout, run on the CPU, against ultralytics' own preprocessing."""
    import torch

    from detectors import prepare_ultralytics_offline

    prepare_ultralytics_offline()
    from ultralytics import YOLO

    det = YoloDetector("m", weights, imgsz=320, confidence=0.3, device_preprocess=True)
    det.load()
    model = YOLO(str(weights))
    model.predict(images[:1], imgsz=320, verbose=False)  # builds the predictor with its settings
    predictor = model.predictor
    batch = images[:4]
    for sample, rect in ((batch, True), ([batch[0], np.ascontiguousarray(batch[1][:300, :500])], False)):
        geos = [geometry(im.shape[1], im.shape[0], 320, 32, rect=rect) for im in sample]
        ours = det.preprocess(sample, geos)
        theirs = predictor.preprocess(list(sample))
        assert ours.shape == theirs.shape
        assert ours.dtype == theirs.dtype == torch.float32
        diff = (ours - theirs).abs()
        assert diff.max().item() <= 2.5 / 255
        assert diff.mean().item() < 0.3 / 255
    # and the detections of the whole device-side path equal ultralytics' predict
    theirs = model.predict(batch, imgsz=320, conf=0.3, verbose=False)
    for d, r in zip(det.infer(batch), theirs, strict=True):
        assert sorted(d.labels) == sorted(r.names[int(c)] for c in r.boxes.cls)
        for box in r.boxes.xyxy.numpy():
            assert max(iou(box, b) for b in d.boxes) >= 0.98


def test_device_side_letterbox_geometry() -> None:
    import torch

    img = torch.zeros((360, 640, 3), dtype=torch.uint8)
    img[:, :, 2] = 255  # red in BGR
    out = letterbox_torch(img, geometry(640, 360, 320, rect=False), torch.float32)
    assert out.shape == (3, 320, 320)
    assert torch.allclose(out[:, :70], torch.full_like(out[:, :70], 114 / 255))  # grey bars top
    assert torch.allclose(out[0, 70:250], torch.ones_like(out[0, 70:250]))  # RGB order: red first
    assert out[1:, 70:250].abs().max() == 0


def test_nms_and_geometry_round_trip() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    g = geometry(640, 360, 320, rect=True)
    assert (g.out_w, g.out_h, g.left, g.top, g.gain) == (320, 192, 0, 6, 0.5)
    back = g.to_source(np.array([[0, 6, 320, 186]], np.float32))
    assert np.allclose(back, [[0, 0, 640, 360]])


def test_backend_choice(weights: Path, tmp_path: Path) -> None:
    from pipeline import default_detector_factory, parse_config, plan_models
    from pipeline.config import ConfigError
    from pipeline.core.devices import DeviceInfo

    assert resolve_backend("auto", "cuda:0") == "torch"  # the CUDA-stream path
    assert resolve_backend("auto", "cpu") == next(r for r in CPU_PREFERENCE if installed(r))
    cfg = parse_config(
        {"models": {"m": {"type": "yolo", "weights": str(weights), "backend": "onnxruntime", "threads": 2}}}, tmp_path
    )
    det = default_detector_factory("m", cfg.models["m"])
    assert isinstance(det, OnnxYoloDetector)
    assert det.threads == 2
    auto = parse_config({"models": {"m": {"type": "yolo", "weights": str(weights)}}}, tmp_path)
    assert default_detector_factory("m", auto.models["m"]).runtime == "openvino"  # installed with [cpu]
    with pytest.raises(ConfigError, match=r"models\.m\.backend"):
        parse_config({"models": {"m": {"type": "yolo", "weights": str(weights), "backend": "tflite"}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"models\.m: backend tensorrt cannot run a \.pt file"):
        parse_config({"models": {"m": {"type": "yolo", "weights": str(weights), "backend": "tensorrt"}}}, tmp_path)
    # two runtimes on the CPU of one process are refused before anything loads
    mixed = parse_config(
        {
            "models": {
                "a": {"type": "yolo", "weights": str(weights), "backend": "torch"},
                "b": {"type": "yolo", "weights": str(weights), "backend": "onnxruntime"},
            },
            "streams": {
                "s1": {"url": "rtsp://127.0.0.1:9/a", "model": "a"},
                "s2": {"url": "rtsp://127.0.0.1:9/b", "model": "b"},
            },
        },
        tmp_path,
    )
    cpu = [DeviceInfo("cpu", "cpu", "test CPU", 0, 0, cores=2)]
    with pytest.raises(ConfigError, match="one inference runtime per process"):
        plan_models(mixed.models, ["a", "b"], mixed.devices, cpu)
    # ... also when the second one comes later, while the first runs
    first = plan_models(mixed.models, ["a"], mixed.devices, cpu)
    with pytest.raises(ConfigError, match="one inference runtime per process"):
        plan_models(mixed.models, ["b"], mixed.devices, cpu, running=first.runtimes)
