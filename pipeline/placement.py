"""Placement of streams on executor slots: admission, evacuation and minimal rebalancing.

Pure logic, no I/O and no clock, so the running pipeline and `tools/simulate_cluster.py` drive
the same code. A stream's cost is the share of one slot's time it needs: `fps x service time per
frame` (seconds of work per second). A slot is full at `capacity` (1.0 = busy all the time; a
little less keeps headroom for jitter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SlotLoad:
    name: str
    healthy: bool = True
    capacity: float = 0.9
    streams: dict[str, float] = field(default_factory=dict)  # stream -> cost

    @property
    def load(self) -> float:
        return sum(self.streams.values())

    @property
    def headroom(self) -> float:
        return self.capacity - self.load

    @property
    def utilisation(self) -> float:
        return self.load / self.capacity if self.capacity > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Move:
    stream: str
    source: str
    target: str
    cost: float


class PlacementError(Exception):
    """A stream fits on no healthy slot (admission control)."""


class Placer:
    """Decides where streams run. Holds the slot table; callers apply the moves it returns."""

    def __init__(self, band: float = 0.10) -> None:
        self.band = band  # rebalance until max/mean utilisation <= 1 + band
        self.slots: dict[str, SlotLoad] = {}

    # -- slots ---------------------------------------------------------------------------------
    def add_slot(self, name: str, capacity: float = 0.9) -> None:
        self.slots[name] = SlotLoad(name, True, capacity)

    def healthy(self) -> list[SlotLoad]:
        return [s for s in self.slots.values() if s.healthy]

    def where(self, stream: str) -> str | None:
        return next((s.name for s in self.slots.values() if stream in s.streams), None)

    # -- decisions -----------------------------------------------------------------------------
    def place(self, stream: str, cost: float, candidates: list[str] | None = None, force: bool = False) -> str:
        """Put a stream on the healthy slot with the most headroom; PlacementError if none fits.

        `force` places it on the best slot even past capacity (no admission control: the
        stream is thinned by the keep-latest rule instead of refused)."""
        pool = [s for s in self.healthy() if candidates is None or s.name in candidates]
        if not pool:
            raise PlacementError(f"stream {stream}: no healthy executor slot")
        best = max(pool, key=lambda s: (s.headroom, s.name))
        if best.headroom < cost and not force:
            raise PlacementError(f"stream {stream}: needs {cost:.3f} of a slot, the most any slot has free is "
                                 f"{max(0.0, best.headroom):.3f}")
        best.streams[stream] = cost
        return best.name

    def remove(self, stream: str) -> None:
        for s in self.slots.values():
            s.streams.pop(stream, None)

    def update_cost(self, stream: str, cost: float) -> None:
        for s in self.slots.values():
            if stream in s.streams:
                s.streams[stream] = cost

    def evacuate(self, slot: str) -> tuple[list[Move], list[str]]:
        """Mark a slot unhealthy and move all its streams (largest first) to healthy slots.

        Returns the moves and the streams that fit nowhere: those are unplaced, and the caller
        reports them refused rather than overloading a healthy slot.
        """
        dead = self.slots[slot]
        dead.healthy = False
        moves, refused = [], []
        for stream, cost in sorted(dead.streams.items(), key=lambda kv: -kv[1]):
            pool = self.healthy()
            target = max(pool, key=lambda s: (s.headroom, s.name)) if pool else None
            if target is None or target.headroom < cost:
                refused.append(stream)
                continue
            target.streams[stream] = cost
            moves.append(Move(stream, slot, target.name, cost))
        dead.streams = {}
        return moves, refused

    def imbalance(self) -> float:
        """max / mean utilisation over healthy slots (1.0 = perfectly even)."""
        utils = [s.utilisation for s in self.healthy()]
        mean = sum(utils) / len(utils) if utils else 0.0
        return max(utils) / mean if mean > 0 else 1.0

    def min_moves_needed(self) -> int:
        """A lower bound on the moves any rebalancer needs: each over-band slot must shed its excess,
        and one move sheds at most its largest stream."""
        pool = self.healthy()
        if not pool:
            return 0
        total = sum(s.load for s in pool)
        cap = sum(s.capacity for s in pool)
        need = 0
        for s in pool:
            ceiling = s.capacity * (total / cap) * (1 + self.band)
            excess = s.load - ceiling
            if excess > 1e-12 and s.streams:
                largest = sorted(s.streams.values(), reverse=True)
                shed = 0.0
                for c in largest:
                    shed += c
                    need += 1
                    if shed >= excess:
                        break
        return need

    def rebalance(self, max_moves: int | None = None) -> list[Move]:
        """Greedy: move the stream that best evens the most and least loaded slots, until every
        slot is within the band or no move helps. Few moves by construction (largest useful first)."""
        moves: list[Move] = []
        limit = max_moves if max_moves is not None else 10 * sum(len(s.streams) for s in self.slots.values())
        while len(moves) < limit:
            pool = self.healthy()
            if len(pool) < 2 or self.imbalance() <= 1 + self.band:
                break
            hi = max(pool, key=lambda s: s.utilisation)
            lo = min(pool, key=lambda s: s.utilisation)
            # moving cost c changes utilisations to (L_hi - c)/C_hi and (L_lo + c)/C_lo;
            # the ideal c equalises them
            ideal = (hi.load * lo.capacity - lo.load * hi.capacity) / (hi.capacity + lo.capacity)
            fits = [(st, c) for st, c in hi.streams.items() if c <= lo.headroom + 1e-12]
            if not fits:
                break
            stream, cost = min(fits, key=lambda kv: abs(kv[1] - ideal))
            new_hi, new_lo = (hi.load - cost) / hi.capacity, (lo.load + cost) / lo.capacity
            if max(new_hi, new_lo) >= hi.utilisation - 1e-12:
                break  # no improvement possible with a single move
            del hi.streams[stream]
            lo.streams[stream] = cost
            moves.append(Move(stream, hi.name, lo.name, cost))
        return moves
