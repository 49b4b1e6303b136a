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

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from pipeline.api.app import (
    BodyLimit,
    NewSession,
    NewStream,
    Problem,
    SessionInfo,
    StreamInfo,
    StreamPatch,
    add_job_routes,
    base_app,
    configured_stream,
    session_config,
)
from pipeline.api.control import StreamControl
from pipeline.api.metrics import add_standard_collectors
from pipeline.api.server import HttpServer, jobs_folder
from pipeline.errors import PlacementError
from pipeline.talk.jobs import TalkJobs
from streams import redact_text

if TYPE_CHECKING:
    from pathlib import Path

    from .head import ClusterHead

NODE_STATES = ("starting", "up", "drained", "lost", "stopped")


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


class ModelOut(BaseModel):
    name: str
    backend: str
    imgsz: int
    nodes: list[str] = Field(description="nodes serving it")


class _Figures(Collector):
    """Metrics collected from what the route gathered just before (the head's state, the nodes' figures)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.figures: dict[str, dict[str, Any]] = {}

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("framegrid_cluster_nodes", "nodes by state", labels=["state"])
        for st in NODE_STATES:
            nodes.add_metric([st], sum(1 for n in self.state.get("nodes", {}).values() if n["state"] == st))
        yield nodes
        placed = GaugeMetricFamily("framegrid_cluster_node_streams", "streams placed on each node", labels=["node"])
        capacity = GaugeMetricFamily("framegrid_cluster_node_throughput_fps", "frames/s a node's slots serve",
                                     labels=["node", "model"])
        for name, n in self.state.get("nodes", {}).items():
            placed.add_metric([name], len(n["streams"]))
            for model, fps in n["throughput"].items():
                capacity.add_metric([name, model], fps)
        yield placed
        yield capacity
        yield GaugeMetricFamily("framegrid_cluster_unplaced_streams", "streams waiting for a node",
                                value=len(self.state.get("unplaced", [])))
        fps = GaugeMetricFamily("framegrid_stream_fps", "processed frames/s", labels=["stream", "node"])
        published = CounterMetricFamily("framegrid_stream_published", "results published", labels=["stream", "node"])
        for stream, f in sorted(self.figures.items()):
            fps.add_metric([stream, f["node"]], f.get("fps_out", 0.0))
            published.add_metric([stream, f["node"]], f.get("published", 0))
        yield fps
        yield published


def build_cluster_app(head: ClusterHead, control: StreamControl, jobs: TalkJobs | None, token: str | None,
                      max_upload: int = 50_000_000) -> FastAPI:
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

    def known(name: str) -> None:
        running()
        if name not in control.streams:
            raise HTTPException(404, f"no stream {name}")

    async def infos(names: list[str]) -> list[StreamInfo]:
        got = await head.stream_info([n for n in names if head.is_running(n)])
        out = []
        for name in names:
            base = configured_stream(name, control.streams[name], secrets())
            place = {"node": head.where(name)} if head.is_running(name) else {}
            if head.is_running(name) and name not in got:
                place["state"] = "starting" if head.where(name) else "unplaced"
            out.append(StreamInfo.model_validate({**base.model_dump(), **place, **got.get(name, {})}))
        return out


    # -- streams -----------------------------------------------------------------------------------
    @app.get("/api/streams", response_model=list[StreamInfo], tags=["streams"], dependencies=guarded,
             responses=errors)
    async def list_streams() -> list[StreamInfo]:
        running()
        return await infos(sorted(control.streams))

    @app.get("/api/streams/{name}", response_model=StreamInfo, tags=["streams"], dependencies=guarded,
             responses=not_found)
    async def get_stream(name: str) -> StreamInfo:
        known(name)
        return (await infos([name]))[0]

    @app.post("/api/streams", response_model=StreamInfo, status_code=201, tags=["streams"], dependencies=guarded,
              responses={**errors, 409: {"model": Problem, "description": "a stream of that name exists"}})
    async def add_stream(body: NewStream) -> StreamInfo:
        running()
        await control.add(body.name, body.model_dump(exclude_unset=True, exclude={"name"}, mode="json"))
        return (await infos([body.name]))[0]

    @app.patch("/api/streams/{name}", response_model=StreamInfo, tags=["streams"], dependencies=guarded,
               responses=not_found)
    async def patch_stream(name: str, body: StreamPatch) -> StreamInfo:
        running()
        await control.patch(name, body.model_dump(include=body.model_fields_set))
        return (await infos([name]))[0]

    @app.delete("/api/streams/{name}", status_code=204, tags=["streams"], dependencies=guarded,
                responses=not_found)
    async def delete_stream(name: str) -> Response:
        running()
        await control.delete(name)
        return Response(status_code=204)

    @app.get("/api/streams/{name}/snapshot.jpg", tags=["streams"], dependencies=guarded, response_class=Response,
             responses={**not_found, 503: {"model": Problem}, 200: {"content": {"image/jpeg": {}}}})
    async def snapshot(name: str, boxes: bool = Query(False, description="draw the detections")) -> Response:
        known(name)
        try:
            got = await head.snapshot(name, boxes)
        except Exception as exc:
            raise HTTPException(503, f"stream {name}: its node did not answer ({type(exc).__name__})") from None
        if got is None:
            raise HTTPException(503, f"stream {name} has no processed frame yet")
        return Response(got[1], media_type="image/jpeg", headers={"Cache-Control": "no-store",
                                                                   "X-Frame-Seq": str(got[0])})

    @app.get("/api/models", response_model=list[ModelOut], tags=["streams"], dependencies=guarded,
             responses=errors, summary="Models streams can use")
    async def models() -> list[ModelOut]:
        running()
        return [ModelOut(name=m, backend=cfg.backend, imgsz=cfg.imgsz,
                         nodes=sorted(n.name for n in head.nodes.values() if n.state == "up" and n.throughput.get(m)))
                for m, cfg in sorted(head.config.models.items())]

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
        moves = await head.rebalance()
        return NodeMoves(node=node, moved=sorted(s for s, _, target in moves if target == node))

    # -- talk sessions and jobs ----------------------------------------------------------------------
    def session_info(name: str) -> SessionInfo:
        node = head.where(f"talk/{name}")
        state = head.nodes[node].sessions.get(name, "starting") if node in head.nodes else "unplaced"
        return SessionInfo(name=name, state=state, backend=head.sessions[name].backend, node=node)

    @app.get("/api/talk/sessions", response_model=list[SessionInfo], tags=["talk"], dependencies=guarded,
             responses=errors)
    async def sessions() -> list[SessionInfo]:
        running()
        return [session_info(n) for n in sorted(head.sessions)]

    @app.post("/api/talk/sessions", response_model=SessionInfo, status_code=201, tags=["talk"],
              dependencies=guarded, responses={**errors, 409: {"model": Problem}})
    async def start_session(body: NewSession) -> SessionInfo:
        running()
        if body.name in head.sessions:
            raise HTTPException(409, f"session {body.name} already exists")
        cfg = session_config(body, control.paths, head.config.lipsync.weights is not None)
        await head.add_session(body.name, cfg)
        return session_info(body.name)

    @app.delete("/api/talk/sessions/{name}", status_code=204, tags=["talk"], dependencies=guarded,
                responses=not_found)
    async def stop_session(name: str) -> Response:
        running()
        if name not in head.sessions:
            raise HTTPException(404, f"no session {name}")
        await head.remove_session(name)
        return Response(status_code=204)

    add_job_routes(app, jobs, guarded, errors, secrets)

    @app.get("/api/cluster", response_model=dict[str, Any], tags=["nodes"], dependencies=guarded, responses=errors,
             summary="The same payload as the <prefix>/cluster topic")
    async def cluster() -> dict[str, Any]:
        return head.state()

    @app.get("/metrics", tags=["stats"], dependencies=guarded, response_class=Response,
             responses={**errors, 200: {"content": {CONTENT_TYPE_LATEST: {}}}}, summary="Prometheus metrics")
    async def metrics() -> Response:
        figures.state = head.state()
        figures.figures = await head.stream_info(sorted(head.desired)) if head.ready.is_set() else {}
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class ClusterApiServer(HttpServer):
    """The head's HTTP API on `api.listen`."""

    def __init__(self, head: ClusterHead, config_path: Path | None) -> None:
        super().__init__(head.config)
        self.head = head
        self.control = StreamControl(head, config_path)
        api = self.config.api
        self.jobs = TalkJobs(jobs_folder(self.config, config_path), int(api.max_upload_mb * 1e6),
                             lambda: max(1, sum(1 for n in head.nodes.values() if n.state == "up")), self._lipsync,
                             musetalk_ready=self.config.lipsync.weights is not None, paths=self.control.paths,
                             render_always=self.config.lipsync.render_silence == "always")
        self._frontend: Any = None
        self.app = build_cluster_app(head, self.control, self.jobs, self.token, int(api.max_upload_mb * 1e6))

    async def _lipsync(self) -> tuple[Any, Any]:
        """A MuseTalk job's (pool, front end): the nodes' lipsync slots, and Whisper + the VAE encoder here
        (prompts and avatar latents are computed once per job where it runs, then sent per segment)."""
        import asyncio

        from talkinghead.musetalk import MuseTalk

        if self._frontend is None:
            lcfg = self.config.lipsync
            assert lcfg.weights is not None  # TalkJobs refuses musetalk jobs without them
            frontend = MuseTalk(lcfg.weights, lcfg.version, device="cpu", parts={"vae", "whisper"},
                                parsing_mode=lcfg.parsing_mode, cheek_width=lcfg.cheek_width)
            await asyncio.to_thread(frontend.load)
            self._frontend = frontend
        return self.head.segments(), self._frontend
