"""The routes one process and a cluster head share, written once over `ControlTarget`: streams
(list, get, add, change, delete, snapshot, live MJPEG view), models, talk sessions and their WebRTC
signalling, devices (drain, resume), stats, events, the page's feed and the page.

Changes go through `StreamControl` (validated like the TOML, kept in the overlay, then applied by the
target); what the routes answer is read from the target. Errors are raised as `RequestError`s and
mapped to HTTP by the app (`http_status`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from pipeline.clientpaths import ClientPathError, ClientPaths
from pipeline.config import StreamConfig, TalkConfig
from pipeline.errors import Conflict, Invalid, NotFound
from pipeline.payloads import ClusterStatsPayload, StatsPayload
from streams import redact_text
from streams.handoff import wait_event

from .control import StreamControl
from .schemas import (
    DeviceOut,
    EventInfo,
    ModelInfo,
    Moves,
    NewSession,
    NewStream,
    Problem,
    RecordingInfo,
    Say,
    SessionInfo,
    StreamInfo,
    StreamPatch,
    Utterance,
)
from .target import ControlTarget

# live views and event streams: never cached, and not buffered by a proxy in front (nginx would hold
# the frames of an MJPEG stream or the lines of an event stream until its buffer fills)
log = logging.getLogger(__name__)

LIVE_HEADERS = {"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no"}
TALK_EVENTS_POLL_S = 0.05  # how often a session's utterance events are asked for (they run elsewhere on a cluster)
STUCK_VIEWER_S = 10.0  # a live view whose client takes nothing for this long is cut
TRANSPORT_KEY = "framegrid.transport"  # in the ASGI scope: the connection (set by the API server)


class LiveResponse(StreamingResponse):
    """A live view (MJPEG, server-sent events) that a client which stops reading cannot hold for ever.

    While the client reads nothing, the server's flow control holds the view at its send (one chunk
    and the connection's bounded write buffer: no growth). After `STUCK_VIEWER_S` of that the view is
    cut: the connection is aborted (its buffered bytes let go) and counted in `cut`."""

    cut = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self._scope = scope
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Any) -> None:
        cut = False

        async def timed(message: Any) -> None:
            nonlocal cut
            if cut:  # the view ends at its next disconnect check; nothing more is sent
                return
            try:
                await asyncio.wait_for(send(message), STUCK_VIEWER_S)
            except TimeoutError:
                cut = True
                LiveResponse.cut += 1
                transport = self._scope.get(TRANSPORT_KEY)
                log.info("api: live view %s cut: its client read nothing for %.0f s", self._scope.get("path"),
                         STUCK_VIEWER_S)
                if transport is not None:
                    transport.abort()

        await super().stream_response(timed)
Errors = dict[int | str, dict[str, Any]]
STATIC = Path(__file__).parent / "static"


def configured_stream(name: str, cfg: StreamConfig, secrets: tuple[str, ...]) -> StreamInfo:
    """A stream's info from its settings alone (state `disabled` until a running stream's figures are added)."""
    conf = json.loads(redact_text(json.dumps(cfg.model_dump(mode="json")), secrets))  # nested too
    return StreamInfo(name=name, url=redact_text(cfg.url, secrets), model=cfg.model, max_fps=cfg.max_fps,
                      enabled=cfg.enabled, state="disabled", config=conf)


async def stream_infos(target: ControlTarget, control: StreamControl, names: list[str]) -> list[StreamInfo]:
    """The named configured streams' infos: their settings, with the live figures of those that run."""
    secrets = target.secret_values()
    live = await target.figures(names)
    return [StreamInfo.model_validate({**configured_stream(n, control.streams[n], secrets).model_dump(),
                                       **live.get(n, {})}) for n in names]


def session_config(body: NewSession, paths: ClientPaths, musetalk_ready: bool) -> TalkConfig:
    """A new session's settings from an API client: its avatar, audio and output files inside
    api.media_dirs (relative: to the config), or network URLs (Invalid naming the key)."""
    cfg = TalkConfig.model_validate(body.model_dump(exclude={"name"}))
    checks = {"avatar": lambda: paths.file(cfg.avatar),
              "out": lambda: cfg.out if cfg.out == "webrtc" else paths.sink(cfg.out),
              "audio": lambda: cfg.audio if cfg.audio in ("mqtt", "webrtc") else paths.url(cfg.audio)}
    update = {}
    for key, check in checks.items():
        try:
            update[key] = check()
        except ClientPathError as exc:
            raise Invalid(f"{key}: {exc}", [(key, str(exc))]) from None
    cfg = cfg.model_copy(update=update)
    if cfg.backend == "musetalk" and not musetalk_ready:
        raise Invalid("backend: musetalk needs lipsync.weights in the config",
                          [("backend", "musetalk needs lipsync.weights in the config")])
    if not cfg.avatar.is_file():
        raise Invalid(f"avatar: file not found: {cfg.avatar}", [("avatar", f"file not found: {cfg.avatar}")])
    return cfg


