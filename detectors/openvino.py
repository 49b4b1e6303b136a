"""YOLOv11 on OpenVINO: the exported IR compiled for the CPU with an explicit thread budget.

The compiled model takes the letterboxed batch as it is, BGR uint8 NHWC: OpenVINO's pre-processing
(built into the compiled graph) converts to float, reorders to RGB NCHW and scales to [0, 1], in
its own vectorised kernels instead of a numpy pass per frame, and the host buffer is a quarter
of the float one.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .modelfile import GraphFacts, dims, flag
from .onnx import ExportedYoloDetector, parse_names

log = logging.getLogger(__name__)


_bridge_lock = threading.Lock()
_bridge_ready = False


def prime_numpy_bridge() -> None:
    """Make OpenVINO's first numpy array in this thread, before any other thread can.

    OpenVINO's Python module initialises its numpy bridge (pybind11's `npy_api`) on first use,
    inside a C++ static whose initialiser takes the GIL. Two slots loading at once could both get
    there first: one holds the static's guard waiting for the GIL, the other holds the GIL waiting
    for the guard, and the process hangs with every slot thread in `tensor.data`. Seen in the test
    suite (one start in ~20 under load; gdb showed exactly that pair). Going through here first,
    one thread at a time, initialises it once.
    """
    global _bridge_ready
    with _bridge_lock:  # waiting here releases the GIL
        if not _bridge_ready:
            import openvino as ov

            ov.Tensor(np.zeros(1, np.float32)).data  # noqa: B018 - the first use is the point
            _bridge_ready = True


class OpenVinoYoloDetector(ExportedYoloDetector):
    """A YOLOv11 detection model compiled by OpenVINO (`_openvino_model` folder from ultralytics)."""

    runtime = "openvino"
    export_format = "openvino"
    input_layout = "nhwc-u8"
    max_compiled = 32  # static-shape compilations kept (batch sizes x frame shapes)
    background_compile = True  # False: compile a new shape in the calling thread (tests, benchmarks of one shape)
    _model: Any = None

    def _open(self, path: Path) -> tuple[tuple[str, ...], GraphFacts]:
        import openvino as ov

        xml = next(path.glob("*.xml"), None) if path.is_dir() else path
        if xml is None or not xml.is_file():
            raise FileNotFoundError(f"no OpenVINO .xml model in {path}")
        prime_numpy_bridge()
        self._core = ov.Core()
        source = self._core.read_model(xml)  # an IR's .xml, or an ONNX file as it is
        meta = file_metadata(source, xml)
        facts = GraphFacts(dims(_shape(source.inputs[0])), dims(_shape(source.outputs[0])), len(source.outputs),
                           meta.get("task"), flag(meta.get("end2end")))
        if len(facts.input_shape) != 4 or facts.outputs != 1 or len(facts.output_shape) != 3:
            return parse_names(meta.get("names", {})), facts  # not a detector: refused by the caller
        # inference precision: "auto" is OpenVINO's own choice for the device (bf16 on CPUs with BF16
        # units, e.g. AMX/AVX512-BF16: measured 2.3x the f32 throughput of yolo11n here, same objects
        # as torch in the parity test); "f32" keeps full precision
        hint: str | None = self.inference_precision
        if hint == "auto":
            hint = "f16" if self.precision == "fp16" else None
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
        if hint is not None:
            config["INFERENCE_PRECISION_HINT"] = hint
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        device = "GPU" if self.device.startswith("gpu") else "CPU"
        self._config, self._ov_device = config, device
        self._model = with_u8_input(source)
        self._requests: dict[tuple[int, ...], Any] = {}
        self._compiling: set[tuple[int, ...]] = set()
        self._compile_threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # the dynamic-shape model serves any shape at once (and fails at load, not at the first frame)
        compiled = self._core.compile_model(self._model, device, config)
        self._dynamic = compiled.create_infer_request()
        self.effective_precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.stride = int(meta.get("stride", 32))
        log.info("model %s: OpenVINO %s on %s (%s threads, %s)", self.name, xml.name, device,
                 self.threads or "default", self.effective_precision)
        return parse_names(meta.get("names", {})), facts

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

        g = geometry(16, 9, self.imgsz, self.stride, rect=self.rect)
        for b in (self.fixed_batch,) if self.fixed_batch else range(1, self.max_batch + 1):
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


def _shape(port: Any) -> list[int]:
    """A port's shape, -1 where it is dynamic."""
    return [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]


def file_metadata(model: Any, xml: Path) -> dict[str, Any]:
    """ultralytics' metadata: `metadata.yaml` beside an IR, else what an ONNX file carries (read by OpenVINO
    into the model's `framework` run-time info)."""
    import yaml

    meta_file = xml.parent / "metadata.yaml"
    if xml.suffix == ".xml" and meta_file.is_file():
        return dict(yaml.safe_load(meta_file.read_text()) or {})
    if not model.has_rt_info(["framework"]):
        return {}
    framework = model.get_rt_info()["framework"]
    return {str(k): framework[k].astype(str) for k in framework}


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
