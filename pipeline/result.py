"""The value that leaves the pipeline for one processed frame, and its MQTT payload."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from detectors import Detections

PAYLOAD_VERSION = 1


@dataclass(frozen=True, slots=True)
class Result:
    """Detections for one frame plus everything needed to judge their timeliness."""

    stream: str
    seq: int
    model: str
    frame_index: int
    pts: float | None
    captured_at: float  # unix s: decoder produced the frame
    inferred_at: float  # unix s: model returned
    width: int
    height: int
    detections: Detections
    timings_ms: dict[str, float] = field(default_factory=dict)

    def payload(self, published_at: float | None = None) -> dict[str, Any]:
        published_at = time.time() if published_at is None else published_at
        return {
            "v": PAYLOAD_VERSION,
            "stream": self.stream,
            "seq": self.seq,
            "model": self.model,
            "frame": self.frame_index,
            "pts": None if self.pts is None else round(self.pts, 4),
            "captured_at": round(self.captured_at, 6),
            "inferred_at": round(self.inferred_at, 6),
            "published_at": round(published_at, 6),
            "latency_ms": round((published_at - self.captured_at) * 1000, 2),
            "width": self.width,
            "height": self.height,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
            "detections": self.detections.to_json(),
        }
