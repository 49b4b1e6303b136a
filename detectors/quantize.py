"""INT8 post-training quantization of a detector's OpenVINO graph (NNCF), for CPUs.

A CPU with VNNI (AVX512-VNNI, AVX-VNNI) runs 8-bit integer convolutions several times faster than
float ones; one with AMX runs float ones in bf16 about as fast, and there INT8 measured slower
(docs/performance.md). NNCF measures each activation's range on calibration images and inserts
quantize/dequantize pairs; every `Sigmoid` and the head's box decoding (the ops directly under the
head's module and its distribution focal loss, `dfl`) stay in float, so the class scores and the
boxes keep their precision, as in ultralytics' own OpenVINO INT8 export. The head's convolutions
are quantized: keeping them float too was tried (agreement with float at 640, F1 at IoU 0.7
0.958-0.982 instead of 0.941-0.982, within the run-to-run spread) and left out for their cost.

Calibration images should look like the cameras the model will watch (a few hundred frames saved
from them): ranges measured on other pictures clip what these show. Each is letterboxed exactly as
at inference (`detectors.letterbox`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MIN_IMAGES = 16  # fewer calibrate the ranges on too little to trust
MAX_IMAGES = 300  # NNCF's own default subset
RECIPE = "mixed/head-float/1"  # in the export cache's key: a change here quantizes anew


class CalibrationError(ValueError):
    """The calibration folder cannot calibrate a model (missing, too few images, unreadable)."""


def nncf_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("nncf")
    except metadata.PackageNotFoundError:
        return "none"


def calibration_images(folder: Path) -> list[Path]:
    """The folder's images (sorted, at most `MAX_IMAGES`, evenly spread), or a `CalibrationError`."""
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder not found: {folder} (a folder of {MIN_IMAGES}+ .jpg/.png "
                               "frames from the cameras this model watches)")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(images) < MIN_IMAGES:
        raise CalibrationError(f"calibration folder {folder} holds {len(images)} image(s) (.jpg/.png); INT8 "
                               f"calibration needs at least {MIN_IMAGES}, a few hundred frames from the cameras "
                               "are best")
    if len(images) > MAX_IMAGES:
        step = len(images) / MAX_IMAGES
        images = [images[int(i * step)] for i in range(MAX_IMAGES)]
    return images


def calibration_digest(folder: Path) -> str:
    """What an INT8 export depends on in the folder: the chosen images' names and contents."""
    h = hashlib.sha256()
    for p in calibration_images(folder):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def _inputs(images: list[Path], imgsz: int, stride: int) -> Iterator[np.ndarray]:
    """Each image letterboxed as at inference (rectangular), as the exported graph takes it: RGB
    float NCHW in [0, 1]."""
    import cv2

    from .letterbox import geometry

    for path in images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise CalibrationError(f"calibration image {path} cannot be read")
        g = geometry(image.shape[1], image.shape[0], imgsz, stride, rect=True)
        canvas = np.full((g.out_h, g.out_w, 3), 114, np.uint8)
        canvas[g.top:g.top + g.new_h, g.left:g.left + g.new_w] = cv2.resize(
            image, (g.new_w, g.new_h), interpolation=cv2.INTER_LINEAR)
        yield np.ascontiguousarray(canvas[..., ::-1].transpose(2, 0, 1))[None].astype(np.float32) / 255.0


def float_ops(model: Any) -> list[str]:
    """The ops that stay float: every Sigmoid, and the ops directly under the head's module (the
    scope of the last Sigmoid, the class scores) or its `dfl` (box decoding)."""
    ops = model.get_ordered_ops()
    sigmoids = [op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"]
    if not sigmoids:
        return []
    head = sigmoids[-1].split("/", 1)[0]
    return [op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"
            or op.get_friendly_name().startswith((f"{head}/", f"{head}.dfl"))]


def quantize(source: Path, out_xml: Path, calibration: Path, imgsz: int, stride: int = 32) -> None:
    """Quantize the float graph `source` (an IR .xml or an .onnx) to `out_xml` (+ its .bin)."""
    import nncf
    import openvino as ov

    images = calibration_images(calibration)
    model = ov.Core().read_model(source)
    dataset = nncf.Dataset(list(_inputs(images, imgsz, stride)))
    quantized = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(images),
                              ignored_scope=nncf.IgnoredScope(names=float_ops(model), validate=False))
    ov.save_model(quantized, str(out_xml))
