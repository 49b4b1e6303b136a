"""Which inference runtime runs a model, and building its detector.

`auto` resolves per device: on CUDA the torch path (per-slot CUDA streams, on-device letterbox,
FP16); on the CPU the fastest runtime that is installed, in the order measured by
`tools/bench_streams.py` on x86 CPUs (OpenVINO, then ONNX Runtime, then torch). Resolution
happens once, before anything is loaded, so a process never ends up with two runtimes competing
for the same cores. A model file that is already exported narrows the choice to the runtimes that
read it (see `detectors.modelfile`): an ONNX file runs on OpenVINO or ONNX Runtime, an IR on
OpenVINO, a TensorRT engine on TensorRT (CUDA only).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .base import Detector
from .modelfile import RUNTIMES, runtime_refusal

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
CPU_PREFERENCE = ("openvino", "onnxruntime", "torch")
_MODULES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(_MODULES[runtime]) is not None


def resolve_backend(backend: str, device: str, kind: str = "pt") -> str:
    """The concrete runtime for `backend` on `device` ("cpu", "cuda:N") for a model file of `kind`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if (refusal := runtime_refusal(backend, kind)) is not None:
        raise ValueError(refusal)
    if "tensorrt" in (backend, *RUNTIMES[kind][:1]) and not device.startswith("cuda"):
        raise ValueError("a TensorRT engine runs only on an NVIDIA GPU (device cuda[:N]); on this device use the "
                         ".pt, .onnx or OpenVINO IR of the same model")
    if backend != "auto":
        if not installed(backend):
            extra = "tensorrt" if backend == "tensorrt" else "cpu"
            raise ValueError(f"backend {backend} is not installed (pip install 'framegrid[{extra}]')")
        return backend
    if device.startswith("cuda"):
        cuda_order = {"pt": "torch", "yaml": "torch", "onnx": "onnxruntime", "openvino": "openvino",
                      "engine": "tensorrt"}
        return cuda_order[kind]
    for runtime in CPU_PREFERENCE:
        if runtime in RUNTIMES[kind] and installed(runtime):
            return runtime
    needed = " or ".join(r for r in CPU_PREFERENCE if r in RUNTIMES[kind])
    raise ValueError(f"no inference runtime installed that runs this model: install {needed}")


def build_detector(runtime: str, name: str, weights: str | Path, *, imgsz: int, confidence: float, iou: float,
                   device: str, threads: int | None, half: bool = False, max_batch: int = 1,
                   **extra: Any) -> Detector:
    """A detector for a resolved runtime (see `resolve_backend`)."""
    if runtime == "onnxruntime":
        from .onnx import OnnxYoloDetector

        return OnnxYoloDetector(name, weights, imgsz=imgsz, confidence=confidence, iou=iou, threads=threads,
                                device=device, **extra)
    if runtime == "openvino":
        from .openvino import OpenVinoYoloDetector

        return OpenVinoYoloDetector(name, weights, imgsz=imgsz, confidence=confidence, iou=iou, threads=threads,
                                    device=device, max_batch=max_batch, **extra)
    if runtime == "tensorrt":
        from .tensorrt import TensorRtYoloDetector

        return TensorRtYoloDetector(name, weights, imgsz=imgsz, confidence=confidence, iou=iou, device=device,
                                    **extra)
    if runtime == "torch":
        from .yolo import YoloDetector

        return YoloDetector(name, weights, imgsz=imgsz, confidence=confidence, iou=iou, device=device,
                            half=half and device.startswith("cuda"), torch_threads=threads, **extra)
    raise ValueError(f"unknown runtime {runtime!r}")
