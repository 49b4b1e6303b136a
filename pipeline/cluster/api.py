"""The HTTP API of a cluster head: the same stream routes as a single process, plus the nodes.

Streams are added, changed and deleted through the same `StreamControl` as in one process
(validated like the TOML, kept in the overlay file beside the config, then applied): the head
places them on a node. A stream's figures and its snapshot are asked of the node running it when
a client asks (one call per node per request; frames stay on the nodes, a snapshot is one JPEG).
Nodes can be listed, drained and resumed; `/api/cluster` is the `<prefix>/cluster` payload;
`/metrics` has the head's placement and, per stream, the figures its node reports. Talk sessions
are started and stopped on nodes; offline talk jobs run here with their MuseTalk segments on the
nodes' lipsync slots (`pipeline.cluster.segments`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from pipeline.api.app import BodyLimit, add_job_routes, base_app
from pipeline.api.control import StreamControl
from pipeline.api.metrics import add_standard_collectors
from pipeline.api.routes import add_page, observe_router, sessions_router, streams_router
from pipeline.api.schemas import DeviceOut, EventInfo, ModelInfo, Move, Problem, RecordingInfo, SessionInfo
from pipeline.api.server import ApiServer
from pipeline.api.target import redacted
from pipeline.api.views import no_main
from pipeline.config import TalkConfig
from pipeline.errors import Conflict, Invalid, NotFound, PlacementError, RequestError, TooLarge, Unavailable
from pipeline.payloads import ClusterPayload, ClusterStatsPayload, StatsPayload
from pipeline.talk.jobs import TalkJobs
from pipeline.topics import PAYLOAD_VERSION
from streams import redact_text

from .head import session_key

if TYPE_CHECKING:
    from pathlib import Path

    from .head import ClusterHead

NODE_STATES = ("starting", "up", "drained", "lost", "stopped")
# a node's refusal (`worker.answered`) by kind, raised again on the head
REFUSALS: dict[str, type[RequestError]] = {k.__name__: k for k in (NotFound, Conflict, Invalid, TooLarge, Unavailable)}


class NodeInfo(BaseModel):
    name: str
    state: str = Field(description="starting | up | drained | lost | stopped")
    streams: list[str]
    throughput: dict[str, float] = Field(description="frames/s its slots serve, by model (measured by the node)")
    error: str | None = None
    last_seen_s: float | None = Field(None, description="seconds since its last answer")
    pid: int | None = Field(None, description="the node worker's process id on its machine")


class NodeMoves(BaseModel):
    node: str
    moved: list[str]


class _Figures(Collector):
    """Metrics collected from what the route gathered just before (the head's state, the nodes' figures)."""

    def __init__(self) -> None:
        self.state: ClusterPayload | None = None
        self.figures: dict[str, dict[str, Any]] = {}

    def collect(self) -> Iterator[Metric]:
        node_facts = self.state["nodes"] if self.state is not None else {}
        unplaced = self.state["unplaced"] if self.state is not None else []
        nodes = GaugeMetricFamily("framegrid_cluster_nodes", "nodes by state", labels=["state"])
        for st in NODE_STATES:
            nodes.add_metric([st], sum(1 for n in node_facts.values() if n["state"] == st))
        yield nodes
        placed = GaugeMetricFamily("framegrid_cluster_node_streams", "streams placed on each node", labels=["node"])
        capacity = GaugeMetricFamily("framegrid_cluster_node_throughput_fps", "frames/s a node's slots serve",
                                     labels=["node", "model"])
        for name, n in node_facts.items():
            placed.add_metric([name], len(n["streams"]))
            for model, rate in n["throughput"].items():
                capacity.add_metric([name, model], rate)
        yield placed
        yield capacity
        yield GaugeMetricFamily("framegrid_cluster_unplaced_streams", "streams waiting for a node",
                                value=len(unplaced))
        fps = GaugeMetricFamily("framegrid_stream_fps", "processed frames/s", labels=["stream", "node"])
        published = CounterMetricFamily("framegrid_stream_published", "results published", labels=["stream", "node"])
        for stream, f in sorted(self.figures.items()):
            fps.add_metric([stream, f["node"]], f.get("fps_out", 0.0))
            published.add_metric([stream, f["node"]], f.get("published", 0))
        yield fps
        yield published


class ClusterMedia:
    """Every node's events, pictures, clips and segments (`EventMedia`): lists merged, files from the
    node that has them."""

    def __init__(self, head: ClusterHead) -> None:
        self.head = head

    async def events(self, stream: str | None, label: str | None, since: float | None,
                     limit: int) -> list[EventInfo]:
        got = await self.head.ask_nodes("events", stream, label, since, limit)
        rows = sorted((EventInfo.model_validate(e) for found in got.values() for e in found),
                      key=lambda e: e.start_time, reverse=True)
        return rows[:limit]

    async def event_snapshot(self, event_id: str, crop: bool) -> bytes | None:
        got = await self.head.ask_nodes("event_snapshot", event_id, crop)
        return next((bytes(jpeg) for jpeg in got.values() if jpeg is not None), None)

    async def event_clip(self, event_id: str) -> Path | bytes | None:
        got = await self.head.ask_nodes("relayed", "event_clip", event_id)
        return next((bytes(value) for kind, value in got.values() if kind == "ok" and value is not None), None)

    async def recordings(self, stream: str | None, since: float | None, until: float | None,
                         limit: int) -> list[RecordingInfo]:
        got = await self.head.ask_nodes("relayed", "recordings", stream, since, until, limit)
        rows = sorted((RecordingInfo.model_validate(r) for kind, found in got.values() if kind == "ok"
                       for r in found), key=lambda r: r.start_time)
        return rows[:limit]

    async def recording(self, segment: str) -> Path | bytes | None:
        got = await self.head.ask_nodes("relayed", "recording", segment)
        return next((bytes(value) for kind, value in got.values() if kind == "ok" and value is not None), None)


class ClusterTarget:
    """The control target of a cluster head: streams' figures and pictures are asked of the node
    running them (one call per node per request; frames stay on the nodes)."""

    def __init__(self, head: ClusterHead) -> None:
        self.head = head
        self.config = head.config
        self.ready = head.ready
        self.media = ClusterMedia(head)

    def secret_values(self) -> tuple[str, ...]:
        return tuple(self.head.secrets)

    async def figures(self, names: list[str]) -> dict[str, dict[str, Any]]:
        head = self.head
        got = await head.stream_info([n for n in names if head.is_running(n)])
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            if not head.is_running(name):
                continue
            place: dict[str, Any] = {"node": head.where(name)}
            if name not in got:
                place["state"] = "starting" if head.where(name) else "unplaced"
            out[name] = {**place, **got.get(name, {})}
        return out

    async def snapshot(self, name: str, boxes: bool, main: bool = False) -> tuple[int, bytes] | None:
        cfg = self.head.desired.get(name)
        if main and cfg is not None and cfg.detect_url is None:  # (the node would say so, but as a failed call)
            raise no_main(name)
        try:
            return await self.head.snapshot(name, boxes, main)
        except Unavailable as exc:
            raise Unavailable(f"stream {name}: {exc}") from None

    def forget(self, name: str) -> None:
        pass  # nothing is cached here: the nodes hold the pictures

    def models(self) -> list[ModelInfo]:
        head = self.head
        out = []
        for m, cfg in sorted(head.config.models.items()):
            nodes = sorted(n.name for n in head.nodes.values() if n.state == "up" and n.throughput.get(m))
            errors = sorted({e for n in head.nodes.values() if (e := n.model_errors.get(m))})
            out.append(ModelInfo(name=m, backend=cfg.backend, imgsz=cfg.imgsz, loaded=bool(nodes), nodes=nodes,
                                 error=redact_text("; ".join(errors), self.secret_values()) if errors else None))
        return out

    def session_names(self) -> list[str]:
        return list(self.head.sessions)

    def _session_info(self, name: str) -> SessionInfo:
        head = self.head
        node = head.where(session_key(name))
        state = head.nodes[node].sessions.get(name, "starting") if node in head.nodes else "unplaced"
        return SessionInfo(name=name, state=state, backend=head.sessions[name].backend, node=node)

    def sessions(self) -> list[SessionInfo]:
        return [self._session_info(n) for n in sorted(self.head.sessions)]

    async def start_session(self, name: str, cfg: TalkConfig) -> SessionInfo:
        await self.head.add_session(name, cfg)
        return self._session_info(name)

    async def stop_session(self, name: str) -> None:
        await self.head.remove_session(name)

    async def _relay(self, node: str | None, method: str, *args: Any) -> Any:
        """A request answered by one node's worker (`NodeWorker.relayed`): its result, or its refusal
        raised here as the same kind of error."""
        kind, value = await self.head.ask(node, "relayed", method, *args)
        if kind != "ok":
            raise REFUSALS.get(kind, Conflict)(value)
        return value

    async def webrtc_offer(self, session: str, kind: str, sdp: str) -> tuple[str | None, str]:
        if session not in self.head.sessions:
            raise NotFound(f"no session {session}")
        viewer, answer = await self._relay(self.head.where(session_key(session)), "webrtc_offer", session, kind, sdp)
        return viewer, answer

    async def webrtc_leave(self, session: str, viewer: str) -> None:
        if session not in self.head.sessions:
            raise NotFound(f"no session {session}")
        await self._relay(self.head.where(session_key(session)), "webrtc_leave", session, viewer)

    async def say(self, session: str, text: str, voice: str | None, interrupt: bool) -> str:
        if session not in self.head.sessions:
            raise NotFound(f"no session {session}")
        got: str = await self._relay(self.head.where(session_key(session)), "say", session, text, voice, interrupt)
        return got

    async def interrupt(self, session: str) -> str:
        if session not in self.head.sessions:
            raise NotFound(f"no session {session}")
        got: str = await self._relay(self.head.where(session_key(session)), "interrupt", session)
        return got

    async def talk_events(self, session: str, after: int) -> list[dict[str, Any]]:
        if session not in self.head.sessions:
            raise NotFound(f"no session {session}")
        got: list[dict[str, Any]] = await self._relay(self.head.where(session_key(session)), "talk_events", session,
                                                      after)
        return got

    # -- what the nodes answer ---------------------------------------------------------------------------
    async def devices(self) -> list[DeviceOut]:
        got = await self.head.ask_nodes("devices")
        return [DeviceOut.model_validate(d) for node in sorted(got) for d in got[node]]

    async def device_moves(self, device: str, node: str | None, drain: bool) -> list[Move]:
        if node is None:
            up = [n.name for n in self.head.nodes.values() if n.state in ("up", "drained")]
            if len(up) != 1:
                names = ", ".join(sorted(up)) or "none"
                raise Invalid(f"device {device}: name its node (?node=, one of {names})",
                              [("node", f"required on a cluster with more than one node: one of {names}")])
            node = up[0]
        elif node not in self.head.nodes:
            raise NotFound(f"no node {node}")
        return [Move.model_validate(m) for m in await self._relay(node, "device_moves", device, None, drain)]

    async def stats(self) -> StatsPayload | ClusterStatsPayload:
        """The head's placement and every node's own stats payload (asked of the nodes, at once)."""
        nodes = await self.head.ask_nodes("stats")
        payload: ClusterStatsPayload = {"v": PAYLOAD_VERSION, "at": round(time.time(), 3),
                                        "cluster": self.head.state(), "nodes": nodes}
        return redacted(payload, self.secret_values())

    def mqtt(self) -> dict[str, Any]:
        counters = self.head.publisher.counters()
        return {k: counters[k] for k in ("connected", "buffered", "published")}


def build_cluster_app(head: ClusterHead, control: StreamControl, jobs: TalkJobs | None, token: str | None,
                      closing: asyncio.Event, max_upload: int = 50_000_000) -> FastAPI:
    def secrets():
        return tuple(head.secrets)

    def not_ready() -> list[str]:
        reasons = []
        if not head.ready.is_set():
            reasons.append("starting")
        else:
            if not any(n.state == "up" for n in head.nodes.values()):
                reasons.append("no node is up")
            reasons += [f"stream {s}: no node has room" for s in head.state()["unplaced"]]
        return reasons

    app, guarded, errors = base_app("Control a framegrid cluster head: streams and talk sessions placed on nodes, "
                                    "the nodes, offline talk jobs split across them.", token, secrets, not_ready)
    app.add_middleware(BodyLimit, limit=2 * max_upload + 64 * 1024, paths=("/api/talk/jobs",))
    figures = _Figures()
    registry = CollectorRegistry(auto_describe=False)
    add_standard_collectors(registry)
    registry.register(figures)
    not_found = {**errors, 404: {"model": Problem}}

    def running() -> None:
        if not head.ready.is_set():
            raise HTTPException(503, "starting")

    target = ClusterTarget(head)
    app.include_router(streams_router(target, control, guarded, errors, head.config.api.mjpeg_fps, closing))
    app.include_router(sessions_router(target, control, guarded, errors, closing))
    app.include_router(observe_router(target, control, guarded, errors, closing))
    add_page(app)

    # -- nodes -------------------------------------------------------------------------------------
    def node_info(name: str) -> NodeInfo:
        n = head.nodes[name]
        return NodeInfo(name=name, state=n.state, streams=sorted(s for s in head.desired if head.where(s) == name),
                        throughput={m: round(v, 1) for m, v in n.throughput.items()},
                        error=redact_text(n.error, secrets()) if n.error else None,
                        last_seen_s=round(time.monotonic() - n.last_seen, 1) if n.last_seen else None, pid=n.pid)

    def node_of(name: str) -> None:
        running()
        if name not in head.nodes:
            raise HTTPException(404, f"no node {name}")

    @app.get("/api/nodes", response_model=list[NodeInfo], tags=["nodes"], dependencies=guarded, responses=errors)
    async def nodes() -> list[NodeInfo]:
        running()
        return [node_info(n) for n in sorted(head.nodes)]

    @app.post("/api/nodes/{node}/drain", response_model=NodeMoves, tags=["nodes"], dependencies=guarded,
              responses={**not_found, 409: {"model": Problem, "description": "the other nodes cannot take them"}},
              summary="Move every stream off a node; nothing is placed there until resumed")
    async def drain(node: str) -> NodeMoves:
        node_of(node)
        if head.nodes[node].state not in ("up", "drained"):
            raise HTTPException(409, f"node {node} is {head.nodes[node].state}")
        try:
            moved = await head.drain_node(node)
        except PlacementError as exc:
            raise HTTPException(409, str(exc)) from None
        return NodeMoves(node=node, moved=sorted(moved))

    @app.post("/api/nodes/{node}/resume", response_model=NodeMoves, tags=["nodes"], dependencies=guarded,
              responses={**not_found, 409: {"model": Problem}}, summary="Take streams again (rebalanced onto it)")
    async def resume(node: str) -> NodeMoves:
        node_of(node)
        if head.nodes[node].state not in ("up", "drained"):
            raise HTTPException(409, f"node {node} is {head.nodes[node].state}")
        await head.resume_node(node)
        moves = await head.rebalance(asked=True)
        return NodeMoves(node=node, moved=sorted(s for s, _, target in moves if target == node))

    # -- talk jobs -------------------------------------------------------------------------------
    add_job_routes(app, jobs, guarded, errors, secrets)

    @app.get("/api/cluster", response_model=ClusterPayload, tags=["nodes"], dependencies=guarded, responses=errors,
             summary="The same payload as the <prefix>/cluster topic")
    async def cluster() -> ClusterPayload:
        return head.state()

    @app.get("/metrics", tags=["stats"], dependencies=guarded, response_class=Response,
             responses={**errors, 200: {"content": {CONTENT_TYPE_LATEST: {}}}}, summary="Prometheus metrics")
    async def metrics() -> Response:
        figures.state = head.state()
        figures.figures = await head.stream_info(sorted(head.desired)) if head.ready.is_set() else {}
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class ClusterJobs:
    """Talk jobs of a cluster head: their MuseTalk segments on the nodes' lipsync slots, prompts and
    avatar latents here (computed once per job, then sent per segment)."""

    def __init__(self, head: ClusterHead) -> None:
        self.head = head
        self._frontend: Any = None

    def workers(self) -> int:
        return max(1, sum(1 for n in self.head.nodes.values() if n.state == "up"))

    async def lipsync(self) -> tuple[Any, Any]:
        from talkinghead.musetalk import MuseTalk

        if self._frontend is None:
            lcfg = self.head.config.lipsync
            assert lcfg.weights is not None  # TalkJobs refuses musetalk jobs without them
            frontend = MuseTalk(lcfg.weights, lcfg.version, device="cpu", parts={"vae", "whisper"},
                                parsing_mode=lcfg.parsing_mode, cheek_width=lcfg.cheek_width)
            await asyncio.to_thread(frontend.load)
            self._frontend = frontend
        return self.head.segments(), self._frontend


def cluster_api(head: ClusterHead, config_path: Path | None) -> ApiServer:
    """The head's HTTP API on `api.listen`: the same server as one process's."""
    control = StreamControl(head, config_path)

    def build(jobs: TalkJobs, token: str | None, closing: asyncio.Event, max_upload: int) -> FastAPI:
        return build_cluster_app(head, control, jobs, token, closing, max_upload)

    return ApiServer(head.config, control, ClusterJobs(head), build, config_path)