def ranged(data: bytes, header: str | None, media_type: str) -> Response:
    """`data` whole, or the one byte range a `Range: bytes=a-b` header asks for (206; 416 if outside)."""
    size = len(data)
    common = {"Accept-Ranges": "bytes"}
    if not header or not header.startswith("bytes=") or "," in header:
        return Response(data, media_type=media_type, headers=common)
    first, _, last = header.removeprefix("bytes=").strip().partition("-")
    try:
        if first:
            start, end = int(first), min(int(last) if last else size - 1, size - 1)
        else:
            start, end = max(0, size - int(last)), size - 1
    except ValueError:
        return Response(data, media_type=media_type, headers=common)
    if start > end or start >= size:
        return Response(status_code=416, headers={**common, "Content-Range": f"bytes */{size}"})
    return Response(data[start:end + 1], status_code=206, media_type=media_type,
                    headers={**common, "Content-Range": f"bytes {start}-{end}/{size}"})


MP4_RESPONSES: dict[int | str, dict[str, Any]] = {404: {"model": Problem}, 206: {"content": {"video/mp4": {}}},
                                                 200: {"content": {"video/mp4": {}}}}


def mp4(found: Path | bytes, name: str, request: Request) -> Response:
    """A video file here (FileResponse: ranges, inline), or its bytes from a node (`ranged`)."""
    if isinstance(found, Path):
        return FileResponse(found, media_type="video/mp4", filename=f"{name}.mp4", content_disposition_type="inline")
    return ranged(found, request.headers.get("range"), "video/mp4")


def running(target: ControlTarget) -> None:
    if not target.ready.is_set():
        raise HTTPException(503, "starting")


def streams_router(target: ControlTarget, control: StreamControl, guarded: list[Any], errors: Errors,
                   mjpeg_fps: float, closing: asyncio.Event) -> APIRouter:
    router = APIRouter(tags=["streams"], dependencies=guarded)
    not_found: Errors = {**errors, 404: {"model": Problem}}

    def known(name: str) -> None:
        running(target)
        if name not in control.streams:
            raise NotFound(f"no stream {name}")

    async def infos(names: list[str]) -> list[StreamInfo]:
        return await stream_infos(target, control, names)

    @router.get("/api/streams", response_model=list[StreamInfo], responses=errors)
    async def list_streams() -> list[StreamInfo]:
        running(target)
        return await infos(sorted(control.streams))

    @router.get("/api/streams/{name}", response_model=StreamInfo, responses=not_found)
    async def get_stream(name: str) -> StreamInfo:
        known(name)
        return (await infos([name]))[0]

    @router.post("/api/streams", response_model=StreamInfo, status_code=201,
                 responses={**errors, 409: {"model": Problem, "description": "a stream of that name exists"}})
    async def add_stream(body: NewStream) -> StreamInfo:
        running(target)
        await control.add(body.name, body.model_dump(exclude_unset=True, exclude={"name"}, mode="json"))
        return (await infos([body.name]))[0]

    @router.patch("/api/streams/{name}", response_model=StreamInfo, responses=not_found)
    async def patch_stream(name: str, body: StreamPatch) -> StreamInfo:
        running(target)
        await control.patch(name, body.model_dump(include=body.model_fields_set))
        target.forget(name)
        return (await infos([name]))[0]

    @router.delete("/api/streams/{name}", status_code=204, responses=not_found)
    async def delete_stream(name: str) -> Response:
        running(target)
        await control.delete(name)
        target.forget(name)
        return Response(status_code=204)

    @router.get("/api/streams/{name}/snapshot.jpg", response_class=Response,
                responses={**not_found, 503: {"model": Problem}, 200: {"content": {"image/jpeg": {}}}})
    async def snapshot(name: str, boxes: bool = Query(False, description="draw the detections"),
                       main: bool = Query(False, description="with detect_url: the camera's main stream, its newest "
                                          "keyframe decoded at full resolution (no boxes: it is up to a GOP older "
                                          "than the detections)")) -> Response:
        known(name)
        if main and boxes:
            raise Invalid("boxes are drawn on the frames detected on; a main snapshot is a keyframe of another "
                          "stream, up to a GOP older: ask for one or the other", [("boxes", "not with main")])
        got = await target.snapshot(name, boxes, main)
        if got is None:
            raise HTTPException(503, f"stream {name} has no processed frame yet")
        return Response(got[1], media_type="image/jpeg", headers={"Cache-Control": "no-store",
                                                                   "X-Frame-Seq": str(got[0])})

    @router.get("/api/streams/{name}/mjpeg", response_class=StreamingResponse,
                responses={**not_found, 200: {"content": {"multipart/x-mixed-replace": {}}}})
    async def mjpeg(request: Request, name: str, boxes: bool = Query(True, description="draw the detections"),
                    fps: float = Query(mjpeg_fps, gt=0, le=30, description=f"most frames/s (capped at {mjpeg_fps})")
                    ) -> StreamingResponse:
        known(name)
        interval = 1.0 / min(fps, mjpeg_fps)

        async def frames() -> AsyncIterator[bytes]:
            sent = None
            while not closing.is_set() and name in control.streams:
                try:
                    got = await target.snapshot(name, boxes)
                except Exception:  # (a cluster node that does not answer now): try again at the next tick
                    got = None
                if got is not None and got[0] != sent:
                    sent = got[0]
                    yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(got[1])).encode()
                           + b"\r\n\r\n" + got[1] + b"\r\n")
                if await request.is_disconnected():
                    return
                await wait_event(closing, interval)

        return LiveResponse(frames(), media_type="multipart/x-mixed-replace; boundary=frame",
                                 headers=LIVE_HEADERS)

    @router.get("/api/models", response_model=list[ModelInfo], responses=errors, summary="Models streams can use")
    async def models() -> list[ModelInfo]:
        running(target)
        return target.models()

    return router


