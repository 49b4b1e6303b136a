"""YOLOv11 detection on ultralytics (torch).

Loads `.pt` weights from a local path (or builds an untrained model from a `.yaml`, useful for
tests of plumbing), runs batched inference and returns boxes in source-frame pixels. Never
downloads anything: ultralytics is put in offline mode before it is imported, and a missing
weights file is an error that says what to fetch and where to put it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Detections, InferenceError, ModelLoadError, WeightsNotFoundError
from .offline import prepare_ultralytics_offline

log = logging.getLogger(__name__)

WEIGHTS_HELP = (
    "Download YOLOv11 weights (for example yolo11n.pt from the Ultralytics assets release "
    "on GitHub) on a machine with internet access and copy the file to that path, or point "
    "`weights` at your own trained .pt file. framegrid never downloads weights itself. "
    "The demo model models/shapes-yolo11n.pt is rebuilt by tools/train_shapes.py."
)


def missing_weights_message(path: Path) -> str:
    return f"weights file not found: {path}. {WEIGHTS_HELP}"


class YoloDetector:
    """A YOLOv11 model on torch. One instance per executor slot; not shared between threads."""

    def __init__(
        self,
        name: str,
        weights: str | Path,
        imgsz: int = 640,
        confidence: float = 0.25,
        iou: float = 0.45,
        device: str = "cpu",
        half: bool = False,
        max_detections: int = 300,
        classes: Sequence[int] | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.name = name
        self.weights = Path(weights)
        self.imgsz = imgsz
        self.confidence = confidence
        self.iou = iou
        self.device = device
        self.half = half
        self.max_detections = max_detections
        self.classes = list(classes) if classes is not None else None
        self.torch_threads = torch_threads
        self.class_names: tuple[str, ...] = ()
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        if self.weights.suffix not in (".pt", ".yaml", ".yml"):
            raise ModelLoadError(f"model {self.name}: weights must be a .pt or .yaml file, got {self.weights}")
        if self.weights.suffix == ".pt" and not self.weights.is_file():
            raise WeightsNotFoundError(f"model {self.name}: {missing_weights_message(self.weights)}")
        prepare_ultralytics_offline()
        try:
            import torch
            from ultralytics import YOLO

            if self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            source = str(self.weights) if self.weights.suffix == ".pt" else self.weights.name
            if self.weights.suffix != ".pt" and self.weights.is_file():
                source = str(self.weights)
            model = YOLO(source, task="detect")
            model.to(self.device)
        except WeightsNotFoundError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"model {self.name}: cannot load {self.weights}: {exc}") from exc
        names = model.names
        self.class_names = tuple(names[i] for i in sorted(names)) if isinstance(names, dict) else tuple(names)
        self._model = model
        log.info("model %s: loaded %s (%d classes) on %s", self.name, self.weights.name,
                 len(self.class_names), self.device)

    def warmup(self) -> None:
        """One dummy batch so the first real frame does not pay for lazy initialisation."""
        self.infer([np.zeros((self.imgsz, self.imgsz, 3), np.uint8)])

    def infer(self, images: Sequence[np.ndarray]) -> list[Detections]:
        if self._model is None:
            raise InferenceError(f"model {self.name}: infer() before load()")
        if not images:
            return []
        t0 = time.perf_counter()
        with self._lock:
            try:
                results = self._model.predict(
                    list(images), imgsz=self.imgsz, conf=self.confidence, iou=self.iou,
                    device=self.device, half=self.half, max_det=self.max_detections,
                    classes=self.classes, verbose=False, stream=False,
                )
            except Exception as exc:
                raise InferenceError(f"model {self.name}: inference failed: {exc}") from exc
        total_ms = (time.perf_counter() - t0) * 1000
        out = []
        for r in results:
            boxes = r.boxes
            xyxy = boxes.xyxy.cpu().numpy().astype(np.float32).reshape(-1, 4)
            conf = boxes.conf.cpu().numpy().astype(np.float32).reshape(-1)
            cls = boxes.cls.cpu().numpy().astype(np.int32).reshape(-1)
            labels = tuple(self.class_names[c] if 0 <= c < len(self.class_names) else str(c) for c in cls)
            speed = getattr(r, "speed", {}) or {}
            timings = {
                # ultralytics reports per-image means over the batch; scale back to the batch
                "preprocess": float(speed.get("preprocess") or 0.0) * len(images),
                "inference": float(speed.get("inference") or 0.0) * len(images),
                "postprocess": float(speed.get("postprocess") or 0.0) * len(images),
                "batch_total": total_ms,
            }
            out.append(Detections(xyxy, conf, cls, labels, timings))
        return out

    def close(self) -> None:
        self._model = None
