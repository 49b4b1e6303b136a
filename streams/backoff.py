"""The one backoff helper: full-jitter exponential backoff with a cap.

Used by every reconnect in framegrid (RTSP sources, the MQTT publisher, executor restarts), so
that a fleet of cameras behind one flaky switch does not reconnect in lock-step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delay before retry n is uniform in [0, min(cap, base * factor**n)] ("full jitter")."""

    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    attempts: int = 0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or self.factor < 1:
            raise ValueError(f"bad backoff parameters: base={self.base} cap={self.cap} factor={self.factor}")

    def ceiling(self) -> float:
        return min(self.cap, self.base * self.factor ** min(self.attempts, 64))

    def next_delay(self) -> float:
        """Delay for the next retry; counts the attempt."""
        delay = self.rng.uniform(0, self.ceiling())
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Call after a success: the next failure starts from `base` again."""
        self.attempts = 0
