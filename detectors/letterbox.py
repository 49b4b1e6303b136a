"""Letterbox geometry shared by every backend, with a numpy/OpenCV and a torch implementation.

The geometry mirrors ultralytics' `LetterBox` (scale to fit, centred padding of grey 114, and
in `rect` mode only the padding needed to reach a multiple of the stride), so every backend
feeds the network exactly what the model saw at validation, and boxes map back to source pixels
with the same gain and offsets. The torch version runs wherever its tensors live: on a CUDA
slot it resizes, pads, normalises and reorders on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

PAD_VALUE = 114


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
        """Boxes (N, 4) xyxy in network pixels -> source pixels, clipped to the image."""
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = ((out[:, [0, 2]] - self.left) / self.gain).clip(0, self.src_w)
        out[:, [1, 3]] = ((out[:, [1, 3]] - self.top) / self.gain).clip(0, self.src_h)
        return out


def geometry(src_w: int, src_h: int, imgsz: int, stride: int = 32, rect: bool = False) -> Geometry:
    """Fit (src_w, src_h) into imgsz x imgsz; with `rect`, pad only to a multiple of `stride`."""
    gain = min(imgsz / src_h, imgsz / src_w)
    new_w, new_h = max(round(src_w * gain), 1), max(round(src_h * gain), 1)
    dw, dh = imgsz - new_w, imgsz - new_h
    if rect:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    left, top = round(dw - 0.1), round(dh - 0.1)
    right, bottom = round(dw + 0.1), round(dh + 0.1)
    return Geometry(src_w, src_h, new_w, new_h, left, top, new_w + left + right, new_h + top + bottom, gain)


def batch_geometry(shapes: list[tuple[int, int]], imgsz: int, stride: int = 32,
                   rect: bool = True) -> list[Geometry]:
    """Geometries for a batch of (h, w) shapes: rectangular inputs only when all shapes are equal."""
    same = len(set(shapes)) == 1
    return [geometry(w, h, imgsz, stride, rect=rect and same) for h, w in shapes]


def letterbox(image: np.ndarray, geo: Geometry) -> np.ndarray:
    """BGR uint8 HxWx3 -> the padded network image (BGR uint8), OpenCV on the host."""
    if (image.shape[1], image.shape[0]) != (geo.new_w, geo.new_h):
        image = cv2.resize(image, (geo.new_w, geo.new_h), interpolation=cv2.INTER_LINEAR)
    out = np.full((geo.out_h, geo.out_w, 3), PAD_VALUE, np.uint8)
    out[geo.top:geo.top + geo.new_h, geo.left:geo.left + geo.new_w] = image
    return out


def to_nchw_float(images: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """Padded BGR uint8 images (same size) -> RGB float32 NCHW in [0, 1].

    Written straight into `out` when it has the right shape (a slot reuses one buffer per batch
    shape: a 8x3x384x640 batch is 23 MB, and allocating it anew for every batch fragments the heap).
    """
    h, w = images[0].shape[:2]
    shape = (len(images), 3, h, w)
    if out is None or out.shape != shape or out.dtype != np.float32:
        out = np.empty(shape, np.float32)
    scale = np.float32(1 / 255)
    for i, im in enumerate(images):
        np.multiply(im[..., ::-1].transpose(2, 0, 1), scale, out=out[i])
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
