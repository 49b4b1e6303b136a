"""Placement of streams and sessions on executor slots: admission, evacuation, minimal rebalancing.

Pure logic, no I/O and no clock, so the running pipeline and `tools/simulate_cluster.py` drive
the same code. A member (a detection stream or a talk session) costs the share of one slot's
time it needs: `fps x service time per frame` (seconds of work per second). A slot is full at
`capacity` (1.0 = busy all the time; a little less keeps headroom for jitter).

The `Placer` holds the only member-to-slot table and the only health record of each slot
(`SlotRecord.state`); everything else (the batchers, the devices and stats payloads) reads them.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum

from pipeline.config import PipelineConfig, default
from pipeline.errors import PlacementError

__all__ = ["Move", "PlacementError", "Placer", "SlotRecord", "SlotState"]


class SlotState(StrEnum):
    STARTING = "starting"  # loading its model
    HEALTHY = "healthy"  # serving its members
    RESTARTING = "restarting"  # a model call failed or hung; its members moved away; restarting with backoff
    FAILED = "failed"  # could not start, or its restart budget is spent
    DRAINED = "drained"  # taken out by an operator (device maintenance) until resumed


@dataclass
class SlotRecord:
    """Everything known about one executor slot's place in the pool (one record per slot)."""

    name: str
    state: SlotState = SlotState.HEALTHY
    capacity: float = 0.9
    members: dict[str, float] = field(default_factory=dict)  # stream or session -> cost
    restarts: list[float] = field(default_factory=list)  # monotonic times of recent restarts
    streak: int = 0  # restarts in the current run of faults (the restart backoff's exponent)
    up_since: float | None = None  # monotonic time the slot last started, while it is up
    last_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.state is SlotState.HEALTHY

    @property
    def load(self) -> float:
        return sum(self.members.values())

    @property
    def headroom(self) -> float:
        return self.capacity - self.load

    @property
    def utilisation(self) -> float:
        return self.load / self.capacity if self.capacity > 0 else math.inf


def _best(pool: list[SlotRecord], cost: float) -> SlotRecord:
    """Where a member of `cost` goes: of the slots it fits on (else of all), the one left least utilised
    by it — the measure `Placer.rebalance` evens out, so a placement is not undone by the next pass
    (most headroom, the old rule, put it on a big slot that rebalancing then emptied onto a small one)."""
    fits = [s for s in pool if s.headroom >= cost] or pool
    return min(fits, key=lambda s: ((s.load + cost) / s.capacity if s.capacity > 0 else math.inf, s.name))


@dataclass(frozen=True, slots=True)
class Move:
    stream: str
    source: str
    target: str
    cost: float


