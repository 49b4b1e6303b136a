"""A cluster node's worker: framegrid's own `Pipeline` for the streams the head placed on this node.

The head makes one long-lived Ray actor of this class per node (pinned to it, named after it, in
the cluster's namespace, detached: it outlives a head that crashes). Everything heavy stays here:
sources, decode, executor slots, tracking, events and MQTT publishing of its streams, and the talk
sessions placed on it (their audio input and A/V sinks, and its lipsync slots). What crosses
the network is control (add or remove a stream, a ping) and a short description back; frames never
leave the node. This module does not import Ray: the head wraps the class with `ray.remote`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.api.views import LatestResults
from pipeline.config import ApiConfig, Config, StreamConfig, TalkConfig
from pipeline.errors import RequestError
from pipeline.payloads import ClusterStatsPayload, StatsPayload

if TYPE_CHECKING:  # imported when a worker starts: the head imports this module too, and needs neither
    from pipeline.api.target import LocalTarget
    from pipeline.app import Pipeline

log = logging.getLogger("framegrid.cluster")


def worker_config(config: Config) -> Config:
    """The head's config as a node worker runs it: no streams or talk sessions until placed, no HTTP API,
    one process."""
    return config.model_copy(update={"streams": {}, "talk": {}, "api": ApiConfig(enabled=False),
                                     "cluster": config.cluster.model_copy(update={"backend": "local"})})


async def answered(call: Coroutine[Any, Any, Any]) -> tuple[str, Any]:
    """A request's outcome as data the head turns back into the same answer: ("ok", result) or
    (the refusal's kind, its message); a refusal is an answer, not a failure of the node."""
    try:
        return "ok", await call
    except RequestError as exc:
        return type(exc).__name__, str(exc)


MEDIA_RELAYED = ("event_clip", "recordings", "recording")  # of its `media`
# the ControlTarget calls a head relays to a node
RELAYED = ("webrtc_offer", "webrtc_leave", "say", "interrupt", "talk_events", "device_moves", *MEDIA_RELAYED)


class NodeDescription(TypedDict):
    """What a worker tells the head when it starts and at every ping."""

    node: str
    pid: int
    started_at: float
    throughput: dict[str, float]  # frames/s its slots serve, by model
    model_errors: dict[str, str]
    streams: dict[str, dict[str, str]]  # name -> model, state
    sessions: dict[str, str]  # name -> state
    talk_capacity: int
    segments: int


class NodeWorker:
    """One node's framegrid. Async methods: they run on the actor's event loop, as the pipeline does."""

    def __init__(self, config: Config, node: str, config_path: Path | None = None, cpus: float | None = None) -> None:
        self.config = worker_config(config)
        self.node = node
        self.cpus = cpus  # the CPUs its Ray node declares (`ray start --num-cpus`): the cores its slots use
        self.config_path = config_path
        self.pipeline: Pipeline | None = None  # made by start()
        self.latest = LatestResults()  # the newest result per stream (figures and snapshots for the head's API)
        self.target: LocalTarget | None = None  # the node's answers to the head's API, over its pipeline
        self.started_at = time.time()
        self._talk_capacity: int | None = None
        self.segments = 0  # offline talk-job segments rendered here

    async def start(self) -> NodeDescription:
        """Start the pipeline and load every model (idempotent: a restarted head calls it again and
        learns what runs here). -> `describe()`."""
        if self.pipeline is None:
            from pipeline.app import Pipeline
            from pipeline.logs import setup_logging

            setup_logging(self.config.log.level, self.config.secrets())
            pipeline = Pipeline(self.config, config_path=self.config_path, node=self.node,
                                cpu_cores=int(self.cpus) if self.cpus and self.cpus >= 1 else None)
            self.latest = LatestResults()
            pipeline.results.add_sink(self.latest)
            await pipeline.__aenter__()
            self.pipeline = pipeline
            failed = await pipeline.models.load_missing()
            for model, why in failed.items():
                log.error("node %s: model %s did not start: %s", self.node, model, why)
            log.info("node %s: worker ready (%s)", self.node, ", ".join(
                f"{m} {fps:.0f} frames/s" for m, fps in pipeline.models.throughput().items()) or "no model")
        return self.describe()

    @property
    def live(self) -> Pipeline:
        """The node's pipeline (RuntimeError before `start()` or after `stop()`)."""
        if self.pipeline is None:
            raise RuntimeError(f"node {self.node}: the worker is not running")
        return self.pipeline

    def describe(self) -> NodeDescription:
        p = self.live
        return {
            "node": self.node,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "throughput": p.models.throughput(),
            "model_errors": p.models.errors(),
            "streams": {name: {"model": r.model, "state": r.state.value} for name, r in p.streams.items()},
            "sessions": {name: str(t.state) for name, t in p.talk.sessions.items()},
            "talk_capacity": self.talk_capacity,
            "segments": self.segments,
        }

    @property
    def talk_capacity(self) -> int:
        """Live talk sessions this node takes: one per lipsync slot it plans (at least one, on a CPU)."""
        if self._talk_capacity is None:
            from pipeline.talk.lipsync import plan_lipsync

            lcfg = self.config.lipsync
            plans = plan_lipsync(self.live.facts(), lcfg.slot_memory_gb, self.config.devices.usable_fraction,
                                 lcfg.slots)
            self._talk_capacity = max(1, sum(p.slots for p in plans))
        return self._talk_capacity

    async def ping(self) -> NodeDescription:
        """Answered on the `health` concurrency group's own thread and loop (the head asks there), so a
        pipeline loop busy starting streams or compiling cannot make this node look dead; a description
        raced by the pipeline's own changes (a stream added meanwhile) is read again."""
        for attempt in range(3):
            try:
                return self.describe()
            except RuntimeError:  # "dictionary changed size during iteration" (or not running)
                if attempt == 2 or self.pipeline is None:
                    raise
                await asyncio.sleep(0.01)
        raise AssertionError("unreachable")

    async def stream_info(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The state and figures of those of `names` running here (the API's StreamInfo fields)."""
        target = self._target()
        return {n: {**target.stream_figures(n), "node": self.node} for n in names if n in self.live.streams}

    def _target(self) -> LocalTarget:
        from pipeline.api.target import LocalTarget

        if self.target is None or self.target.pipeline is not self.live:
            self.target = LocalTarget(self.live, self.latest)
        return self.target

    async def devices(self) -> list[dict[str, Any]]:
        """This node's devices and slots (the API's DeviceOut fields)."""
        return [{**d.model_dump(), "node": self.node} for d in await self._target().devices()]

    async def stats(self) -> StatsPayload | ClusterStatsPayload:
        """This node's stats payload (as on its `<prefix>/nodes/<node>/stats` topic)."""
        return await self._target().stats()

    async def events(self, stream: str | None, label: str | None, since: float | None,
                     limit: int) -> list[dict[str, Any]]:
        """Events from this node's store, newest first (the API's EventInfo fields)."""
        return [e.model_dump() for e in await self._target().media.events(stream, label, since, limit)]

    async def event_snapshot(self, event_id: str, crop: bool) -> bytes | None:
        return await self._target().media.event_snapshot(event_id, crop)

    async def snapshot(self, name: str, boxes: bool, main: bool = False) -> tuple[int, bytes] | None:
        """(seq, JPEG) of a stream's newest processed frame (`main`: its main stream's newest keyframe):
        one picture on request, not a feed."""
        if name not in self.live.streams:
            return None
        return await self._target().snapshot(name, boxes, main)

    async def relayed(self, call: str, *args: Any) -> tuple[str, Any]:
        """A control-plane request the head relays to the node concerned (WebRTC signalling of a session
        here, a drain of a device here), answered by this node's `LocalTarget` -> `answered(...)`;
        pydantic answers go back as dicts."""
        if call not in RELAYED:
            return "Invalid", f"not a relayed request: {call}"

        async def ask() -> Any:
            target = self._target()
            got = await getattr(target.media if call in MEDIA_RELAYED else target, call)(*args)
            if isinstance(got, Path):  # a file here: its bytes go to the head (another machine, maybe)
                return await asyncio.to_thread(got.read_bytes)
            return [m.model_dump() if hasattr(m, "model_dump") else m for m in got] if isinstance(got, list) else got

        return await answered(ask())

    async def add_stream(self, name: str, cfg: StreamConfig) -> None:
        await self.live.running.add_stream(name, cfg)

    async def remove_stream(self, name: str) -> None:
        if name in self.live.streams:
            await self.live.running.remove_stream(name)
        self.latest.forget(name)

    async def start_session(self, name: str, cfg: TalkConfig) -> None:
        await self.live.talk.start(name, cfg)

    async def stop_session(self, name: str) -> None:
        if name in self.live.talk.sessions:
            await self.live.talk.stop(name)

    async def render_segment(self, key: str, jobs: list[Any], slot: int) -> list[Any]:
        """One segment of an offline talk job (`pipeline.cluster.segments`): its frames' faces from this
        node's lipsync slot `slot`, batched with the slot's other work."""
        import asyncio

        pool, _ = await self.live.talk.ensure_lipsync()
        faces: list[Any] = await asyncio.wrap_future(pool.submit(key, jobs, slot=slot))
        self.segments += 1
        return faces

    async def release_segments(self, key: str) -> None:
        if self.pipeline is not None and self.pipeline.talk.lipsync is not None:
            self.pipeline.talk.lipsync.release(key)

    async def stop(self) -> None:
        """Stop the pipeline (its streams' states are cleared, its availability goes offline)."""
        if self.pipeline is not None:
            pipeline, self.pipeline = self.pipeline, None
            await pipeline.__aexit__(None, None, None)
