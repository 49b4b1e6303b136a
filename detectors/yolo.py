"""YOLOv11 detection on ultralytics (torch).

Loads `.pt` weights from a local path (or builds an untrained model from a `.yaml`, useful for
tests of plumbing), runs batched inference and returns boxes in source-frame pixels. Never
downloads anything: ultralytics is put in offline mode before it is imported, and a missing
weights file is an error that says what to fetch and where to put it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import Detections, Image, InferenceError, ModelLoadError, WeightsNotFoundError, bgr_of, picture_size
from .defaults import CONFIDENCE, IMGSZ, IOU
from .letterbox import Geometry, InputBuffers, infer_in_groups, letterbox_torch
from .modelfile import ModelFileError
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
    """A YOLOv11 model on torch. One instance per executor slot; not shared between threads.

    Pre- and post-processing are framegrid's own, in plain torch on the model's device: on a CUDA
    slot each frame goes host -> pinned staging buffer -> device with a non-blocking copy, is
    letterboxed, normalised and reordered there, the network runs in FP16 where the GPU supports
    it, all on the slot's own `torch.cuda.Stream`, and the host waits once per batch. On the CPU the
    same code runs without streams or pinning, which is how CI checks it against ultralytics.
    """

    runtime = "torch"

    def __init__(
        self,
        name: str,
        weights: str | Path,
        imgsz: int = IMGSZ,
        confidence: float = CONFIDENCE,
        iou: float = IOU,
        device: str = "cpu",
        half: bool = False,
        max_detections: int = 300,
        classes: Sequence[int] | None = None,
        torch_threads: int | None = None,
        rect: bool = True,
        device_preprocess: bool | None = None,
        agnostic: bool = False,
        names: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.names = tuple(names)  # the config's class names (win over the file's)
        self.weights = Path(weights)
        self.imgsz = imgsz
        self.confidence = confidence
        self.iou = iou
        self.device = device
        self.half = half
        self.max_detections = max_detections
        self.classes = list(classes) if classes is not None else None
        self.torch_threads = torch_threads
        self.rect = rect
        self.agnostic = agnostic
        self._inputs = InputBuffers("nchw-f32")
        # letterbox on the device: always on CUDA; on the CPU only when asked (tests of that path)
        self.device_preprocess = bool(device_preprocess)
        self.class_names: tuple[str, ...] = ()
        self.stride = 32
        self.fp16 = False
        self._model: Any = None
        self._device: Any = None
        self._dtype: Any = None
        self._stream: Any = None  # this slot's CUDA stream
        self._pinned: dict[tuple[int, tuple[int, ...]], Any] = {}  # reusable page-locked staging buffers
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
            from ultralytics.nn.autobackend import AutoBackend

            if self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            source = str(self.weights) if self.weights.is_file() else self.weights.name
            yolo = YOLO(source)
            if yolo.task != "detect":
                raise ModelFileError(f"model {self.name}: {self.weights.name} is a {yolo.task} model; expected a "
                                     "YOLOv8/YOLO11 detection model")
            device = torch.device(self.device)
            self.fp16 = bool(self.half) and device.type == "cuda" and supports_fp16(device)
            model = AutoBackend(yolo.model, device=device, fp16=self.fp16, fuse=True, verbose=False)
            model.eval()
            self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        except WeightsNotFoundError:
            raise
        except ModelFileError as exc:
            raise ModelLoadError(str(exc)) from exc
        except Exception as exc:
            raise ModelLoadError(f"model {self.name}: cannot load {self.weights}: {exc}") from exc
        names = yolo.names
        self.class_names = tuple(names[i] for i in sorted(names)) if isinstance(names, dict) else tuple(names)
        if self.names:
            if len(self.names) != len(self.class_names):
                raise ModelLoadError(f"model {self.name}: {self.weights.name} has {len(self.class_names)} classes "
                                     f"but {len(self.names)} names were given")
            self.class_names = self.names
        self.stride = max(int(model.stride), 32) if hasattr(model, "stride") else 32
        self._device, self._dtype = device, torch.float16 if self.fp16 else torch.float32
        self._model = model
        log.info("model %s: loaded %s (%d classes) on %s%s", self.name, self.weights.name,
                 len(self.class_names), self.device, " fp16" if self.fp16 else "")

    def warmup(self) -> None:
        """One dummy batch so the first real frame does not pay for lazy initialisation."""
        self.infer([np.zeros((self.imgsz, self.imgsz, 3), np.uint8)])

    # -- the device-side path ----------------------------------------------------------------------
    def _to_device(self, index: int, image: np.ndarray) -> Any:
        import torch

        host = torch.from_numpy(np.ascontiguousarray(image))
        if self._stream is None:
            return host
        key = (index, tuple(host.shape))
        buf = self._pinned.get(key)
        if buf is None:
            if len(self._pinned) > 64:  # shapes changed: drop old buffers rather than grow
                self._pinned.clear()
            buf = self._pinned[key] = torch.empty(host.shape, dtype=torch.uint8, pin_memory=True)
        buf.copy_(host)  # safe to reuse: the previous batch was synchronised before we got here
        return buf.to(self._device, non_blocking=True)

    def preprocess(self, images: Sequence[Image], geos: list[Geometry]) -> Any:
        """Pictures of one network input size -> (N, 3, H, W) tensor on the model's device."""
        import torch

        pixels = [bgr_of(im) for im in images]
        if self._stream is None and not self.device_preprocess:
            # on the CPU OpenCV's resize beats torch's interpolate; the network input is the same
            return torch.from_numpy(self._inputs.fill(pixels, geos)).to(self._dtype)
        tensors = [letterbox_torch(self._to_device(i, im), g, self._dtype)
                   for i, (im, g) in enumerate(zip(pixels, geos, strict=True))]
        return torch.stack(tensors)

    def infer(self, images: Sequence[Image]) -> list[Detections]:
        if self._model is None:
            raise InferenceError(f"model {self.name}: infer() before load()")
        if not images:
            return []
        return infer_in_groups(images, [picture_size(im) for im in images], self.imgsz, self.stride, self.rect,
                               self._infer_group)

    def _infer_group(self, images: list[Image], geos: list[Geometry]) -> list[Detections]:
        """One model call for pictures that share a network input size."""
        import torch
        from ultralytics.utils import nms

        clock = _StageClock(self._stream)
        with self._lock, torch.inference_mode(), clock.stream_context():
            try:
                clock.mark()
                batch = self.preprocess(images, geos)
                clock.mark()
                preds = self._model(batch)
                clock.mark()
                kept = nms.non_max_suppression(
                    preds, self.confidence, self.iou, self.classes, self.agnostic, max_det=self.max_detections, nc=0,
                    end2end=getattr(self._model, "end2end", False),
                )
                host = [k.to("cpu", non_blocking=self._stream is not None) for k in kept]
                clock.mark()
                clock.synchronize()  # the only wait on the device, once per batch
            except Exception as exc:
                raise InferenceError(f"model {self.name}: inference failed: {exc}") from exc
        pre, inf, post = clock.elapsed_ms()
        t0 = time.perf_counter()
        out = []
        for k, geo in zip(host, geos, strict=True):
            k = k.float().numpy()
            cls = k[:, 5].astype(np.int32)
            labels = tuple(self.class_names[c] if 0 <= c < len(self.class_names) else str(c) for c in cls)
            out.append((geo.to_source(k[:, :4]), k[:, 4].astype(np.float32), cls, labels))
        post += (time.perf_counter() - t0) * 1000
        timings = {"preprocess": pre, "inference": inf, "postprocess": post, "batch_total": pre + inf + post}
        return [Detections(b, c, k, lab, dict(timings)) for b, c, k, lab in out]

    def close(self) -> None:
        self._model = None
        self._pinned.clear()


def supports_fp16(device: Any) -> bool:
    """FP16 arithmetic is native from compute capability 5.3 on (and fast with tensor cores from 7.0)."""
    import torch

    try:
        return torch.cuda.get_device_capability(device) >= (5, 3)
    except Exception:
        return False


class _StageClock:
    """Stage boundaries timed with CUDA events on the slot's stream (no extra syncs), else wall clock."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.marks: list[Any] = []

    def stream_context(self) -> Any:
        import contextlib

        if self.stream is None:
            return contextlib.nullcontext()
        import torch

        return torch.cuda.stream(self.stream)

    def mark(self) -> None:
        if self.stream is None:
            self.marks.append(time.perf_counter())
            return
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        self.marks.append(ev)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def elapsed_ms(self) -> tuple[float, ...]:
        m = self.marks
        if self.stream is None:
            return tuple((b - a) * 1000 for a, b in itertools.pairwise(m))
        return tuple(float(a.elapsed_time(b)) for a, b in itertools.pairwise(m))