def sessions_router(target: ControlTarget, control: StreamControl, guarded: list[Any], errors: Errors,
                    closing: asyncio.Event) -> APIRouter:
    router = APIRouter(tags=["talk"], dependencies=guarded)

    @router.get("/api/talk/sessions", response_model=list[SessionInfo], responses=errors)
    async def sessions() -> list[SessionInfo]:
        running(target)
        return target.sessions()

    @router.post("/api/talk/sessions", response_model=SessionInfo, status_code=201,
                 responses={**errors, 409: {"model": Problem}, 400: {"model": Problem}})
    async def start_session(body: NewSession) -> SessionInfo:
        running(target)
        if body.name in target.session_names():
            raise Conflict(f"session {body.name} already exists")
        cfg = session_config(body, control.paths, target.config.lipsync.weights is not None)
        control.persist_session(body.name, cfg)  # first: acknowledged = kept across a restart
        try:
            return await target.start_session(body.name, cfg)
        except Exception as exc:
            control.persist_session(body.name, None)
            if isinstance(exc, HTTPException):
                raise
            raise HTTPException(400, f"session {body.name}: {redact_text(str(exc), target.secret_values())}") \
                from None

    @router.delete("/api/talk/sessions/{name}", status_code=204, responses={**errors, 404: {"model": Problem}})
    async def stop_session(name: str) -> Response:
        running(target)
        if name not in target.session_names():
            raise NotFound(f"no session {name}")
        control.persist_session(name, None)
        await target.stop_session(name)
        return Response(status_code=204)

    @router.post("/api/talk/sessions/{name}/say", response_model=Utterance, status_code=202,
                 responses={**errors, 404: {"model": Problem}, 409: {"model": Problem}},
                 summary="Speak text in a session with pushed audio (audio = \"mqtt\" or \"webrtc\")")
    async def say(name: str, body: Say) -> Utterance:
        running(target)
        return Utterance(id=await target.say(name, body.text, body.voice, body.interrupt))

    @router.delete("/api/talk/sessions/{name}/utterances/current", response_model=Utterance,
                   responses={**errors, 404: {"model": Problem}, 409: {"model": Problem}},
                   summary="Cut what a session is saying (barge-in)")
    async def interrupt(name: str) -> Utterance:
        running(target)
        return Utterance(id=await target.interrupt(name))

    @router.get("/api/talk/sessions/{name}/events", tags=["talk"], response_class=StreamingResponse,
                responses={**errors, 404: {"model": Problem}, 200: {"content": {"text/event-stream": {}}}},
                summary="Server-sent events: a session's utterances (started, finished, interrupted, failed)")
    async def talk_events(name: str, request: Request,
                          after: int | None = Query(None, description="resume after this event's `seq` "
                                                    "(or send Last-Event-ID)")) -> StreamingResponse:
        running(target)
        if after is None:
            last = request.headers.get("last-event-id", "")
            after = int(last) if last.isdigit() else None
        seen = after if after is not None else max((e["seq"] for e in await target.talk_events(name, 0)), default=0)

        async def feed() -> AsyncIterator[bytes]:
            nonlocal seen
            yield b": utterance events\n\n"  # the stream is open (a client can start speaking now)
            while not closing.is_set():
                try:
                    events = await target.talk_events(name, seen)
                except NotFound:
                    yield b"event: end\ndata: {}\n\n"  # the session went away
                    return
                for e in events:
                    seen = max(seen, int(e["seq"]))
                    yield f"id: {e['seq']}\ndata: {json.dumps(e)}\n\n".encode()
                if await request.is_disconnected():
                    return
                await wait_event(closing, TALK_EVENTS_POLL_S)

        return LiveResponse(feed(), media_type="text/event-stream", headers=LIVE_HEADERS)

    add_webrtc_routes(router, target, errors)
    return router


