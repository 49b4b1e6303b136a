"""The cluster head: framegrid's supervisor placing streams on node workers of a Ray cluster.

One worker per Ray node that advertises `cluster.node_resource` (`pipeline.cluster.worker`). The
head keeps one `Placer` per model whose slots are the nodes (capacity: the frames per second the
node's slots serve, as the worker measured them; cost of a stream: its frames per second), so
placement, evacuation and rebalancing are the same code a single process uses for its slots; inside
a node, the worker's own pipeline places the stream on a device and slot.

Control only: the head sends add/remove calls and pings, the workers answer with a short
description (their streams and throughput). Each check (`ping_s`) the head

- starts a worker on every new node (and finds the existing one after a head restart: workers are
  named, detached actors in `cluster.namespace`),
- pings every worker; one that fails or stays silent `dead_after_s` is lost: it is killed (so it
  can publish nothing more), its node's availability is set offline, and its streams are placed on
  the other nodes,
- publishes the cluster's state (retained, `<prefix>/cluster`).

Every `rebalance_s` (and when a node joins) it moves at most `max_moves` streams to even the load
within `band`; a moved stream stops on its old node before it starts on the new one, so no frame
is published twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, StreamConfig, TalkConfig
from pipeline.core.placement import PlacementError, Placer, SlotState
from pipeline.errors import Unavailable
from pipeline.mqtt.homeassistant import HomeAssistant
from pipeline.mqtt.publisher import Publisher
from pipeline.payloads import ClusterPayload, MovingPayload
from pipeline.topics import PAYLOAD_VERSION
from streams import redact_text, url_password
from streams.handoff import wait_event

log = logging.getLogger("framegrid.cluster")

START_TIMEOUT_S = 300.0  # a worker loads its models before it is ready
# a node whose worker was lost gets a new one at once if Ray still lists it alive; a second loss in a row
# waits (its raylet may be dying), longer each time
RETRY_LOST_S = (0.0, 5.0, 15.0, 30.0)
HEALTH = "health"  # the workers' concurrency group for pings: its own thread, so a busy loop answers
DEFAULT_FPS = 25.0  # the cost of a stream without max_fps (a camera's usual rate)
TALK = "talk/"  # talk sessions' keys in the placement ("talk/<name>": names never hold a slash)


def retry_after(node: NodeHandle) -> float:
    """Seconds after a loss before a new worker is tried on a node Ray still lists alive."""
    return RETRY_LOST_S[min(max(node.losses - 1, 0), len(RETRY_LOST_S) - 1)]


def session_key(name: str) -> str:
    return TALK + name


def stream_cost(cfg: StreamConfig) -> float:
    return float(cfg.max_fps or DEFAULT_FPS)


@dataclass
class NodeHandle:
    """What the head knows of one node's worker."""

    name: str
    node_id: str
    actor: Any
    state: str = "starting"  # starting | up | drained | lost
    throughput: dict[str, float] = field(default_factory=dict)
    model_errors: dict[str, str] = field(default_factory=dict)  # models that could not start there, with why
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)  # as the worker last described them
    sessions: dict[str, str] = field(default_factory=dict)  # talk session -> its state, as last described
    talk_capacity: int = 0  # live talk sessions its lipsync slots serve
    pid: int | None = None  # the worker's process id on its node
    last_seen: float = 0.0
    lost_at: float | None = None  # monotonic time it was lost (a worker is tried there again later)
    error: str | None = None
    up_at: float = 0.0  # monotonic time it came up (late answers are forgiven for a while after)
    losses: int = 0  # workers lost on this node in a row (the wait before the next try grows)


