"""The detector protocol and the values it returns.

A backend is `load() / warmup() / infer(pictures) -> list[Detections] / close()`, chosen by the
model's `type` key. `infer` takes a batch of pictures (any sizes): BGR uint8 arrays, or decoded
frames that convert themselves to BGR only when asked (`Picture`), so a frame that is never
dispatched is never converted, and one that is gets converted once, on the slot's thread. It
returns, per picture, boxes in that picture's own pixel coordinates. Backends are called from one
slot worker thread at a time; they may block and must release the GIL while they compute.
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

    def take(self, keep: Sequence[int] | np.ndarray) -> Detections:
        """The detections at indices `keep`, in order (the same object when it keeps them all)."""
        if len(keep) == len(self.labels):
            return self
        idx = np.asarray(keep, dtype=np.intp)
        return Detections(self.boxes[idx], self.confidences[idx], self.class_ids[idx],
                          tuple(self.labels[i] for i in idx), self.timings_ms)

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
class Picture(Protocol):
    """A decoded picture that converts itself to BGR uint8 HxWx3 when asked (at most once)."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def bgr(self) -> np.ndarray: ...


Image = np.ndarray | Picture


def picture_size(image: Image) -> tuple[int, int]:
    """(h, w) of a picture or an array, without converting anything."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    return int(image.height), int(image.width)


def bgr_of(image: Image) -> np.ndarray:
    """The BGR uint8 pixels of a picture or an array (a picture converts itself here, once)."""
    return image if isinstance(image, np.ndarray) else image.bgr()


@runtime_checkable
class Detector(Protocol):
    """What an executor needs from a model backend."""

    name: str
    class_names: tuple[str, ...]

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def infer(self, images: Sequence[Image]) -> list[Detections]:
        """Detections per picture, boxes in that picture's pixels."""
        ...

    def close(self) -> None: ...
