"""Which inference runtime runs a model, and building its detector.

`auto` resolves per device: on CUDA the torch path (per-slot CUDA streams, on-device letterbox,
FP16); on the CPU the fastest runtime that is installed, in the order measured by
`tools/bench_streams.py` on x86 CPUs (OpenVINO, then ONNX Runtime, then torch). Resolution
happens once, before anything is loaded, so a process never ends up with two runtimes competing
for the same cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .base import Detector

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
CPU_PREFERENCE = ("openvino", "onnxruntime", "torch")
_MODULES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(_MODULES[runtime]) is not None


def resolve_backend(backend: str, device: str) -> str:
    """The concrete runtime for `backend` on `device` ("cpu", "cuda:N")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend != "auto":
        if not installed(backend):
            raise ValueError(f"backend {backend} is not installed (pip install 'framegrid[cpu]')")
        return backend
    if device.startswith("cuda"):
        return "torch"
    for runtime in CPU_PREFERENCE:
        if installed(runtime):
            return runtime
    raise ValueError("no inference runtime installed: install torch, onnxruntime or openvino")


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
    if runtime == "torch":
        from .yolo import YoloDetector

        return YoloDetector(name, weights, imgsz=imgsz, confidence=confidence, iou=iou, device=device,
                            half=half and device.startswith("cuda"), torch_threads=threads, **extra)
    raise ValueError(f"unknown runtime {runtime!r}")