class Placer:
    """Decides where streams and sessions run. Holds the slot table; callers apply the moves it returns."""

    def __init__(self, band: float = default(PipelineConfig, "rebalance_band")) -> None:
        self.band = band  # rebalance until max/mean utilisation <= 1 + band
        self.slots: dict[str, SlotRecord] = {}

    # -- slots ---------------------------------------------------------------------------------
    def add_slot(self, name: str, capacity: float = 0.9, state: SlotState = SlotState.HEALTHY) -> SlotRecord:
        self.slots[name] = record = SlotRecord(name, state, capacity)
        return record

    def healthy(self) -> list[SlotRecord]:
        return [s for s in self.slots.values() if s.healthy]

    def where(self, member: str) -> str | None:
        return next((s.name for s in self.slots.values() if member in s.members), None)

    # -- decisions -----------------------------------------------------------------------------
    def place(self, stream: str, cost: float, candidates: list[str] | None = None, force: bool = False) -> str:
        """Put a stream on the healthy slot it leaves least utilised of those it fits on (`_best`);
        PlacementError if none fits.

        `force` places it on the best slot even past capacity (no admission control: the
        stream is thinned by the keep-latest rule instead of refused)."""
        pool = [s for s in self.healthy() if candidates is None or s.name in candidates]
        if not pool:
            raise PlacementError(f"stream {stream}: no healthy executor slot")
        best = _best(pool, cost)
        if best.headroom < cost and not force:
            raise PlacementError(f"stream {stream}: needs {cost:.3f} of a slot, the most any slot has free is "
                                 f"{max(0.0, max(s.headroom for s in pool)):.3f}")
        self.remove(stream)
        best.members[stream] = cost
        return best.name

    def assign(self, member: str, slot: str, cost: float) -> None:
        """Put a member on a given slot (pinned work, e.g. offline segments dealt to slot k)."""
        self.remove(member)
        self.slots[slot].members[member] = cost

    def remove(self, member: str) -> None:
        for s in self.slots.values():
            s.members.pop(member, None)

    def update_cost(self, member: str, cost: float) -> None:
        for s in self.slots.values():
            if member in s.members:
                s.members[member] = cost

    def evacuate(self, slot: str, state: SlotState = SlotState.RESTARTING,
                 force: bool = False) -> tuple[list[Move], list[str]]:
        """Take a slot out (`state`) and move its members (largest first) to healthy slots.

        Returns the moves and the members that fit nowhere (with `force`: only when no slot is
        healthy). Those stay on the slot they were on and wait for it to come back, rather than
        overloading a healthy slot.
        """
        dead = self.slots[slot]
        dead.state = state
        moves, stay = [], {}
        for member, cost in sorted(dead.members.items(), key=lambda kv: -kv[1]):
            pool = self.healthy()
            target = _best(pool, cost) if pool else None
            if target is None or (target.headroom < cost and not force):
                stay[member] = cost
                continue
            target.members[member] = cost
            moves.append(Move(member, slot, target.name, cost))
        dead.members = stay
        return moves, list(stay)

    def imbalance(self) -> float:
        """max / mean utilisation over healthy slots (1.0 = perfectly even)."""
        utils = [s.utilisation for s in self.healthy()]
        mean = sum(utils) / len(utils) if utils else 0.0
        return max(utils) / mean if mean > 0 else 1.0

    def floor_ratio(self) -> float:
        """min / mean utilisation over healthy slots (1.0 = perfectly even; 0 = one slot idle)."""
        utils = [s.utilisation for s in self.healthy()]
        mean = sum(utils) / len(utils) if utils else 0.0
        return min(utils) / mean if mean > 0 else 1.0

    def min_moves_needed(self, fill: bool = False) -> int:
        """A lower bound on the moves any rebalancer needs: each over-band slot must shed its excess,
        and one move sheds at most its largest stream (with `fill`, likewise each slot below the band
        must receive its deficit, one move bringing at most the largest stream anywhere)."""
        pool = self.healthy()
        if not pool:
            return 0
        total = sum(s.load for s in pool)
        cap = sum(s.capacity for s in pool)
        need = 0
        for s in pool:
            ceiling = s.capacity * (total / cap) * (1 + self.band)
            excess = s.load - ceiling
            if excess > 1e-12 and s.members:
                largest = sorted(s.members.values(), reverse=True)
                shed = 0.0
                for c in largest:
                    shed += c
                    need += 1
                    if shed >= excess:
                        break
        if not fill:
            return need
        biggest = max((c for s in pool for c in s.members.values()), default=0.0)
        fill_need = 0
        for s in pool:
            deficit = s.capacity * (total / cap) * (1 - self.band) - s.load
            if deficit > 1e-12 and biggest > 0:
                fill_need += math.ceil(deficit / biggest - 1e-9)
        return max(need, fill_need)

    def rebalance(self, max_moves: int | None = None, fill: bool = False,
                  keep: Collection[str] = ()) -> list[Move]:
        """Greedy: move the stream that best evens the most and least loaded slots, until every
        slot is within the band (below it too, with `fill`: a slot that joined empty takes its
        share) or no move helps. Few moves by construction (largest useful first). Members in `keep`
        stay where they are (e.g. moved a moment ago)."""
        moves: list[Move] = []
        limit = max_moves if max_moves is not None else 10 * sum(len(s.members) for s in self.slots.values())
        while len(moves) < limit:
            pool = self.healthy()
            if len(pool) < 2 or (self.imbalance() <= 1 + self.band and
                                 (not fill or self.floor_ratio() >= 1 - self.band)):
                break
            hi = max(pool, key=lambda s: s.utilisation)
            lo = min(pool, key=lambda s: s.utilisation)
            # moving cost c changes utilisations to (L_hi - c)/C_hi and (L_lo + c)/C_lo;
            # the ideal c equalises them
            ideal = (hi.load * lo.capacity - lo.load * hi.capacity) / (hi.capacity + lo.capacity)
            fits = [(st, c) for st, c in hi.members.items() if c <= lo.headroom + 1e-12 and st not in keep]
            if not fits:
                break
            stream, cost = min(fits, key=lambda kv: abs(kv[1] - ideal))
            new_hi, new_lo = (hi.load - cost) / hi.capacity, (lo.load + cost) / lo.capacity
            if max(new_hi, new_lo) >= hi.utilisation - 1e-12:
                break  # no improvement possible with a single move
            del hi.members[stream]
            lo.members[stream] = cost
            moves.append(Move(stream, hi.name, lo.name, cost))
        return moves
