"""YOLOv11 on OpenVINO: the exported IR compiled for the CPU with an explicit thread budget.

The compiled model takes the letterboxed batch as it is, BGR uint8 NHWC: OpenVINO's pre-processing
(built into the compiled graph) converts to float, reorders to RGB NCHW and scales to [0, 1], in
its own vectorised kernels instead of a numpy pass per frame, and the host buffer is a quarter
of the float one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .onnx import ExportedYoloDetector, parse_names

log = logging.getLogger(__name__)


class SharedExclusive:
    """A readers-writer lock: any number of shared holders, or one exclusive holder (writers first)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting_writers:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting_writers -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# Model surgery and compilation (clone, reshape, compile_model) never overlap an inference in this
# process: with OpenVINO 2026.4 on 2 cores, background compiles beside other slots' inference hung
# every thread involved (a full test run under load, at start-up: two slots stuck copying their input
# into the dynamic-shape request while two compiles of a new static shape sat in clone() and
# reshape(); a CI run failed the same way before that). Inferences still run in
# parallel with each other; a compile (a new input shape, rare: static shapes are cached) holds
# them back for its duration.
OV_GATE = SharedExclusive()


class OpenVinoYoloDetector(ExportedYoloDetector):
    """A YOLOv11 detection model compiled by OpenVINO (`_openvino_model` folder from ultralytics)."""

    runtime = "openvino"
    export_format = "openvino"
    input_layout = "nhwc-u8"
    max_compiled = 32  # static-shape compilations kept (batch sizes x frame shapes)
    background_compile = True  # False: compile a new shape in the calling thread (tests, benchmarks of one shape)
    _model: Any = None

    def _open(self, path: Path) -> tuple[str, ...]:
        import openvino as ov
        import yaml

        xml = next(path.glob("*.xml"), None) if path.is_dir() else path
        if xml is None or not xml.is_file():
            raise FileNotFoundError(f"no OpenVINO .xml model in {path}")
        self._core = ov.Core()
        # inference precision: "auto" is OpenVINO's own choice for the device (bf16 on CPUs with BF16
        # units, e.g. AMX/AVX512-BF16: measured 2.3x the f32 throughput of yolo11n here, same objects
        # as torch in the parity test); "f32" keeps full precision
        hint = self.inference_precision
        if hint == "auto":
            hint = "f16" if self.precision == "fp16" else None
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
        if hint is not None:
            config["INFERENCE_PRECISION_HINT"] = hint
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        device = "GPU" if self.device.startswith("gpu") else "CPU"
        self._config, self._ov_device = config, device
        with OV_GATE.exclusive():
            self._model = with_u8_input(self._core.read_model(xml))
        self._requests: dict[tuple[int, ...], Any] = {}
        self._compiling: set[tuple[int, ...]] = set()
        self._compile_threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # the dynamic-shape model serves any shape at once (and fails at load, not at the first frame)
        with OV_GATE.exclusive():
            compiled = self._core.compile_model(self._model, device, config)
        self._dynamic = compiled.create_infer_request()
        self.effective_precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        meta_file = xml.parent / "metadata.yaml"
        meta = yaml.safe_load(meta_file.read_text()) if meta_file.is_file() else {}
        self.stride = int(meta.get("stride", 32))
        log.info("model %s: OpenVINO %s on %s (%s threads, %s)", self.name, xml.parent.name, device,
                 self.threads or "default", self.effective_precision)
        return parse_names(meta.get("names", {}))

    def __init__(self, *args: Any, max_batch: int = 1, inference_precision: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if inference_precision not in ("auto", "f32", "bf16", "f16"):
            raise ValueError(f"unknown inference precision {inference_precision!r} (auto, f32, bf16, f16)")
        self.max_batch = max_batch
        self.inference_precision = inference_precision

    def warmup(self) -> None:
        """Compile the static shapes of 16:9 frames (the common camera) for every batch size up front.

        Otherwise each first-seen batch size compiles later, while running, and memory keeps
        growing for minutes after start; other shapes still compile on demand, in the background.
        """
        from .letterbox import geometry

        g = geometry(16, 9, self.imgsz, self.stride, rect=True)
        for b in range(1, self.max_batch + 1):
            shape = (b, g.out_h, g.out_w, 3)
            with self._lock:
                known = shape in self._requests or shape in self._compiling
                if not known:
                    self._compiling.add(shape)
            if not known:
                self._compile(shape)
        # warm up on such a frame: it runs a compiled static shape (a square one would start a
        # background compile right at start-up)
        self.infer([np.zeros((self.imgsz * 9 // 16, self.imgsz, 3), np.uint8)])

    def _compile(self, shape: tuple[int, ...]) -> Any:
        with OV_GATE.exclusive():
            model = self._model.clone()
            model.reshape(list(shape))
            request = self._core.compile_model(model, self._ov_device, self._config).create_infer_request()
        with self._lock:
            if len(self._requests) >= self.max_compiled:
                self._requests.pop(next(iter(self._requests)))
            self._requests[shape] = request
            self._compiling.discard(shape)
        log.info("model %s: compiled static shape %s (%d kept)", self.name, list(shape), len(self._requests))
        return request

    def _request_for(self, shape: tuple[int, ...]) -> Any:
        """The request compiled for this exact shape (static shapes measured ~20% faster than dynamic).

        A shape seen for the first time runs on the dynamic-shape model while its static version
        compiles on a background thread: a new batch size never stalls the slot for a compile.
        """
        with self._lock:
            request = self._requests.get(shape)
            if request is not None:
                return request
            if self.background_compile:
                if shape not in self._compiling:
                    self._compiling.add(shape)
                    thread = threading.Thread(target=self._compile_quietly, args=(shape,), daemon=True,
                                              name=f"ov-compile{list(shape)}")
                    self._compile_threads = [t for t in self._compile_threads if t.is_alive()] + [thread]
                    thread.start()
                return self._dynamic
        return self._compile(shape)

    def _compile_quietly(self, shape: tuple[int, ...]) -> None:
        try:
            self._compile(shape)
        except Exception as exc:  # the dynamic model keeps serving this shape
            log.warning("model %s: static compile for %s failed: %s", self.name, shape, exc)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        request = self._request_for(tuple(batch.shape))  # (N, H, W, 3) uint8
        with OV_GATE.shared():
            request.infer({0: batch})
            return np.array(request.get_output_tensor(0).data, copy=True)

    def close(self) -> None:
        # a compile still running when the interpreter exits aborts the process (std::terminate)
        for thread in getattr(self, "_compile_threads", []):
            thread.join(30)
        super().close()
        self._requests = {}
        self._dynamic = None
        self._model = None


def with_u8_input(model: Any) -> Any:
    """The exported model (RGB float NCHW in [0, 1]) behind a BGR uint8 NHWC input."""
    import openvino as ov
    from openvino.preprocess import ColorFormat, PrePostProcessor

    ppp = PrePostProcessor(model)
    inp = ppp.input(0)
    inp.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
    inp.model().set_layout(ov.Layout("NCHW"))
    inp.preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB).scale(255.0)
    return ppp.build()