SDP_LIMIT = 64 * 1024  # an SDP offer is a few kB


async def read_sdp(request: Request) -> str:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/sdp":
        raise HTTPException(415, "send the SDP offer as application/sdp")
    body = await request.body()
    if len(body) > SDP_LIMIT:
        raise HTTPException(413, f"SDP offer larger than {SDP_LIMIT} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the SDP offer is not UTF-8") from None


def add_webrtc_routes(router: APIRouter, target: ControlTarget, errors: Errors) -> None:
    """WHEP-style viewing and WHIP-style microphone for sessions with `out`/`audio` = "webrtc": one
    POST with the SDP offer, the answer in the response (201, Location: the peer's resource). On a
    cluster the head relays the signalling to the node that runs the session (the media then flows
    between the browser and that node)."""
    sdp_body = {"content": {"application/sdp": {"schema": {"type": "string"}}}, "required": True}
    sdp_answer: Errors = {201: {"content": {"application/sdp": {"schema": {"type": "string"}}},
                                "description": "the SDP answer"}, 404: {"model": Problem}, 409: {"model": Problem}}

    async def answered(name: str, kind: str, request: Request) -> Response:
        running(target)
        viewer, answer = await target.webrtc_offer(name, kind, await read_sdp(request))
        where = f"/api/talk/sessions/{name}/{kind}" + (f"/{viewer}" if viewer is not None else "")
        return Response(answer, status_code=201, media_type="application/sdp", headers={"Location": where})

    @router.post("/api/talk/sessions/{name}/whep", status_code=201, responses={**errors, **sdp_answer},
                 openapi_extra={"requestBody": sdp_body}, summary="Watch a session (WHEP-style)")
    async def whep(name: str, request: Request) -> Response:
        return await answered(name, "whep", request)

    @router.delete("/api/talk/sessions/{name}/whep/{viewer}", status_code=204,
                   responses={**errors, 404: {"model": Problem}, 409: {"model": Problem}})
    async def whep_leave(name: str, viewer: str) -> Response:
        running(target)
        await target.webrtc_leave(name, viewer)
        return Response(status_code=204)

    @router.post("/api/talk/sessions/{name}/whip", status_code=201, responses={**errors, **sdp_answer},
                 openapi_extra={"requestBody": sdp_body}, summary="Speak to a session (WHIP-style)")
    async def whip(name: str, request: Request) -> Response:
        return await answered(name, "whip", request)


