"""Letterbox geometry shared by every backend, with a numpy/OpenCV and a torch implementation.

The geometry mirrors ultralytics' `LetterBox` (scale to fit, centred padding of grey 114, and
in `rect` mode only the padding needed to reach a multiple of the stride), so every backend
feeds the network exactly what the model saw at validation, and boxes map back to source pixels
with the same gain and offsets. The torch version runs wherever its tensors live: on a CUDA
slot it resizes, pads, normalises and reorders on the device.

On the host, `InputBuffers` letterboxes a batch of pictures straight into the network's input
buffer (reused per batch shape): each picture is converted to BGR once (decoded frames convert
only here, on the slot's thread, and only when dispatched), resized with OpenCV's bilinear as
ultralytics does, and written into its place; only the padding strips are filled around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np

PAD_VALUE = 114
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Geometry:
    """How one source image maps into the network input."""

    src_w: int
    src_h: int
    new_w: int  # size of the resized image inside the padding
    new_h: int
    left: int
    top: int
    out_w: int  # network input size
    out_h: int
    gain: float

    def to_source(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (N, 4) xyxy in network pixels -> source pixels, clipped to the image.

        Each axis uses the gain its rounded side really got (as ultralytics' `scale_boxes` does),
        so an odd size such as 1000x562 maps back exactly, not with the one nominal gain.
        """
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = ((out[:, [0, 2]] - self.left) * (self.src_w / self.new_w)).clip(0, self.src_w)
        out[:, [1, 3]] = ((out[:, [1, 3]] - self.top) * (self.src_h / self.new_h)).clip(0, self.src_h)
        return out


def geometry(src_w: int, src_h: int, imgsz: int, stride: int = 32, rect: bool = False) -> Geometry:
    """Fit (src_w, src_h) into imgsz x imgsz; with `rect`, pad only to a multiple of `stride`."""
    gain = min(imgsz / src_h, imgsz / src_w)
    new_w, new_h = max(round(src_w * gain), 1), max(round(src_h * gain), 1)
    dw, dh = imgsz - new_w, imgsz - new_h
    if rect:
        dw, dh = dw % stride, dh % stride
    half_w, half_h = dw / 2, dh / 2
    left, top = round(half_w - 0.1), round(half_h - 0.1)
    right, bottom = round(half_w + 0.1), round(half_h + 0.1)
    return Geometry(src_w, src_h, new_w, new_h, left, top, new_w + left + right, new_h + top + bottom, gain)


def batch_groups(shapes: list[tuple[int, int]], imgsz: int, stride: int = 32,
                 rect: bool = True) -> list[tuple[list[int], list[Geometry]]]:
    """(indices, geometries) per network input size, for a batch of (h, w) shapes.

    Each picture is letterboxed as ultralytics does it alone (with `rect`, its own minimal
    rectangle), so its answer is the model's own; pictures that land on the same input size
    (1920x1080 and 1280x720 both give 320x192) share one model call, others get their own.
    """
    groups: dict[tuple[int, int], tuple[list[int], list[Geometry]]] = {}
    for i, (h, w) in enumerate(shapes):
        g = geometry(w, h, imgsz, stride, rect=rect)
        idx, geos = groups.setdefault((g.out_w, g.out_h), ([], []))
        idx.append(i)
        geos.append(g)
    return list(groups.values())


def infer_in_groups(images: Sequence[Any], shapes: list[tuple[int, int]], imgsz: int, stride: int, rect: bool,
                    run: Callable[[list[Any], list[Geometry]], list[T]]) -> list[T]:
    """`run(images, geometries)` once per input size (see `batch_groups`), answers in input order."""
    groups = batch_groups(shapes, imgsz, stride, rect)
    if len(groups) == 1:
        return run(list(images), groups[0][1])
    out: list[Any] = [None] * len(images)
    for idx, geos in groups:
        for i, answer in zip(idx, run([images[i] for i in idx], geos), strict=True):
            out[i] = answer
    return out


