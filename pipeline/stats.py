"""Per-stream counters and latency percentiles, turned into periodic snapshots.

Counters only grow; rates are computed between two snapshots. Latency samples live in a
fixed-size ring, so memory is bounded whatever the uptime.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DROP_CAUSES = ("stale", "too_old", "error", "no_model")


def percentile(values: list[float] | deque[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.fromiter(values, float), q))


@dataclass
class StreamStats:
    stream: str
    decoded: int = 0  # frames the decoder produced (mirrors the latest slot)
    processed: int = 0
    published: int = 0
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_CAUSES, 0))
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=512))
    stage_ms: dict[str, deque[float]] = field(default_factory=dict)
    _last_t: float = field(default_factory=time.monotonic)
    _last_decoded: int = 0
    _last_processed: int = 0
    fps_in: float = 0.0
    fps_processed: float = 0.0

    def drop(self, cause: str, n: int = 1) -> None:
        self.drops[cause] = self.drops.get(cause, 0) + n

    def record(self, latency_ms: float, stages: dict[str, float]) -> None:
        self.processed += 1
        self.latency_ms.append(latency_ms)
        for k, v in stages.items():
            ring = self.stage_ms.get(k)
            if ring is None:
                ring = self.stage_ms[k] = deque(maxlen=256)
            ring.append(v)

    def restart_window(self) -> None:
        self._last_t = time.monotonic()
        self._last_decoded, self._last_processed = self.decoded, self.processed

    def tick(self, now: float | None = None) -> None:
        """Update fps figures from the counters since the previous tick."""
        now = time.monotonic() if now is None else now
        dt = now - self._last_t
        if dt < 1.0:  # several readers tick; a rate over a sliver of time is noise
            return
        self.fps_in = (self.decoded - self._last_decoded) / dt
        self.fps_processed = (self.processed - self._last_processed) / dt
        self._last_t, self._last_decoded, self._last_processed = now, self.decoded, self.processed

    def snapshot(self) -> dict[str, Any]:
        lat = self.latency_ms
        return {
            "decoded": self.decoded,
            "processed": self.processed,
            "fps_in": round(self.fps_in, 2),
            "fps_processed": round(self.fps_processed, 2),
            "drops": dict(self.drops),
            "latency_ms": {
                "p50": _r(percentile(lat, 50)),
                "p95": _r(percentile(lat, 95)),
                "max": _r(max(lat) if lat else None),
            },
            "stage_ms_p50": {k: _r(percentile(v, 50)) for k, v in self.stage_ms.items()},
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
