"""The detector protocol and the values it returns.

A backend is `load() / warmup() / infer(images) -> list[Detections] / close()`, chosen by the
model's `type` key. `infer` takes a batch of BGR uint8 images (any sizes) and returns, per
image, boxes in that image's own pixel coordinates. Backends are called from one executor
worker thread at a time; they may block and must release the GIL while they compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


class DetectorError(Exception):
    """Base of the detectors package's errors."""


class WeightsNotFoundError(DetectorError):
    """The weights file named in the config does not exist."""


class ModelLoadError(DetectorError):
    """The weights exist but could not be loaded."""


class InferenceError(DetectorError):
    """A model call failed; the batch is lost, the backend may still work."""


@dataclass(frozen=True, slots=True)
class Detections:
    """Detections for one image: N boxes (x1, y1, x2, y2) in source pixels, scores, classes."""

    boxes: np.ndarray  # (N, 4) float32
    confidences: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int32
    labels: tuple[str, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.boxes.shape != (n, 4) or self.confidences.shape != (n,) or self.class_ids.shape != (n,):
            raise ValueError(
                f"inconsistent detections: boxes {self.boxes.shape}, confidences "
                f"{self.confidences.shape}, class_ids {self.class_ids.shape}, {n} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), ())

    def scaled(self, sx: float, sy: float) -> Detections:
        """The same detections with boxes scaled by (sx, sy): image pixels -> source pixels."""
        if sx == 1.0 and sy == 1.0:
            return self
        boxes = self.boxes * np.array([sx, sy, sx, sy], np.float32)
        return Detections(boxes, self.confidences, self.class_ids, self.labels, self.timings_ms)

    def to_json(self, decimals: int = 1) -> list[dict[str, object]]:
        return [
            {
                "label": label,
                "class_id": int(c),
                "confidence": round(float(s), 4),
                "box": [round(float(v), decimals) for v in b],
            }
            for label, c, s, b in zip(self.labels, self.class_ids, self.confidences, self.boxes, strict=True)
        ]


@runtime_checkable
class Detector(Protocol):
    """What an executor needs from a model backend."""

    name: str
    class_names: tuple[str, ...]

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def infer(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None
              ) -> list[Detections]:
        """Detections per image, boxes in source pixels: `sizes[i]` is the (w, h) of the picture
        image i was scaled from (None: the images are the source pictures)."""
        ...

    def close(self) -> None: ...


def to_source_pixels(dets: list[Detections], images: Sequence[np.ndarray],
                     sizes: Sequence[tuple[int, int]] | None) -> list[Detections]:
    """Boxes in image pixels -> in the pixels of the pictures the images were scaled from."""
    if sizes is None:
        return dets
    return [d.scaled(w / im.shape[1], h / im.shape[0]) for d, im, (w, h) in zip(dets, images, sizes, strict=True)]
