"""The YOLOv11 backend with the real trained shapes model, scored against rendered truth."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from detectors import Detections, Detector, ModelLoadError, WeightsNotFoundError, YoloDetector
from streams.synthetic import CLASSES, MovingScene, render_image
from tests.support.media import iou
from tests.support.procs import MODEL


@pytest.fixture(scope="module")
def detector() -> YoloDetector:
    d = YoloDetector("shapes", MODEL, imgsz=320, confidence=0.3)
    d.load()
    d.warmup()
    return d


def recall(dets: list[Detections], truths: list, scale: float = 1.0) -> tuple[int, int]:
    hit = total = 0
    for det, truth in zip(dets, truths, strict=True):
        for cid, box, occ in zip(truth.class_ids, truth.boxes, truth.occluded or [False] * 99, strict=False):
            if occ:
                continue
            total += 1
            b = [v * scale for v in box]
            hit += any(
                lab == CLASSES[cid] and iou(bb, b) >= 0.5 for lab, bb in zip(det.labels, det.boxes, strict=False)
            )
    return hit, total


def test_protocol_and_class_names(detector: YoloDetector) -> None:
    assert isinstance(detector, Detector)
    assert detector.class_names == CLASSES


def test_batched_detections_match_truth_on_unseen_images(detector: YoloDetector) -> None:
    samples = [render_image(seed) for seed in range(900_000, 900_024)]  # never used in training
    dets = []
    for i in range(0, len(samples), 8):
        dets += detector.infer([img for img, _ in samples[i : i + 8]])
    hit, total = recall(dets, [t for _, t in samples])
    assert total >= 40, (hit, total)
    assert hit / total >= 0.9, (hit, total)
    assert all(d.timings_ms["inference"] > 0 for d in dets)


def test_boxes_are_in_source_pixels_at_any_resolution(detector: YoloDetector) -> None:
    scene = MovingScene(seed=21)
    frames = list(scene.frames(60))[::6]
    big = [cv2.resize(img, (1280, 720), interpolation=cv2.INTER_LINEAR) for img, _ in frames]
    dets = detector.infer(big)
    hit, total = recall(dets, [t for _, t in frames], scale=2.0)
    assert hit / total >= 0.9, (hit, total)
    assert max(float(d.boxes[:, 2].max()) for d in dets if len(d)) > 640  # really in 1280-wide pixels


def test_empty_and_blank_input(detector: YoloDetector) -> None:
    assert detector.infer([]) == []
    out = detector.infer([np.full((360, 640, 3), 127, np.uint8)])
    assert len(out) == 1
    assert len(out[0]) == 0


def test_missing_and_corrupt_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="Download") as info:
        YoloDetector("m", tmp_path / "yolo11n.pt").load()
    assert str(tmp_path / "yolo11n.pt") in str(info.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="model m: cannot load"):
        YoloDetector("m", bad).load()
    with pytest.raises(ModelLoadError, match=r"\.pt or \.yaml"):
        YoloDetector("m", tmp_path / "weights.onnx").load()
