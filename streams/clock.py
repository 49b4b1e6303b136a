"""The one clock every stage reads: wall time for what is published, monotonic time for ages.

Passed from the pipeline to sources, batchers, slots and results, so a test can drive every
stage from one fake clock and no stage mixes clocks (a wall-clock step never ages a frame).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clock:
    wall: Callable[[], float] = time.time  # unix seconds: capture/inference/publish stamps
    mono: Callable[[], float] = time.monotonic  # seconds: frame ages, deadlines, rates

    def stamp(self) -> tuple[float, float]:
        """(wall, mono) of one moment: read between two monotonic reads and read again (at most
        twice more) if a thread switch came in between, so a latency computed on either clock agrees
        to within a millisecond."""
        for _ in range(3):
            before = self.mono()
            wall = self.wall()
            mono = self.mono()
            if mono - before < 0.001:
                break
        return wall, mono


SYSTEM_CLOCK = Clock()
