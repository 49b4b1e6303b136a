"""YOLOv8/YOLO11 on a TensorRT engine (NVIDIA GPUs only): the user's `.engine`, as ultralytics exports it.

An engine is built for one GPU model and TensorRT version, so framegrid never builds one itself; it
runs the file it is given. ultralytics writes its metadata (class names, stride, imgsz, task) as a
length-prefixed JSON header before the serialized engine; a bare engine has none and takes its class
names from the config. Each slot owns its execution context and its CUDA stream; the letterboxed
batch is copied host -> device from a pinned buffer, run, and the output copied back once per batch.

Not run in CI (no GPU there): the header parsing and the runtime choice are tested on the CPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .modelfile import GraphFacts, dims, flag
from .onnx import ExportedYoloDetector, parse_names

log = logging.getLogger(__name__)


def read_engine_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """(metadata, serialized engine) of an `.engine` file, with or without ultralytics' JSON header."""
    data = path.read_bytes()
    if len(data) > 4:
        size = int.from_bytes(data[:4], "little", signed=True)
        if 0 < size <= len(data) - 4:
            try:
                meta = json.loads(data[4:4 + size].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                meta = None
            if isinstance(meta, dict):
                return meta, data[4 + size:]
    return {}, data


class TensorRtYoloDetector(ExportedYoloDetector):
    """A detection engine on one CUDA device, one execution context and stream per slot."""

    runtime = "tensorrt"
    export_format = "engine"
    _engine: Any = None
    _context: Any = None

    def _resolve_export(self) -> Path:
        if self.weights.suffix != ".engine":
            raise ValueError(f"model {self.name}: the tensorrt backend runs .engine files, got {self.weights.name}")
        return super()._resolve_export()

    def _open(self, path: Path) -> tuple[tuple[str, ...], GraphFacts]:
        import tensorrt as trt
        import torch

        meta, blob = read_engine_file(path)
        self._device = torch.device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(blob)
        if self._engine is None:
            raise ValueError("TensorRT could not deserialize it (built for another GPU or TensorRT version?)")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        self._input, self._output = inputs[0], outputs[0]
        self._half = self._engine.get_tensor_dtype(self._input) == trt.DataType.HALF
        self._stream = torch.cuda.Stream(self._device)
        self.stride = int(meta.get("stride", 32))
        log.info("model %s: TensorRT engine %s on %s%s", self.name, path.name, self.device,
                 " fp16" if self._half else "")
        facts = GraphFacts(dims(tuple(self._engine.get_tensor_shape(self._input))),
                           dims(tuple(self._engine.get_tensor_shape(self._output))), len(outputs),
                           meta.get("task"), flag(meta.get("end2end")))
        return parse_names(meta.get("names", {})), facts

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.cuda.stream(self._stream):
            x = torch.from_numpy(batch).pin_memory().to(self._device, non_blocking=True)
            if self._half:
                x = x.half()
            self._context.set_input_shape(self._input, tuple(x.shape))
            out = torch.empty(tuple(self._context.get_tensor_shape(self._output)), device=self._device,
                              dtype=torch.float16 if self._half else torch.float32)
            self._context.set_tensor_address(self._input, x.data_ptr())
            self._context.set_tensor_address(self._output, out.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            host = out.float().cpu()  # waits for this slot's stream only
        return host.numpy()

    def close(self) -> None:
        super().close()
        self._context = None
        self._engine = None
