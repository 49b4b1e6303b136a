"""YOLOv11 on an exported graph (ONNX Runtime or OpenVINO): no torch in the serving process.

The `.pt` is exported once with ultralytics' exporter (in a child process, see
`detectors.export`) and cached. Inference is letterbox (OpenCV, rectangular when a batch shares
one size; the exports have dynamic shapes) straight into the input buffer -> runtime ->
confidence filter -> NMS (class-aware unless `agnostic`) -> boxes mapped back to source pixels,
in numpy, with an explicit thread budget. The defaults are ultralytics' `predict()` defaults
(confidence 0.25, IoU 0.7, 300 boxes, class-aware), so the answers are the model's own.
`ExportedYoloDetector` holds all of that; a runtime subclass only opens a session and runs it.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Detections, Image, InferenceError, ModelLoadError, WeightsNotFoundError, bgr_of, picture_size
from .defaults import CONFIDENCE, IMGSZ, IOU
from .export import ensure_export
from .letterbox import Geometry, InputBuffers, infer_in_groups
from .modelfile import GraphFacts, ModelFileError, check_detection_head, dims, flag
from .yolo import missing_weights_message

log = logging.getLogger(__name__)

MAX_WH = 7680.0  # class offset for class-aware NMS in one pass (ultralytics uses the same)


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


def parse_names(value: Any) -> tuple[str, ...]:
    """Class names from export metadata: a dict {id: name}, or its repr as ONNX stores it."""
    names = ast.literal_eval(value) if isinstance(value, str) else value
    if isinstance(names, dict):
        return tuple(str(names[i]) for i in sorted(names))
    return tuple(str(n) for n in names or ())


class ExportedYoloDetector:
    """The runtime-independent part of a YOLOv11 detector on an exported graph."""

    runtime = "exported"
    export_format = "onnx"
    input_layout = "nchw-f32"  # what `_run` takes (see `letterbox.InputBuffers`)

    def __init__(self, name: str, weights: str | Path, imgsz: int = IMGSZ, confidence: float = CONFIDENCE,
                 iou: float = IOU, threads: int | None = None, max_detections: int = 300,
                 device: str = "cpu", precision: str = "fp32", rect: bool = True, agnostic: bool = False,
                 names: Sequence[str] = (), calibration: Path | None = None) -> None:
        self.name = name
        self.weights = Path(weights)
        self.imgsz = imgsz
        self.confidence = confidence
        self.iou = iou
        self.threads = threads
        self.max_detections = max_detections
        self.device = device
        self.precision = precision
        self.calibration = calibration  # int8: the images its quantization is calibrated on
        self.agnostic = agnostic
        self._inputs = InputBuffers(self.input_layout)
        self.rect = rect
        self.stride = 32
        self.names = tuple(names)  # the config's class names (win over the file's)
        self.class_names: tuple[str, ...] = ()
        self.export_path: Path | None = None
        self.fixed_batch: int | None = None  # a graph exported with a fixed batch runs in chunks of it

    # subclasses: open the session and say the file's class names and shapes; run one batch
    def _open(self, path: Path) -> tuple[tuple[str, ...], GraphFacts]:
        raise NotImplementedError

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """One batch in `input_layout` -> the raw (N, 4 + classes, anchors) predictions."""
        raise NotImplementedError

    def _resolve_export(self) -> Path:
        if not self.weights.exists():
            raise WeightsNotFoundError(f"model {self.name}: {missing_weights_message(self.weights)}")
        if self.weights.suffix == ".pt":
            return ensure_export(self.weights, self.imgsz, self.export_format, self.precision,
                                 calibration=self.calibration)
        if self.precision == "int8":
            raise ModelLoadError(f"model {self.name}: INT8 quantizes the export of a .pt; {self.weights.name} is "
                                 "exported already (quantize it with NNCF and give the result, or give the .pt)")
        return self.weights  # already exported by the user

    def load(self) -> None:
        self.export_path = path = self._resolve_export()
        try:
            file_names, facts = self._open(path)
        except Exception as exc:
            raise ModelLoadError(f"model {self.name}: cannot load {path}: {exc}") from exc
        try:
            if len(facts.output_shape) == 3 and facts.output_shape[1] < 0 and len(facts.input_shape) == 4:
                facts = self._probe_output(facts)  # a graph without output shapes: ask it
            classes = check_detection_head(self.name, path, facts, self.names)
            self._fit_fixed_shape(path, facts)
        except ModelFileError as exc:
            self.close()
            raise ModelLoadError(str(exc)) from exc
        self.class_names = self.names or file_names
        if len(self.class_names) != classes:
            log.warning("model %s: %s names %d classes but has %d; labels are class ids where no name is known "
                        "(set `names` or `classes_file` in the model's config)", self.name, path.name,
                        len(self.class_names), classes)

    def _probe_output(self, facts: GraphFacts) -> GraphFacts:
        """The facts with the output shape of one blank frame run through the graph."""
        n = facts.fixed_batch or 1
        h, w = facts.fixed_size or (64, 64)
        shape = (n, 3, h, w) if self.input_layout == "nchw-f32" else (n, h, w, 3)
        blank = np.zeros(shape, np.float32 if self.input_layout == "nchw-f32" else np.uint8)
        out_shape = tuple(int(d) for d in self._run(blank).shape)
        return dataclasses.replace(facts, output_shape=out_shape)

    def _fit_fixed_shape(self, path: Path, facts: GraphFacts) -> None:
        """A graph exported with fixed shapes gets exactly those: square letterbox, batches in its size."""
        self.fixed_batch = facts.fixed_batch
        if (size := facts.fixed_size) is None:
            return
        if size[0] != size[1]:
            raise ModelFileError(f"model {self.name}: {path.name} has a fixed non-square input {size[1]}x{size[0]}; "
                                 "export it with dynamic=True or a square imgsz")
        if size[0] != self.imgsz:
            log.warning("model %s: %s takes a fixed %dx%d input; imgsz %d does not apply", self.name, path.name,
                        size[0], size[0], self.imgsz)
        self.imgsz, self.rect = size[0], False

    def warmup(self) -> None:
        self.infer([np.zeros((self.imgsz, self.imgsz, 3), np.uint8)])

    def infer(self, images: Sequence[Image]) -> list[Detections]:
        if self.export_path is None:
            raise InferenceError(f"model {self.name}: infer() before load()")
        if not images:
            return []
        return infer_in_groups(images, [picture_size(im) for im in images], self.imgsz, self.stride, self.rect,
                               self._infer_group)

    def _infer_group(self, images: list[Image], geos: list[Geometry]) -> list[Detections]:
        """One model call for pictures that share a network input size."""
        t0 = time.perf_counter()
        batch = self._inputs.fill([bgr_of(im) for im in images], geos)
        t1 = time.perf_counter()
        try:
            out = self._run_in_chunks(batch)
        except Exception as exc:
            raise InferenceError(f"model {self.name}: inference failed: {exc}") from exc
        t2 = time.perf_counter()
        results = [self._decode(out[i], geos[i]) for i in range(len(images))]
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1000, "inference": (t2 - t1) * 1000,
                   "postprocess": (t3 - t2) * 1000, "batch_total": (t3 - t0) * 1000}
        return [Detections(d.boxes, d.confidences, d.class_ids, d.labels, dict(timings)) for d in results]

    def _run_in_chunks(self, batch: np.ndarray) -> np.ndarray:
        """`_run`, in chunks of a fixed-batch graph's size (the last one padded with blank frames)."""
        n = self.fixed_batch
        if n is None or len(batch) == n:
            return self._run(batch)
        parts = []
        for i in range(0, len(batch), n):
            chunk = batch[i:i + n]
            real = len(chunk)
            if real < n:
                chunk = np.concatenate([chunk, np.zeros((n - real, *chunk.shape[1:]), chunk.dtype)])
            parts.append(self._run(chunk)[:real])
        return np.concatenate(parts)

    def _decode(self, pred: np.ndarray, geo: Geometry) -> Detections:
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
        offset = 0.0 if self.agnostic else cls[:, None] * MAX_WH  # class-aware: boxes of classes never meet
        keep = nms(boxes + offset, conf, self.iou)[: self.max_detections]
        boxes, conf, cls = geo.to_source(boxes[keep]), conf[keep], cls[keep]
        labels = tuple(self.class_names[c] if c < len(self.class_names) else str(c) for c in cls)
        return Detections(boxes, conf.astype(np.float32), cls.astype(np.int32), labels)

    def close(self) -> None:
        self.export_path = None


class OnnxYoloDetector(ExportedYoloDetector):
    """A YOLOv11 detection model on ONNX Runtime (CPU, or CUDA when its provider is installed)."""

    runtime = "onnxruntime"
    export_format = "onnx"
    _session: Any = None

    @property
    def onnx_path(self) -> Path | None:
        return self.export_path

    def _open(self, path: Path) -> tuple[tuple[str, ...], GraphFacts]:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(str(path), opts, providers=providers)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        self._input = inputs[0].name
        meta = self._session.get_modelmeta().custom_metadata_map
        self.stride = int(meta.get("stride", 32))
        log.info("model %s: ONNX Runtime session on %s (%s, %s threads)", self.name, path.name,
                 ", ".join(self._session.get_providers()), self.threads or "default")
        facts = GraphFacts(dims(inputs[0].shape), dims(outputs[0].shape), len(outputs), meta.get("task"),
                           flag(meta.get("end2end")))
        return parse_names(meta.get("names", "{}")), facts

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(None, {self._input: batch})
        return out

    def close(self) -> None:
        super().close()
        self._session = None
