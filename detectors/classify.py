"""An ultralytics classification model (YOLOv8/YOLO11 `-cls`) on the process's CPU runtime.

Runs on crops (an object's box cut out of its frame): each is scaled so its shorter side is
`imgsz` and centre-cropped to `imgsz` x `imgsz`, as ultralytics' classify transforms do, then
RGB float NCHW in [0, 1]. The export's output is already the class probabilities. A `.pt` is
exported once (cached next to it, see `detectors.export`); `.onnx` and an IR are run as given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .base import ModelLoadError, WeightsNotFoundError
from .export import ensure_export
from .modelfile import ModelFileError, model_kind
from .yolo import missing_weights_message

log = logging.getLogger(__name__)


def prepare(crop: np.ndarray, size: int) -> np.ndarray:
    """One BGR crop -> (3, size, size) float32 RGB in [0, 1] (shorter side to `size`, centre crop)."""
    h, w = crop.shape[:2]
    scale = size / max(1, min(h, w))
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = cv2.resize(crop, (rw, rh), interpolation=cv2.INTER_LINEAR)
    top, left = (rh - size) // 2, (rw - size) // 2
    square = resized[top:top + size, left:left + size, ::-1]
    return np.ascontiguousarray(square.transpose(2, 0, 1), dtype=np.float32) / 255.0


class Classifier:
    """One copy of a classification model (one per slot thread; not shared between threads)."""

    def __init__(self, name: str, weights: str | Path, runtime: str, imgsz: int = 64, threads: int | None = None,
                 names: Sequence[str] = ()) -> None:
        self.name = name
        self.weights = Path(weights)
        self.runtime = runtime
        self.imgsz = imgsz
        self.threads = threads
        self.names = tuple(names)
        self.class_names: tuple[str, ...] = ()
        self._run: Any = None

    def load(self) -> None:
        if not self.weights.exists():
            raise WeightsNotFoundError(f"model {self.name}: {missing_weights_message(self.weights)}")
        kind = model_kind(self.weights)
        path = self.weights
        if kind == "pt":
            path = ensure_export(self.weights, self.imgsz, "openvino" if self.runtime == "openvino" else "onnx")
        try:
            meta, out_rank = self._open(path)
        except Exception as exc:
            raise ModelLoadError(f"model {self.name}: cannot load {path}: {exc}") from exc
        task = meta.get("task")
        if task not in (None, "classify") or out_rank != 2:
            raise ModelLoadError(str(ModelFileError(
                f"model {self.name}: {path.name} is {'a ' + task if task else 'not a classification'} model; "
                "expected a YOLOv8/YOLO11 classification model (output [batch, classes])")))
        from .onnx import parse_names

        self.class_names = self.names or parse_names(meta.get("names", {}))
        log.info("model %s: classifier %s on %s (%d classes)", self.name, path.name, self.runtime,
                 len(self.class_names))

    def _open(self, path: Path) -> tuple[dict[str, Any], int]:
        if self.runtime == "openvino":
            import openvino as ov

            from .openvino import file_metadata, prime_numpy_bridge

            xml = next(path.glob("*.xml"), None) if path.is_dir() else path
            if xml is None:
                raise FileNotFoundError(f"no OpenVINO .xml model in {path}")
            prime_numpy_bridge()
            core = ov.Core()
            model = core.read_model(xml)
            config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            request = core.compile_model(model, "CPU", config).create_infer_request()

            def run(batch: np.ndarray) -> np.ndarray:
                request.infer({0: batch})
                return np.array(request.get_output_tensor(0).data, copy=True)

            self._run = run
            return file_metadata(model, xml), len(model.outputs[0].get_partial_shape())
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        self._run = lambda batch: session.run(None, {name: batch})[0]
        return dict(session.get_modelmeta().custom_metadata_map), len(session.get_outputs()[0].shape)

    def classify(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """(top label, its probability) per BGR crop, in one batch."""
        if not crops:
            return []
        probs = np.asarray(self._run(np.stack([prepare(c, self.imgsz) for c in crops])))
        top = probs.argmax(1)
        return [(self.class_names[i] if i < len(self.class_names) else str(int(i)), float(probs[k, i]))
                for k, i in enumerate(top)]
