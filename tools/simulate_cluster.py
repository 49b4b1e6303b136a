#!/usr/bin/env python3
"""Cluster-scale placement simulation driving framegrid's real placement code (`pipeline.core.placement`)
and slot planner (`pipeline.core.devices.plan_slots`) with simulated GPUs, in simulated time.

Per-slot batch latency follows t(b) = a + b*c (per GPU type, figures below are assumptions, not
measurements), so a frame served in batches of B costs a/B + c seconds of slot time; a stream's
cost is fps * that. Scenarios: 8 GPUs x 200 streams, 64 GPUs x 2000 streams, mixed GPU sizes, one
GPU dies, a GPU is added, a burst of 500 new streams.

Nodes (`--nodes`, the cluster head's two levels, `pipeline.cluster.head`): the head's `Placer` has
one slot per node (capacity: the node's slots' sum, as a worker reports its throughput) and each
node's worker places its streams on its own GPUs' slots with its own `Placer`. Scenario: 16 nodes x
8 GPUs x 4000 streams, then a node fails, a node joins, a node is drained. Reported: imbalance
max/mean over nodes and over all slots, moves against the minimum needed, the planner's CPU time to
re-place a failed node's streams, and the head's control-plane traffic (pings of every node each
`ping_s`, two calls per moved stream; the ping answer grows with the node's streams).

    .venv/bin/python -m tools.simulate_cluster [--json out.json] [--seed 0] [--nodes]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.devices import GB, DeviceInfo, plan_slots
from pipeline.core.placement import PlacementError, Placer, SlotState

BATCH = 8
TICK_S = 0.5  # supervisor tick: a dead slot's streams lose at most this much video


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_gb: float
    a_ms: float  # fixed cost per batch
    c_ms: float  # cost per frame

    def frame_cost_s(self) -> float:
        return (self.a_ms / BATCH + self.c_ms) / 1000


# assumed YOLOv11n-at-640 batch latencies, scaled by rough relative GPU throughput
RTX4090 = GpuType("RTX 4090", 24, 3.0, 0.9)
A100 = GpuType("A100 80GB", 80, 3.0, 0.8)
L4 = GpuType("L4", 24, 4.0, 1.8)
T4 = GpuType("T4", 16, 5.0, 2.6)
REFERENCE = RTX4090
FPS_CHOICES = (5, 10, 15, 25, 30)
SLOT_GB = 8.0


class Cluster:
    def __init__(self, gpus: list[GpuType], band: float = 0.10) -> None:
        self.placer = Placer(band)
        self.slot_type: dict[str, GpuType] = {}
        self.gpu_slots: dict[int, list[str]] = {}
        self.fps: dict[str, float] = {}
        for g in gpus:
            self.add_gpu(g)

    def add_gpu(self, g: GpuType) -> int:
        idx = len(self.gpu_slots)
        dev = DeviceInfo(f"cuda:{idx}", "cuda", g.name, int(g.memory_gb * GB), int(g.memory_gb * 0.97 * GB))
        plan = plan_slots([dev], int(SLOT_GB * GB), usable_fraction=0.9)[0]
        names = []
        for s in range(plan.slots):
            name = f"gpu{idx}.{s}"
            # costs are in seconds of a reference slot (a whole RTX 4090); a slot on a GPU shared by
            # k slots gets 1/k of that GPU's throughput, so its capacity in reference units shrinks
            speed = REFERENCE.frame_cost_s() / (g.frame_cost_s() * plan.slots)
            self.placer.add_slot(name, capacity=0.9 * speed)
            self.slot_type[name] = g
            names.append(name)
        self.gpu_slots[idx] = names
        return idx

    def cost(self, stream: str) -> float:
        return self.fps[stream] * REFERENCE.frame_cost_s()

    def add_streams(self, n: int, rng: random.Random) -> tuple[int, int]:
        placed = refused = 0
        start = len(self.fps)
        for i in range(start, start + n):
            name = f"cam{i}"
            self.fps[name] = rng.choice(FPS_CHOICES)
            try:
                self.placer.place(name, self.cost(name))
                placed += 1
            except PlacementError:
                refused += 1
        return placed, refused

    def frames_dropped_steady(self) -> float:
        """Frames/s lost because a slot is over 100% busy (0 when admission control holds)."""
        lost = 0.0
        for s in self.placer.healthy():
            over = s.load / (s.capacity / 0.9)  # share of the slot's real throughput in use
            if over > 1.0:
                lost += sum(self.fps[x] for x in s.members) * (1 - 1.0 / over)
        return lost


def scenario(name: str, cluster: Cluster, events: list[tuple[str, object]], rng: random.Random) -> dict[str, object]:
    row: dict[str, object] = {"scenario": name}
    for kind, arg in events:
        if kind == "streams":
            placed, refused = cluster.add_streams(int(arg), rng)  # type: ignore[call-overload]
            row["placed"] = row.get("placed", 0) + placed  # type: ignore[operator]
            row["refused"] = row.get("refused", 0) + refused  # type: ignore[operator]
            moves = cluster.placer.rebalance()
            row["moves_after_placement"] = len(moves)
        elif kind == "kill":
            victim = int(arg)  # type: ignore[call-overload]
            t0 = time.perf_counter()
            moved, refused_list = [], []
            streams_lost_fps = 0.0
            for slot in cluster.gpu_slots[victim]:
                streams_lost_fps += sum(cluster.fps[x] for x in cluster.placer.slots[slot].members)
                m, r = cluster.placer.evacuate(slot)
                moved += m
                refused_list += r
            row["replace_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            row["replaced_within_tick"] = True
            row["moved_on_failure"] = len(moved)
            row["refused_on_failure"] = len(refused_list)
            row["frames_dropped_on_failure"] = round(streams_lost_fps * TICK_S)
        elif kind == "add_gpu":
            cluster.add_gpu(arg)  # type: ignore[arg-type]
            need = cluster.placer.min_moves_needed()
            moves = cluster.placer.rebalance()
            row["min_moves_needed"] = need
            row["moves"] = len(moves)
    row["slots"] = len(cluster.placer.healthy())
    row["streams"] = sum(len(s.members) for s in cluster.placer.healthy())
    row["imbalance_max_mean"] = round(cluster.placer.imbalance(), 3)
    row["mean_utilisation"] = round(
        sum(s.utilisation for s in cluster.placer.healthy()) / max(1, len(cluster.placer.healthy())), 3)
    row["frames_dropped_per_s_steady"] = round(cluster.frames_dropped_steady(), 1)
    return row


class NodeCluster:
    """Nodes of GPUs, placed on in two levels as the cluster head and its node workers do."""

    def __init__(self, nodes: int, gpus: list[GpuType], band: float = 0.10) -> None:
        self.head = Placer(band)  # one slot per node
        self.local: dict[str, Cluster] = {}  # node -> its GPUs' slots (the worker's own placer)
        self.fps: dict[str, float] = {}
        self.gpus = gpus
        for _ in range(nodes):
            self.add_node()

    def add_node(self) -> str:
        name = f"node{len(self.local)}"
        local = Cluster(self.gpus, self.head.band)
        self.local[name] = local
        self.head.add_slot(name, capacity=sum(s.capacity for s in local.placer.slots.values()))
        return name

    def cost(self, stream: str) -> float:
        return self.fps[stream] * REFERENCE.frame_cost_s()

    def start_on(self, node: str, stream: str) -> None:
        local = self.local[node]
        local.fps[stream] = self.fps[stream]
        local.placer.place(stream, self.cost(stream), force=True)

    def stop_on(self, node: str, stream: str) -> None:
        self.local[node].placer.remove(stream)
        self.local[node].fps.pop(stream, None)

    def add_streams(self, n: int, rng: random.Random) -> int:
        start = len(self.fps)
        for i in range(start, start + n):
            name = f"cam{i}"
            self.fps[name] = rng.choice(FPS_CHOICES)
            self.start_on(self.head.place(name, self.cost(name), force=True), name)
        return n

    def apply(self, moves: list[Any]) -> None:
        for m in moves:
            if m.source in self.local and self.head.slots[m.source].state is not SlotState.FAILED:
                self.stop_on(m.source, m.stream)
            self.start_on(m.target, m.stream)

    def slot_imbalance(self) -> float:
        utils = [s.utilisation for n, c in self.local.items() if self.head.slots[n].healthy
                 for s in c.placer.healthy()]
        mean = sum(utils) / len(utils)
        return max(utils) / mean if mean > 0 else 1.0

    def ping_bytes(self, node: str) -> int:
        """The size of a worker's ping answer (`NodeWorker.describe`) for this node's streams."""
        streams = {s: {"model": "yolo", "state": "streaming"} for s in self.head.slots[node].members}
        return len(json.dumps({"node": node, "started_at": 1.7e9, "throughput": {"yolo": 1234.5},
                               "model_errors": {}, "streams": streams}))


def node_scenario(nodes: int, gpus_per_node: int, streams: int, seed: int, ping_s: float = 1.0,
                  max_moves: int = 64) -> list[dict[str, object]]:
    rng = random.Random(seed)
    c = NodeCluster(nodes, [RTX4090] * gpus_per_node)
    c.add_streams(streams, rng)
    c.apply(c.head.rebalance(max_moves=max_moves, fill=True))
    label = f"{nodes} nodes x {gpus_per_node} GPUs x {streams} streams"
    rows = []

    def row(event: str, **extra: object) -> None:
        alive = [n for n, r in c.head.slots.items() if r.healthy]
        per_stream = max(c.ping_bytes(n) / max(1, len(c.head.slots[n].members)) for n in alive)
        rows.append(
            {
                "scenario": f"{label}: {event}",
                "nodes": len(alive),
                "floor_nodes": round(c.head.floor_ratio(), 3),
                "slots": sum(len(c.local[n].placer.slots) for n in alive),
                "streams": sum(len(c.head.slots[n].members) for n in alive),
                "imbalance_nodes": round(c.head.imbalance(), 3),
                "imbalance_slots": round(c.slot_imbalance(), 3),
                "head_msgs_per_s": round(2 * len(alive) / ping_s, 1),
                "head_bytes_per_s": round(sum(c.ping_bytes(n) for n in alive) / ping_s),
                "ping_bytes_per_stream": round(per_stream, 1),
                **extra,
            }
        )

    row("placed")
    # a node fails: the head evacuates it (the planner's CPU time), the workers place what they get
    victim = "node3"
    lost = len(c.head.slots[victim].members)
    t0 = time.process_time()
    moves, stuck = c.head.evacuate(victim, SlotState.FAILED, force=True)
    c.apply(moves)
    replace_ms = (time.process_time() - t0) * 1000
    row(
        "node fails",
        moved_on_failure=len(moves),
        stranded=len(stuck),
        lost_streams=lost,
        replace_cpu_ms=round(replace_ms, 2),
        moves=len(moves),
        min_moves_needed=lost,
        failover_msgs=len(moves),
    )
    # a node joins: rebalance within the band, few moves
    c.add_node()
    need = c.head.min_moves_needed(fill=True)
    moves = []
    while True:  # passes of max_moves, as the head's rebalance loop runs them
        batch = c.head.rebalance(max_moves=max_moves, fill=True)
        c.apply(batch)
        moves += batch
        if len(batch) < max_moves:
            break
    row("a node joins", moves=len(moves), min_moves_needed=need, move_msgs=2 * len(moves))
    # a node is drained for maintenance
    drained = "node5"
    n_drained = len(c.head.slots[drained].members)
    moves, stuck = c.head.evacuate(drained, SlotState.DRAINED)
    c.apply(moves)
    row(
        "a node is drained", moves=len(moves), min_moves_needed=n_drained, stranded=len(stuck), move_msgs=2 * len(moves)
    )
    return rows


def run_nodes(seed: int = 0) -> list[dict[str, object]]:
    return node_scenario(16, 8, 4000, seed)


def run(seed: int = 0, scale: float = 1.0) -> list[dict[str, object]]:
    def n(x: int) -> int:
        return max(1, int(x * scale))

    rows = []
    rows.append(scenario("8 GPUs x 200 streams", Cluster([RTX4090] * 8), [("streams", n(200))], random.Random(seed)))
    rows.append(
        scenario("64 GPUs x 2000 streams", Cluster([RTX4090] * 64), [("streams", n(2000))], random.Random(seed))
    )
    rows.append(
        scenario(
            "mixed GPU sizes (A100/4090/L4/T4 x2)",
            Cluster([A100, RTX4090, L4, T4] * 2),
            [("streams", n(300))],
            random.Random(seed),
        )
    )
    rows.append(
        scenario(
            "8 GPUs x 200, one GPU dies",
            Cluster([RTX4090] * 8),
            [("streams", n(200)), ("kill", 3)],
            random.Random(seed),
        )
    )
    rows.append(
        scenario(
            "8 GPUs x 200, a GPU is added",
            Cluster([RTX4090] * 8),
            [("streams", n(200)), ("add_gpu", RTX4090)],
            random.Random(seed),
        )
    )
    rows.append(
        scenario(
            "8 GPUs x 200, burst of 500 new",
            Cluster([RTX4090] * 8),
            [("streams", n(200)), ("streams", n(500))],
            random.Random(seed),
        )
    )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--nodes", action="store_true", help="the cluster head's node-level scenario")
    args = ap.parse_args()
    if args.nodes:
        rows = run_nodes(args.seed)
        cols = [
            "scenario",
            "nodes",
            "slots",
            "streams",
            "imbalance_nodes",
            "floor_nodes",
            "imbalance_slots",
            "moves",
            "min_moves_needed",
            "stranded",
            "replace_cpu_ms",
            "head_msgs_per_s",
            "head_bytes_per_s",
            "ping_bytes_per_stream",
        ]
    else:
        rows = run(args.seed)
        cols = [
            "scenario",
            "slots",
            "streams",
            "refused",
            "imbalance_max_mean",
            "mean_utilisation",
            "moves",
            "min_moves_needed",
            "moved_on_failure",
            "replace_ms",
            "frames_dropped_on_failure",
            "frames_dropped_per_s_steady",
        ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "-")) for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
