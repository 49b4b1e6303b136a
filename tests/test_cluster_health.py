"""The head's judgement of a worker's health, without Ray: a worker slow to answer while it starts is
warned about, not lost; one quiet past its grace is lost; a lost node gets a new worker at once the
first time and later after a growing wait."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from pipeline import parse_config
from pipeline.cluster.head import HEALTH, ClusterHead, NodeHandle, retry_after
from pipeline.topics import Topics


class Published:
    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.topics = Topics("framegrid")

    def publish(self, topic: str, payload: Any, **_: Any) -> None:
        self.messages.append((topic, payload))


class Worker:
    """A worker's handle as Ray gives it: `ping.options(concurrency_group=...).remote()`; it answers
    after `delay` seconds (forever: never)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.groups: list[str | None] = []

    @property
    def ping(self) -> Any:
        worker = self

        class Method:
            def options(self, concurrency_group: str | None = None) -> Any:
                worker.groups.append(concurrency_group)
                return self

            async def remote(self) -> dict[str, Any]:
                await asyncio.sleep(worker.delay)
                return {"throughput": {}, "streams": {}, "sessions": {}, "talk_capacity": 1, "pid": 1}

        return Method()


def head(tmp_path: Path) -> ClusterHead:
    config = parse_config({"mqtt": {"url": "mqtt://127.0.0.1:1"},
                           "cluster": {"backend": "ray", "dead_after_s": 0.2, "start_grace_s": 2.0}}, tmp_path)
    h = ClusterHead(config)
    h.publisher = Published()  # type: ignore[assignment]
    return h


async def test_a_worker_slow_while_starting_is_not_lost_but_a_quiet_one_is(tmp_path: Path) -> None:
    h = head(tmp_path)
    now = time.monotonic()
    starting = NodeHandle("node-a", "a", Worker(10), state="up", up_at=now - 0.5, last_seen=now - 0.1)
    settled = NodeHandle("node-b", "b", Worker(10), state="up", up_at=now - 30, last_seen=now - 0.5)
    quiet = NodeHandle("node-c", "c", Worker(10), state="up", up_at=now - 1.0, last_seen=now - 0.7)
    answering = NodeHandle("node-d", "d", Worker(0.01), state="up", up_at=now - 30, last_seen=now - 1)
    h.nodes = {n.name: n for n in (starting, settled, quiet, answering)}
    await asyncio.gather(*(h._ping(n) for n in h.nodes.values()))
    assert starting.state == "up"  # within its start grace: warned, not lost
    assert settled.state == "lost"  # up long ago: no answer for dead_after_s is lost
    assert quiet.state == "lost"  # still starting, but silent for 3 x dead_after_s
    assert answering.state == "up"
    assert answering.last_seen > now
    assert {g for n in h.nodes.values() for g in n.actor.groups} == {HEALTH}  # pings go to their own thread
    assert ("framegrid/nodes/node-b/availability", b"offline") in h.publisher.messages  # type: ignore[attr-defined]


def test_a_lost_nodes_worker_is_replaced_at_once_then_after_growing_waits() -> None:
    node = NodeHandle("node-a", "a", None)
    waits = []
    for _ in range(5):
        node.losses += 1
        waits.append(retry_after(node))
    assert waits == [0.0, 5.0, 15.0, 30.0, 30.0]
