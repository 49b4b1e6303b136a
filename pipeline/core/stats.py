"""Per-stream counters and latency percentiles, turned into periodic snapshots.

Counters only grow; rates are computed between two snapshots. Decoded and stale counts are the
mailbox's own (not copied). Latency samples live in fixed-size rings, so memory is bounded
whatever the uptime.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pipeline.payloads import StreamCounts
from streams import Mailbox

DROP_CAUSES = ("stale", "too_old", "error")  # stale: overwritten in the mailbox; the others: dropped here


def percentile(values: list[float] | deque[float], q: float) -> float | None:
    """numpy's default (linear) percentile, in plain Python: for the few hundred samples of a ring it
    costs a fraction of numpy's call overhead, and a stats payload takes dozens of them per stream."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo))


@dataclass
class StreamStats:
    mailbox: Mailbox
    processed: int = 0
    dispatched: int = 0  # frames taken for a model call
    drops: dict[str, int] = field(default_factory=lambda: {"too_old": 0, "error": 0})
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=512))
    stage_ms: dict[str, deque[float]] = field(default_factory=dict)
    _last_t: float | None = None
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

    def restart_window(self, now: float) -> None:
        """Rates count from here (a stream starts decoding), not from model loading."""
        self._last_t = now
        self._last_decoded, self._last_processed = self.mailbox.received, self.processed

    def tick(self, now: float) -> None:
        """Update fps figures from the counters since the previous tick."""
        if self._last_t is None:
            self.restart_window(now)
            return
        dt = now - self._last_t
        if dt < 1.0:  # several readers tick; a rate over a sliver of time is noise
            return
        decoded = self.mailbox.received
        self.fps_in = (decoded - self._last_decoded) / dt
        self.fps_processed = (self.processed - self._last_processed) / dt
        self._last_t, self._last_decoded, self._last_processed = now, decoded, self.processed

    def snapshot(self) -> StreamCounts:
        lat = self.latency_ms
        return {
            "decoded": self.mailbox.received,
            "dispatched": self.dispatched,
            "processed": self.processed,
            "fps_in": round(self.fps_in, 2),
            "fps_processed": round(self.fps_processed, 2),
            "drops": {"stale": self.mailbox.dropped_stale, **self.drops},
            "latency_ms": {
                "p50": _r(percentile(lat, 50)),
                "p95": _r(percentile(lat, 95)),
                "max": _r(max(lat) if lat else None),
            },
            "stage_ms_p50": {k: _r(percentile(v, 50)) for k, v in self.stage_ms.items()},
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
