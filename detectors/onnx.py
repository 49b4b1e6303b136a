"""YOLOv11 on ONNX Runtime: no torch in the serving process.

The `.pt` is exported once (in a child process, see `detectors.export`) and cached. Inference
is letterbox -> NCHW float -> ORT session -> confidence filter -> class-aware NMS -> boxes
mapped back to source pixels, all in numpy/OpenCV, with an explicit thread budget.
"""

from __future__ import annotations

import ast
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .base import Detections, InferenceError, ModelLoadError, WeightsNotFoundError
from .export import ensure_onnx
from .yolo import missing_weights_message

log = logging.getLogger(__name__)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, float, float]:
    """Resize keeping aspect ratio into size x size, centred on grey 114 (ultralytics' padding)."""
    h, w = image.shape[:2]
    gain = min(size / h, size / w)
    nw, nh = round(w * gain), round(h * gain)
    pad_x, pad_y = (size - nw) / 2, (size - nh) / 2
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else image
    top, left = round(pad_y - 0.1), round(pad_x - 0.1)
    out = np.full((size, size, 3), 114, np.uint8)
    out[top:top + nh, left:left + nw] = resized
    return out, gain, left, top


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first."""
    order = scores.argsort()[::-1]
    keep = []
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        ix = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        iy = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = ix * iy
        ious = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[ious <= iou]
    return np.asarray(keep, dtype=np.int64)


class OnnxYoloDetector:
    """A YOLOv11 detection model on ONNX Runtime (CPU, or CUDA when its provider is installed)."""

    def __init__(self, name: str, weights: str | Path, imgsz: int = 640, confidence: float = 0.25,
                 iou: float = 0.45, threads: int | None = None, max_detections: int = 300,
                 device: str = "cpu") -> None:
        self.name = name
        self.weights = Path(weights)
        self.imgsz = imgsz
        self.confidence = confidence
        self.iou = iou
        self.threads = threads
        self.max_detections = max_detections
        self.device = device
        self.class_names: tuple[str, ...] = ()
        self.onnx_path: Path | None = None
        self._session: Any = None
        self._input = "images"

    def load(self) -> None:
        if not self.weights.is_file():
            raise WeightsNotFoundError(f"model {self.name}: {missing_weights_message(self.weights)}")
        is_onnx = self.weights.suffix == ".onnx"
        self.onnx_path = self.weights if is_onnx else ensure_onnx(self.weights, self.imgsz)
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self._session = ort.InferenceSession(str(self.onnx_path), opts, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"model {self.name}: cannot load {self.onnx_path}: {exc}") from exc
        meta = self._session.get_modelmeta().custom_metadata_map
        names = ast.literal_eval(meta["names"]) if "names" in meta else {}
        self.class_names = tuple(names[i] for i in sorted(names))
        self._input = self._session.get_inputs()[0].name
        log.info("model %s: ONNX Runtime session on %s (%s)", self.name, self.onnx_path.name,
                 ", ".join(self._session.get_providers()))

    def warmup(self) -> None:
        self.infer([np.zeros((self.imgsz, self.imgsz, 3), np.uint8)])

    def infer(self, images: Sequence[np.ndarray]) -> list[Detections]:
        if self._session is None:
            raise InferenceError(f"model {self.name}: infer() before load()")
        if not images:
            return []
        t0 = time.perf_counter()
        batch = np.empty((len(images), 3, self.imgsz, self.imgsz), np.float32)
        geo = []
        for i, img in enumerate(images):
            lb, gain, left, top = letterbox(img, self.imgsz)
            batch[i] = lb[:, :, ::-1].transpose(2, 0, 1)
            geo.append((gain, left, top, img.shape[1], img.shape[0]))
        batch *= 1 / 255.0
        t1 = time.perf_counter()
        try:
            (out,) = self._session.run(None, {self._input: batch})
        except Exception as exc:
            raise InferenceError(f"model {self.name}: inference failed: {exc}") from exc
        t2 = time.perf_counter()
        results = [self._decode(out[i], *geo[i]) for i in range(len(images))]
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1000, "inference": (t2 - t1) * 1000,
                   "postprocess": (t3 - t2) * 1000, "batch_total": (t3 - t0) * 1000}
        return [Detections(d.boxes, d.confidences, d.class_ids, d.labels, dict(timings)) for d in results]

    def _decode(self, pred: np.ndarray, gain: float, left: float, top: float, w: int, h: int) -> Detections:
        pred = pred.T  # (anchors, 4 + classes)
        scores = pred[:, 4:]
        cls = scores.argmax(1)
        conf = scores[np.arange(len(cls)), cls]
        mask = conf > self.confidence
        if not mask.any():
            return Detections.empty()
        p, cls, conf = pred[mask], cls[mask], conf[mask]
        xy, wh = p[:, :2], p[:, 2:4] / 2
        boxes = np.concatenate([xy - wh, xy + wh], 1)
        keep = nms(boxes + cls[:, None] * 7680.0, conf, self.iou)[: self.max_detections]  # class-aware
        boxes, conf, cls = boxes[keep], conf[keep], cls[keep]
        boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - left) / gain).clip(0, w)
        boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - top) / gain).clip(0, h)
        labels = tuple(self.class_names[c] if c < len(self.class_names) else str(c) for c in cls)
        return Detections(boxes.astype(np.float32), conf.astype(np.float32), cls.astype(np.int32), labels)

    def close(self) -> None:
        self._session = None