class ClusterHead:
    """Places the config's streams (and those added at run time) on the cluster's node workers."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.settings = config.cluster
        self.config_path = config_path
        self.desired: dict[str, StreamConfig] = {n: s for n, s in config.streams.items() if s.enabled}
        self.secrets: list[str] = list(config.secrets())
        self.nodes: dict[str, NodeHandle] = {}
        self.placers: dict[str, Placer] = {model: Placer(self.settings.band) for model in config.models}
        self.sessions: dict[str, TalkConfig] = {n: t for n, t in config.talk.items() if t.enabled}
        self.talk = Placer(self.settings.band)  # talk sessions on nodes (cost 1, capacity: the node's lipsync slots)
        self.ready = asyncio.Event()
        self.keep_workers = False  # on exit: True leaves the workers running (a restarted head finds them)
        self.calls = 0  # control-plane calls made (pings, adds, removes, starts)
        self.started_at = time.monotonic()
        self._changed = asyncio.Event()
        self._joined = asyncio.Event()
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._rebalanced_at: dict[str, float] = {}  # stream -> monotonic time a rebalancing pass moved it
        self._tasks: set[asyncio.Task[Any]] = set()  # starts, moves and removals in flight
        self.publisher: Publisher
        self.discovery: HomeAssistant

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        import ray

        s = self.settings
        if not ray.is_initialized():
            await asyncio.to_thread(ray.init, address=s.address, namespace=s.namespace, logging_level=logging.WARNING,
                                    log_to_driver=True)
        self.publisher = Publisher(self.config.mqtt, secrets=self.secrets)
        self.discovery = HomeAssistant(self.config.homeassistant, self.publisher)
        for name, cfg in self.desired.items():
            self._announce(name, cfg)
        async with asyncio.TaskGroup() as tg:
            pub_task = tg.create_task(self.publisher.run(), name="mqtt.publisher")
            await self._discover()
            if self._starting:
                await asyncio.wait(list(self._starting.values()), timeout=START_TIMEOUT_S)
            self._place_unplaced()
            self.ready.set()
            loops = [tg.create_task(self._monitor_loop(), name="cluster.monitor"),
                     tg.create_task(self._rebalance_loop(), name="cluster.rebalance"),
                     tg.create_task(self._state_loop(), name="cluster.state")]
            try:
                await stop.wait()
            finally:
                for task in (*loops, *self._starting.values()):
                    task.cancel()
                await asyncio.gather(*loops, *self._starting.values(), return_exceptions=True)
                if not self.keep_workers:
                    await self._stop_workers()
                self.publisher.publish(self.publisher.topics.cluster, self.state(), qos=1, retain=True)
                await self.publisher.close()
                await asyncio.wait({pub_task}, timeout=10)

    async def _stop_workers(self) -> None:
        import ray

        async def stop(node: NodeHandle) -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(30):
                    await node.actor.stop.remote()
            with contextlib.suppress(Exception):
                ray.kill(node.actor, no_restart=True)

        await asyncio.gather(*(stop(n) for n in self.nodes.values() if n.state != "lost"))
        for node in self.nodes.values():
            node.state = "stopped"

    # -- nodes ---------------------------------------------------------------------------------------
    async def _discover(self) -> None:
        """Start (or find) a worker on every alive node with the framegrid resource."""
        import ray

        self.calls += 1
        alive = await asyncio.to_thread(ray.nodes)
        ids = {n["NodeID"] for n in alive if n.get("Alive")}
        for node in list(self.nodes.values()):
            if node.state not in ("lost", "stopped") and node.node_id not in ids:
                await self._lost(node, "its Ray node is gone")
        for info in alive:
            if not info.get("Alive") or info.get("Resources", {}).get(self.settings.node_resource, 0) <= 0:
                continue
            name = "node-" + info["NodeID"][:8]
            known = self.nodes.get(name)
            if name in self._starting or (known is not None and (known.state != "lost" or time.monotonic() <
                                                                 (known.lost_at or 0.0) + retry_after(known))):
                continue  # lost again soon after a new start: its raylet may be dying; try later
            cpus = info.get("Resources", {}).get("CPU")
            losses = known.losses if known is not None else 0
            self._starting[name] = asyncio.create_task(self._start_worker(name, info["NodeID"], cpus, losses),
                                                       name=f"cluster.start.{name}")
            self._starting[name].add_done_callback(functools.partial(self._started, name))

    def _started(self, name: str, _task: asyncio.Task[None]) -> None:
        self._starting.pop(name, None)

    async def _start_worker(self, name: str, node_id: str, cpus: float | None, losses: int = 0) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .worker import NodeWorker

        actor_name = f"framegrid-{name}"
        try:
            actor = ray.get_actor(actor_name, namespace=self.settings.namespace)
            found = True
        except ValueError:
            remote = ray.remote(concurrency_groups={HEALTH: 1})(NodeWorker).options(  # type: ignore[call-overload]
                name=actor_name, namespace=self.settings.namespace, lifetime="detached", max_restarts=0,
                num_cpus=0, resources={self.settings.node_resource: 1},
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
            actor = remote.remote(self.config, name, self.config_path, cpus)
            found = False
        node = NodeHandle(name, node_id, actor, losses=losses)
        self.nodes[name] = node
        self.calls += 1
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                desc = await actor.start.remote()
        except Exception as exc:
            await self._lost(node, f"its worker did not start: {exc!r}")
            return
        self._describe(node, desc)
        node.state, node.up_at = "up", time.monotonic()
        self._adopt(node)
        log.info("cluster: %s %s (%s)", name, "found running" if found else "joined",
                 ", ".join(f"{m} {fps:.0f} frames/s" for m, fps in node.throughput.items()) or "no model")
        self._changed.set()
        if self.ready.is_set():
            self._place_unplaced()
            self._rebalanced_at.clear()  # a new node: the dwell damps passes among the same nodes only
            self._joined.set()

    def _describe(self, node: NodeHandle, desc: dict[str, Any]) -> None:
        node.throughput = {m: float(v) for m, v in desc["throughput"].items()}
        node.model_errors = {m: str(e) for m, e in desc.get("model_errors", {}).items()}
        node.streams = dict(desc["streams"])
        node.sessions = dict(desc.get("sessions", {}))
        node.talk_capacity = int(desc.get("talk_capacity", 0))
        node.pid = desc.get("pid")
        node.last_seen = time.monotonic()
        capacities = {**{id(p): node.throughput.get(m, 0.0) for m, p in self.placers.items()},
                      id(self.talk): float(node.talk_capacity)}
        for placer in self._all_placers():
            capacity = max(capacities[id(placer)], 1e-6)
            record = placer.slots.get(node.name) or placer.add_slot(node.name, capacity=capacity)
            record.capacity = capacity

    def _all_placers(self) -> list[Placer]:
        return [*self.placers.values(), self.talk]

    def _adopt(self, node: NodeHandle) -> None:
        """Take the streams a found worker already runs into the placement (a head restart), and stop
        those no longer wanted or already running elsewhere."""
        for stream, info in node.streams.items():
            cfg = self.desired.get(stream)
            placer = self.placers.get(info["model"])
            if cfg is None or placer is None or placer.where(stream) not in (None, node.name):
                self._spawn(self._remove_from(node, stream), f"cluster.remove.{stream}")
                continue
            placer.assign(stream, node.name, stream_cost(cfg))
        for session in node.sessions:
            key = session_key(session)
            if session not in self.sessions or self.talk.where(key) not in (None, node.name):
                self._spawn(self._remove_from(node, key), f"cluster.remove.{key}")
                continue
            self.talk.assign(key, node.name, 1.0)

    async def _lost(self, node: NodeHandle, why: str) -> None:
        """A worker failed: fence it, tell subscribers, and place its streams on the other nodes."""
        import ray

        if node.state == "lost":
            return
        node.state, node.error, node.lost_at = "lost", why, time.monotonic()
        node.losses += 1
        log.warning("cluster: %s lost (%s); moving its streams", node.name, why)
        with contextlib.suppress(Exception):
            ray.kill(node.actor, no_restart=True)  # a worker cut off but alive must publish nothing more
        self.publisher.publish(self.publisher.topics.node_availability(node.name), b"offline", qos=1,
                               retain=True)
        for placer in self._all_placers():
            if node.name not in placer.slots:
                continue
            moves, stuck = placer.evacuate(node.name, SlotState.FAILED, force=True)
            del placer.slots[node.name]
            for move in moves:
                self._moving(move.stream, move.target, f"node {node.name} lost")
                self._spawn(self._start_on(move.target, move.stream), f"cluster.move.{move.stream}")
            for stream in stuck:
                log.warning("cluster: %s waits for a node", stream)
        self._changed.set()

    # -- streams ---------------------------------------------------------------------------------------
    def where(self, stream: str) -> str | None:
        if stream.startswith(TALK):
            return self.talk.where(stream)
        cfg = self.desired.get(stream)
        placer = self.placers.get(cfg.model) if cfg is not None else None
        return placer.where(stream) if placer is not None else None

    def model_names(self) -> list[str]:
        return list(self.placers)

    def is_running(self, name: str) -> bool:
        return name in self.desired

    def retune_stream(self, name: str, cfg: StreamConfig) -> bool:
        return False  # a change restarts the stream (placed again, maybe on another node)

    async def stream_info(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The running state and figures of `names`, asked of the nodes running them (at most a few
        seconds; a node that does not answer gives nothing)."""
        by_node: dict[str, list[str]] = {}
        for name in names:
            node = self.where(name)
            if node is not None and self.nodes.get(node) is not None and self.nodes[node].state != "lost":
                by_node.setdefault(node, []).append(name)

        async def ask(node: str, streams: list[str]) -> dict[str, dict[str, Any]]:
            self.calls += 1
            try:
                async with asyncio.timeout(min(5.0, self.settings.dead_after_s)):
                    return dict(await self.nodes[node].actor.stream_info.remote(streams))
            except Exception:
                return {}

        out: dict[str, dict[str, Any]] = {}
        for got in await asyncio.gather(*(ask(n, s) for n, s in by_node.items())):
            out.update(got)
        return out

    async def ask_nodes(self, method: str, *args: Any) -> dict[str, Any]:
        """Call `method` of every node worker that is up (or drained) at once: -> its answer by node;
        a node that does not answer within a few seconds is left out."""
        names = [n.name for n in self.nodes.values() if n.state in ("up", "drained")]
        timeout = min(5.0, self.settings.dead_after_s)
        got = await asyncio.gather(*(self.ask(n, method, *args, timeout=timeout) for n in names),
                                   return_exceptions=True)
        return {n: g for n, g in zip(names, got, strict=True) if g is not None and not isinstance(g, BaseException)}

    async def ask(self, node_name: str | None, method: str, *args: Any, timeout: float = 10.0) -> Any:
        """Call `method` of one node's worker; `Unavailable` when the node is not up or does not answer."""
        node = self.nodes.get(node_name or "")
        if node is None or node.state not in ("up", "drained"):
            raise Unavailable(f"node {node_name or '(none)'} is not up" if node_name else "not placed on a node yet")
        self.calls += 1
        try:
            async with asyncio.timeout(timeout):
                return await getattr(node.actor, method).remote(*args)
        except Exception as exc:
            raise Unavailable(f"node {node.name} did not answer ({type(exc).__name__})") from None

    async def snapshot(self, name: str, boxes: bool, main: bool = False) -> tuple[int, bytes] | None:
        node = self.nodes.get(self.where(name) or "")
        if node is None or node.state == "lost":
            return None
        got = await self.ask(node.name, "snapshot", name, boxes, main)
        return None if got is None else (int(got[0]), bytes(got[1]))

    def segments(self) -> Any:
        """The lipsync slots of every node that is up, as one pool for offline talk jobs
        (`pipeline.cluster.segments.ClusterSegments`)."""
        from .segments import ClusterSegments

        slots = [(n.actor, i) for n in self.nodes.values() if n.state == "up" for i in range(n.talk_capacity)]
        return ClusterSegments(slots, self.config.lipsync.batch_size)

    def _place_unplaced(self) -> None:
        for stream, cfg in self.desired.items():
            if self.where(stream) is None:
                self._place(stream, cfg)
        for session in self.sessions:
            if self.talk.where(session_key(session)) is None:
                self._place_session(session)

    def _place_session(self, name: str) -> str | None:
        key = session_key(name)
        try:
            node = self.talk.place(key, 1.0, force=True)
        except PlacementError as exc:
            log.warning("cluster: talk session %s: %s", name, exc)
            return None
        self._spawn(self._start_on(node, key), f"cluster.start.{key}")
        return node

    def _place(self, stream: str, cfg: StreamConfig) -> str | None:
        placer = self.placers[cfg.model]
        try:
            node = placer.place(stream, stream_cost(cfg), force=True)
        except PlacementError as exc:
            log.warning("cluster: %s", exc)
            return None
        self._spawn(self._start_on(node, stream), f"cluster.start.{stream}")
        return node

    async def _start_on(self, node_name: str, key: str) -> None:
        """Start a stream (or a talk session, key `talk/<name>`) on a node."""
        node = self.nodes.get(node_name)
        session = key.removeprefix(TALK) if key.startswith(TALK) else None
        cfg = self.sessions.get(session) if session is not None else self.desired.get(key)
        if node is None or cfg is None or node.state == "lost":
            return
        self.calls += 1
        try:
            if session is not None:
                await node.actor.start_session.remote(session, cfg)
                node.sessions[session] = "starting"
            else:
                await node.actor.add_stream.remote(key, cfg)
                node.streams[key] = {"model": cfg.model, "state": "starting"}  # type: ignore[union-attr]
        except Exception as exc:
            log.warning("cluster: %s on %s: %s", key, node_name, redact_text(repr(exc), self.secrets))
            return
        log.info("cluster: %s runs on %s", key, node_name)
        self._changed.set()

    async def _remove_from(self, node: NodeHandle, key: str) -> None:
        self.calls += 1
        with contextlib.suppress(Exception):
            if key.startswith(TALK):
                await node.actor.stop_session.remote(key.removeprefix(TALK))
            else:
                await node.actor.remove_stream.remote(key)
        node.streams.pop(key, None)
        node.sessions.pop(key.removeprefix(TALK), None)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def add_stream(self, name: str, cfg: StreamConfig) -> str | None:
        """Add a stream at run time: placed and started on a node (-> the node, None while no node fits)."""
        if name in self.desired:
            raise ValueError(f"stream {name} already exists")
        if cfg.model not in self.placers:
            raise ValueError(f"stream {name}: unknown model {cfg.model}")
        password = url_password(cfg.url)
        if password:
            self.secrets.append(password)
        self.desired[name] = cfg
        self._announce(name, cfg)
        return self._place(name, cfg)

    def _announce(self, name: str, cfg: StreamConfig) -> None:
        """Home Assistant's entities of a stream (the head knows each model's names from its config only)."""
        model = self.config.models[cfg.model]
        try:
            names = list(model.label_names())
        except (OSError, ValueError):
            names = []
        self.discovery.announce(name, cfg, self.discovery.labels_for(cfg, model.classes, names))

    async def remove_stream(self, name: str) -> None:
        cfg = self.desired.pop(name, None)
        if cfg is None:
            raise KeyError(name)
        self.discovery.withdraw(name)
        placer = self.placers[cfg.model]
        node = self.nodes.get(placer.where(name) or "")
        placer.remove(name)
        if node is not None and node.state != "lost":
            await self._remove_from(node, name)
        self._changed.set()

    async def add_session(self, name: str, cfg: TalkConfig) -> str | None:
        """Start a talk session at run time on the node with the most room (-> the node)."""
        if name in self.sessions:
            raise ValueError(f"session {name} already exists")
        self.sessions[name] = cfg
        return self._place_session(name)

    async def remove_session(self, name: str) -> None:
        if self.sessions.pop(name, None) is None:
            raise KeyError(name)
        key = session_key(name)
        node = self.nodes.get(self.talk.where(key) or "")
        self.talk.remove(key)
        if node is not None and node.state != "lost":
            await self._remove_from(node, key)
        self._changed.set()

    async def _apply_move(self, stream: str, source: str, target: str) -> None:
        """Stop a stream on `source`, then start it on `target`: nothing is published twice."""
        node = self.nodes.get(source)
        if node is not None and node.state != "lost":
            await self._remove_from(node, stream)
        self._moving(stream, target, f"moved from {source}")
        await self._start_on(target, stream)

    def _moving(self, key: str, target: str, why: str) -> None:
        """Tell a stream's (or talk session's) subscribers it is moving, and where (its new node then
        publishes its states)."""
        body: MovingPayload = {"v": PAYLOAD_VERSION, "state": "moving", "node": target, "reason": why,
                               "since": round(time.time(), 3)}
        if key.startswith(TALK):
            name = key.removeprefix(TALK)
            body["session"] = name
            self.publisher.publish(self.publisher.topics.talk_state(name), body, qos=1, retain=True)
        else:
            body["stream"] = key
            self.publisher.publish(self.publisher.topics.stream_state(key), body, qos=1,
                                   retain=True)

    async def move(self, stream: str, target: str) -> None:
        """Move a stream to another node (an operator's choice)."""
        cfg = self.desired[stream]
        placer = self.placers[cfg.model]
        source = placer.where(stream)
        if target not in placer.slots or not placer.slots[target].healthy:
            raise PlacementError(f"node {target} does not take streams now")
        placer.assign(stream, target, stream_cost(cfg))
        if source != target:
            await self._apply_move(stream, source or "", target)

    async def drain_node(self, name: str) -> list[str]:
        """Move every stream off a node (maintenance) and place nothing there until resumed;
        all or nothing (PlacementError when the other nodes cannot take them)."""
        node = self.nodes[name]
        planned = []
        for placer in self._all_placers():
            if name not in placer.slots:
                continue
            moves, stuck = placer.evacuate(name, SlotState.DRAINED)
            planned.append((placer, moves, stuck))
        if any(stuck for _, _, stuck in planned):
            for placer, moves, _ in planned:  # put everything back
                for m in moves:
                    placer.assign(m.stream, name, m.cost)
                placer.slots[name].state = SlotState.HEALTHY
            lacking = sorted(s for _, _, stuck in planned for s in stuck)
            raise PlacementError(f"node {name}: no other node has room for {', '.join(lacking)}")
        node.state = "drained"
        moved = [m for _, moves, _ in planned for m in moves]
        await asyncio.gather(*(self._apply_move(m.stream, m.source, m.target) for m in moved))
        self._changed.set()
        return [m.stream for m in moved]

    async def resume_node(self, name: str) -> None:
        node = self.nodes[name]
        for placer in self._all_placers():
            if name in placer.slots:
                placer.slots[name].state = SlotState.HEALTHY
        node.state = "up"
        self._rebalanced_at.clear()  # (as for a join: an operator's resume rebalances afresh)
        self._joined.set()  # rebalance onto it

    # -- loops -----------------------------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ping_s)
            await self._discover()
            await asyncio.gather(*(self._ping(n) for n in list(self.nodes.values()) if n.state in ("up", "drained")))

    async def _ping(self, node: NodeHandle) -> None:
        self.calls += 1
        s = self.settings
        try:
            async with asyncio.timeout(s.dead_after_s):
                desc = await node.actor.ping.options(concurrency_group=HEALTH).remote()
        except TimeoutError:
            now = time.monotonic()
            if now - node.up_at < s.start_grace_s and now - node.last_seen < 3 * s.dead_after_s:
                log.warning("cluster: %s slow to answer (%.0f s since its last answer; it came up %.0f s ago)",
                            node.name, now - node.last_seen, now - node.up_at)
                return
            await self._lost(node, f"no answer for {now - node.last_seen:.0f}s")
            return
        except Exception as exc:
            await self._lost(node, type(exc).__name__)
            return
        before = (set(node.streams), dict(node.sessions))
        self._describe(node, desc)
        if node.losses and node.last_seen - node.up_at > s.start_grace_s:
            node.losses = 0  # it has held up: a later loss is tried again at once
        if (set(node.streams), node.sessions) != before:
            self._changed.set()

    async def _rebalance_loop(self) -> None:
        while True:
            await wait_event(self._joined, self.settings.rebalance_s)
            self._joined.clear()
            await self.rebalance()

    async def rebalance(self, asked: bool = False) -> list[tuple[str, str, str]]:
        """Even the load over nodes (within `band`, at most `max_moves`): -> (stream, from, to) moves.
        A stream a pass moved less than `dwell_s` ago stays, unless an operator `asked` (resume)."""
        done = []
        now = time.monotonic()
        self._rebalanced_at = {k: t for k, t in self._rebalanced_at.items() if now - t < self.settings.dwell_s}
        for placer in self.placers.values():
            moves = placer.rebalance(max_moves=self.settings.max_moves, fill=True,  # a joined node takes its share
                                     keep=() if asked else self._rebalanced_at)
            self._rebalanced_at.update((m.stream, now) for m in moves)
            await asyncio.gather(*(self._apply_move(m.stream, m.source, m.target) for m in moves))
            done += [(m.stream, m.source, m.target) for m in moves]
        if done:
            log.info("cluster: rebalanced %d stream(s): %s", len(done),
                     ", ".join(f"{s} {a}->{b}" for s, a, b in done))
        return done

    async def _state_loop(self) -> None:
        while True:
            await wait_event(self._changed, 10.0)
            self._changed.clear()
            self.publisher.publish(self.publisher.topics.cluster, self.state(), qos=1, retain=True)

    def state(self) -> ClusterPayload:
        elapsed = max(1e-9, time.monotonic() - self.started_at)
        return {
            "v": PAYLOAD_VERSION,
            "at": round(time.time(), 3),
            "nodes": {
                n.name: {
                    "state": n.state,
                    "streams": sorted(s for s in self.desired if self.where(s) == n.name),
                    "sessions": sorted(t for t in self.sessions if self.talk.where(session_key(t)) == n.name),
                    "throughput": {m: round(v, 1) for m, v in n.throughput.items()},
                    "error": n.error,
                }
                for n in self.nodes.values()
            },
            "unplaced": sorted(s for s in self.desired if self.where(s) is None),
            "unplaced_sessions": sorted(t for t in self.sessions if self.talk.where(session_key(t)) is None),
            "control_calls_per_s": round(self.calls / elapsed, 2),
        }