def resized(image: np.ndarray, geo: Geometry, dst: np.ndarray | None = None) -> np.ndarray:
    """The picture scaled to its place inside the padding (OpenCV bilinear, as ultralytics)."""
    if (image.shape[1], image.shape[0]) == (geo.new_w, geo.new_h):
        if dst is None:
            return image
        dst[...] = image
        return dst
    return cv2.resize(image, (geo.new_w, geo.new_h), dst=dst, interpolation=cv2.INTER_LINEAR)


def letterbox(image: np.ndarray, geo: Geometry) -> np.ndarray:
    """BGR uint8 HxWx3 -> the padded network image (BGR uint8), OpenCV on the host."""
    out = np.full((geo.out_h, geo.out_w, 3), PAD_VALUE, np.uint8)
    resized(image, geo, out[geo.top:geo.top + geo.new_h, geo.left:geo.left + geo.new_w])
    return out


Layout = str  # "nchw-f32": RGB float32 in [0, 1] (ONNX, torch); "nhwc-u8": BGR uint8 (OpenVINO converts)
SCALE = np.float32(1 / 255)


class InputBuffers:
    """The network input of a batch, letterboxed in place, in a buffer reused per batch shape.

    A 8x3x384x640 float batch is 23 MB: allocating it anew for every batch fragments the heap. A
    slot runs one batch at a time, so one buffer per shape is enough; at most `keep` shapes stay.
    """

    def __init__(self, layout: Layout = "nchw-f32", keep: int = 16) -> None:
        if layout not in ("nchw-f32", "nhwc-u8"):
            raise ValueError(f"unknown input layout {layout!r}")
        self.layout = layout
        self.keep = keep
        self._buffers: dict[tuple[int, ...], np.ndarray] = {}

    def _buffer(self, n: int, h: int, w: int) -> np.ndarray:
        shape = (n, 3, h, w) if self.layout == "nchw-f32" else (n, h, w, 3)
        buf = self._buffers.pop(shape, None)  # re-inserted: most recently used last
        if buf is None:
            buf = np.empty(shape, np.float32 if self.layout == "nchw-f32" else np.uint8)
            while len(self._buffers) >= self.keep:
                self._buffers.pop(next(iter(self._buffers)))
        self._buffers[shape] = buf
        return buf

    def fill(self, images: list[np.ndarray], geos: list[Geometry]) -> np.ndarray:
        """BGR pictures + their geometries (one output size) -> the batch, ready for the runtime."""
        out = self._buffer(len(images), geos[0].out_h, geos[0].out_w)
        for i, (im, g) in enumerate(zip(images, geos, strict=True)):
            y0, y1, x0, x1 = g.top, g.top + g.new_h, g.left, g.left + g.new_w
            if self.layout == "nhwc-u8":
                one = out[i]
                resized(im, g, one[y0:y1, x0:x1])
                pad: float = PAD_VALUE
            else:
                one = out[i].transpose(1, 2, 0)  # HxWxC view of the CHW planes
                np.multiply(resized(im, g)[..., ::-1], SCALE, out=one[y0:y1, x0:x1])
                pad = float(PAD_VALUE * SCALE)
            one[:y0], one[y1:], one[y0:y1, :x0], one[y0:y1, x1:] = pad, pad, pad, pad
        return out


def letterbox_torch(image: Any, geo: Geometry, dtype: Any) -> Any:
    """One HxWx3 BGR uint8 tensor (on any device) -> 3xHxW RGB `dtype` in [0, 1], letterboxed there.

    Bilinear with half-pixel centres and no antialiasing is what OpenCV's INTER_LINEAR does, so
    the result matches the host path to within rounding.
    """
    import torch
    import torch.nn.functional as F

    x = image.permute(2, 0, 1).flip(0).unsqueeze(0).float()  # 1x3xHxW RGB
    if (image.shape[1], image.shape[0]) != (geo.new_w, geo.new_h):
        x = F.interpolate(x, size=(geo.new_h, geo.new_w), mode="bilinear", align_corners=False, antialias=False)
    out = torch.full((3, geo.out_h, geo.out_w), float(PAD_VALUE), dtype=torch.float32, device=image.device)
    out[:, geo.top:geo.top + geo.new_h, geo.left:geo.left + geo.new_w] = x[0]
    return out.div_(255.0).to(dtype)
