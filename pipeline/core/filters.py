"""A stream's own filters of its detections: labels, confidence (overall and per label), box area and
masks, applied to the results of the model copy the stream shares with others, before tracking and
publishing. Pure: no state but the masks resolved for the last frame size.
"""

from __future__ import annotations

import numpy as np

from detectors import Detections
from pipeline.config import StreamConfig

from .zones import Point, anchor_of, inside, resolve

# the stream keys that take effect at once when changed at run time (no reconnect)
FILTER_KEYS = ("classes", "confidence", "label_confidence", "min_area", "max_area", "masks")


class StreamFilter:
    def __init__(self, cfg: StreamConfig) -> None:
        self.classes = set(cfg.classes) if cfg.classes is not None else None
        self.confidence = cfg.confidence or 0.0
        self.label_confidence = dict(cfg.label_confidence)
        self.min_area = cfg.min_area or 0.0
        self.max_area = cfg.max_area or 1.0
        self.masks = cfg.masks
        self._resolved: tuple[tuple[int, int], list[tuple[str, list[Point]]]] | None = None

    @staticmethod
    def of(cfg: StreamConfig) -> StreamFilter | None:
        """The stream's filter, or None when it sets none (its detections pass as the model made them)."""
        if any(getattr(cfg, k) not in (None, {}) for k in FILTER_KEYS):
            return StreamFilter(cfg)
        return None

    def _masks(self, width: int, height: int) -> list[tuple[str, list[Point]]]:
        if self._resolved is None or self._resolved[0] != (width, height):
            self._resolved = ((width, height), [(m.anchor, resolve(m.polygon, width, height))
                                                for m in self.masks.values()])
        return self._resolved[1]

    def apply(self, det: Detections, width: int, height: int) -> Detections:
        n = len(det)
        if n == 0:
            return det
        keep = np.ones(n, dtype=bool)
        if self.classes is not None:
            keep &= np.fromiter((label in self.classes for label in det.labels), bool, n)
        floor = np.fromiter((self.label_confidence.get(label, self.confidence) for label in det.labels), np.float32, n)
        keep &= det.confidences >= floor
        if self.min_area > 0 or self.max_area < 1:
            b = det.boxes
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / float(max(1, width * height))
            keep &= (area >= self.min_area) & (area <= self.max_area)
        if self.masks:
            masks = self._masks(width, height)
            for i in np.flatnonzero(keep):
                box = det.boxes[i]
                if any(inside(anchor_of(box, anchor), polygon) for anchor, polygon in masks):
                    keep[i] = False
        return det.take(np.flatnonzero(keep))