def observe_router(target: ControlTarget, control: StreamControl, guarded: list[Any], errors: Errors,
                   closing: asyncio.Event) -> APIRouter:
    """What an operator watches: devices, the stats payload, stored events and their pictures, the
    page's server-sent feed."""
    router = APIRouter(dependencies=guarded)

    @router.get("/api/devices", response_model=list[DeviceOut], tags=["devices"], responses=errors)
    async def devices() -> list[DeviceOut]:
        running(target)
        return await target.devices()

    moved: Errors = {**errors, 404: {"model": Problem}, 409: {"model": Problem}}
    node_query = Query(None, description="on a cluster: the node of the device (see /api/devices)")

    @router.post("/api/devices/{device}/drain", response_model=Moves, tags=["devices"], responses=moved,
                 summary="Move every stream off a device; nothing is placed there until resumed")
    async def drain(device: str, node: str | None = node_query) -> Moves:
        running(target)
        return Moves(device=device, moved=await target.device_moves(device, node, drain=True))

    @router.post("/api/devices/{device}/resume", response_model=Moves, tags=["devices"], responses=moved,
                 summary="Place streams on a drained device again")
    async def resume(device: str, node: str | None = node_query) -> Moves:
        running(target)
        return Moves(device=device, moved=await target.device_moves(device, node, drain=False))

    @router.get("/api/stats", response_model=StatsPayload | ClusterStatsPayload, tags=["stats"], responses=errors,
                summary="The same figures as the MQTT stats topic (every node's, on a cluster)")
    async def stats() -> StatsPayload | ClusterStatsPayload:
        running(target)
        return await target.stats()

    @router.get("/api/events", response_model=list[EventInfo], tags=["events"], responses=errors,
                summary="Stored events, newest first")
    async def events(stream: str | None = None, label: str | None = None,
                     since: float | None = Query(None, description="unix time"),
                     limit: int = Query(100, ge=1, le=10_000)) -> list[EventInfo]:
        return await target.media.events(stream, label, since, limit)

    @router.get("/api/events/{event_id}/snapshot.jpg", tags=["events"], response_class=Response,
                responses={**errors, 404: {"model": Problem}, 200: {"content": {"image/jpeg": {}}}})
    async def event_snapshot(event_id: str, crop: bool = Query(False, description="the object only")) -> Response:
        jpeg = await target.media.event_snapshot(event_id, crop)
        if jpeg is None:
            raise NotFound(f"no snapshot for event {event_id}")
        return Response(jpeg, media_type="image/jpeg")

    @router.get("/api/events/{event_id}/clip.mp4", tags=["events"], response_class=Response,
                responses={**errors, **MP4_RESPONSES},
                summary="An event's clip (MP4, stream copy of the camera); Range requests let a player seek")
    async def event_clip(event_id: str, request: Request) -> Response:
        clip = await target.media.event_clip(event_id)
        if clip is None:
            raise NotFound(f"no clip for event {event_id}")
        return mp4(clip, event_id, request)

    @router.get("/api/recordings", response_model=list[RecordingInfo], tags=["events"], responses=errors,
                summary="Continuous recording's segments (`record.continuous`), oldest first")
    async def recordings(stream: str | None = None,
                         since: float | None = Query(None, description="unix time: segments ending at or after it"),
                         until: float | None = Query(None, description="unix time: segments starting at or before it"),
                         limit: int = Query(1000, ge=1, le=100_000)) -> list[RecordingInfo]:
        return await target.media.recordings(stream, since, until, limit)

    @router.get("/api/recordings/{segment}.mp4", tags=["events"], response_class=Response,
                responses={**errors, **MP4_RESPONSES},
                summary="One segment of continuous recording (MP4, stream copy); Range requests let a player seek")
    async def recording(segment: str, request: Request) -> Response:
        found = await target.media.recording(segment)
        if found is None:
            raise NotFound(f"no recording {segment}")
        return mp4(found, segment, request)

    @router.get("/api/live", tags=["stats"], response_class=StreamingResponse,
                responses={**errors, 200: {"content": {"text/event-stream": {}}}},
                summary="Server-sent events: streams, devices and stats every second")
    async def live(request: Request) -> StreamingResponse:
        running(target)

        async def feed() -> AsyncIterator[bytes]:
            while not closing.is_set():
                data = {"streams": [i.model_dump() for i in await stream_infos(target, control,
                                                                              sorted(control.streams))],
                        "devices": [d.model_dump() for d in await target.devices()], "mqtt": target.mqtt()}
                yield f"data: {json.dumps(data)}\n\n".encode()
                if await request.is_disconnected():
                    return
                await wait_event(closing, 1.0)

        return LiveResponse(feed(), media_type="text/event-stream", headers=LIVE_HEADERS)

    return router


def add_page(app: FastAPI) -> None:
    """The web page (`/`, plain files, no build step) of one process or a cluster head."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/talk/{name}", include_in_schema=False)
    async def talk_page(name: str) -> FileResponse:
        return FileResponse(STATIC / "talk.html", media_type="text/html")
