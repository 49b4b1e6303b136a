"""The HTTP API's routes (FastAPI), over the running pipeline's own objects.

Every route reads the one record of its fact (stream records, slot pools, device facts, the
publisher) or calls the pipeline's runtime methods through `StreamControl` (validated,
persisted, then applied). Nothing here keeps state of its own but the live-view cache.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.core import faults
from pipeline.errors import Conflict, Invalid, NotFound, RequestError, TooLarge, Unavailable
from pipeline.talk.jobs import TalkJobs
from streams import redact_text
from talkinghead.tts import MAX_TEXT, VOICE_PATTERN

from .control import StreamControl
from .metrics import make_registry
from .routes import add_page, observe_router, sessions_router, streams_router
from .schemas import (
    Health,
    JobInfo,
    Problem,
    Ready,
)
from .target import LocalTarget
from .views import LatestResults

if TYPE_CHECKING:
    from pipeline.app import Pipeline

STATIC = Path(__file__).parent / "static"
COOKIE = "framegrid_token"


MAX_BODY = 1_000_000  # any other request body (JSON settings are a few kB)


class BodyLimit:
    """ASGI middleware: a request body to `paths` larger than `limit` bytes, or to any other path larger
    than `other` bytes, gets 413 before it is parsed or spooled to disk (by its Content-Length, or
    counted as it arrives when chunked)."""

    def __init__(self, app: Any, limit: int, paths: tuple[str, ...], other: int = MAX_BODY) -> None:
        self.app, self.paths, self.limits = app, paths, (limit, other)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits[0] if scope["method"] == "POST" and scope["path"] in self.paths else self.limits[1]
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await JSONResponse({"detail": f"request body larger than {limit} bytes"}, 413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await JSONResponse({"detail": f"request body larger than {limit} bytes"}, 413)(scope, receive, send)


class _TooLarge(Exception):
    pass


STATUS_OF: dict[type[RequestError], int] = {NotFound: 404, Conflict: 409, Invalid: 422, TooLarge: 413,
                                             Unavailable: 503}


def http_status(exc: RequestError) -> int:
    """The HTTP answer to a refused request: the control plane's one mapping of error kinds."""
    return next((code for kind, code in STATUS_OF.items() if isinstance(exc, kind)), 400)


# -- the app ----------------------------------------------------------------------------------------
def add_job_routes(app: FastAPI, jobs: TalkJobs | None, guarded: list[Any], errors: dict[int | str, dict[str, Any]],
                   secrets: Callable[[], tuple[str, ...]]) -> None:
    """The offline talk-job routes (`/api/talk/jobs...`) over a job queue."""
    def job_info(job: Any) -> JobInfo:
        return JobInfo(**job.public(), video=f"/api/talk/jobs/{job.id}/video" if job.state == "done" else None)

    def jobs_or_503() -> TalkJobs:
        if jobs is None:
            raise HTTPException(503, "talk jobs are not available (no jobs folder)")
        return jobs

    @app.post("/api/talk/jobs", response_model=JobInfo, status_code=201, tags=["talk"], dependencies=guarded,
              responses={**errors, 413: {"model": Problem}}, summary="Queue an offline render")
    async def new_job(avatar: UploadFile | None = File(None, description="a photo or short video"),
                      audio: UploadFile | None = File(None, description="an audio file"),
                      avatar_path: str | None = Form(None, description="or a file on the server"),
                      audio_path: str | None = Form(None, description="or a file on the server"),
                      backend: str = Form("energy", pattern="^(energy|musetalk)$"),
                      text: str | None = Form(None, min_length=1, max_length=MAX_TEXT,
                                              description="or text to speak (espeak-ng or piper) instead of audio"),
                      voice: str | None = Form(None, min_length=1, max_length=64, pattern=VOICE_PATTERN,
                                               description="voice of `text`: espeak-ng's or a [tts.piper] one "
                                               "(default: [tts] voice)")
                      ) -> JobInfo:
        q = jobs_or_503()
        return job_info(await q.submit(avatar, audio, avatar_path, audio_path, backend, text, voice))

    @app.get("/api/talk/jobs", response_model=list[JobInfo], tags=["talk"], dependencies=guarded, responses=errors)
    async def list_jobs() -> list[JobInfo]:
        return [job_info(j) for j in jobs_or_503().list()]

    @app.get("/api/talk/jobs/{job_id}", response_model=JobInfo, tags=["talk"], dependencies=guarded,
             responses={**errors, 404: {"model": Problem}})
    async def get_job(job_id: str) -> JobInfo:
        job = jobs_or_503().get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job_info(job)

    @app.get("/api/talk/jobs/{job_id}/video", tags=["talk"], dependencies=guarded, response_class=FileResponse,
             responses={**errors, 404: {"model": Problem}, 409: {"model": Problem, "description": "not done yet"},
                        200: {"content": {"video/mp4": {}}}})
    async def job_video(job_id: str) -> FileResponse:
        q = jobs_or_503()
        job = q.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if job.state != "done":
            raise HTTPException(409, f"job {job_id} is {job.state}")
        return FileResponse(q.video_path(job), media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.delete("/api/talk/jobs/{job_id}", status_code=204, tags=["talk"], dependencies=guarded,
                responses={**errors, 404: {"model": Problem}}, summary="Cancel (if queued or running) and delete")
    async def delete_job(job_id: str) -> Response:
        if not await jobs_or_503().delete(job_id):
            raise HTTPException(404, f"no job {job_id}")
        return Response(status_code=204)


def base_app(description: str, token: str | None, secrets: Callable[[], tuple[str, ...]],
             not_ready: Callable[[], list[str]]) -> tuple[FastAPI, list[Any], dict[int | str, dict[str, Any]]]:
    """A FastAPI app with framegrid's bearer-token check, error shapes (secrets redacted), offline docs
    page and the open probes (`/api/health`; `/api/ready`, 503 while `not_ready()` names reasons):
    -> (app, the dependencies of a guarded route, the 401 response to document)."""
    started = time.monotonic()
    bearer = HTTPBearer(auto_error=False, description="the [api] token")

    def auth(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = creds.credentials if creds is not None else unquote(request.cookies.get(COOKIE, ""))
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="framegrid", version="1", docs_url=None, redoc_url=None, description=description)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        status = http_status(exc)
        if status == 422 and exc.errors:
            detail: Any = [{"loc": ["body", *k.split(".")], "msg": redact_text(m, secrets()), "type": "value_error"}
                           for k, m in exc.errors]
            return JSONResponse({"detail": detail}, 422)
        return JSONResponse({"detail": redact_text(str(exc), secrets())}, status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": redact_text(str(e.get("msg", "")), secrets()),
                   "type": e.get("type", "value_error")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, 422)

    import fastapi_offline  # swagger-ui shipped as a package: no CDN

    app.mount("/docs-static", StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"),
              name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="framegrid API",
                                   swagger_js_url="/docs-static/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-static/swagger-ui.css",
                                   swagger_favicon_url="/docs-static/favicon.png")

    @app.get("/api/health", response_model=Health, tags=["health"], summary="Liveness")
    async def health() -> Health:
        return Health(status="ok", uptime_s=round(time.monotonic() - started, 1))

    @app.get("/api/ready", response_model=Ready, tags=["health"], summary="Readiness",
             responses={503: {"model": Ready, "description": "not ready"}})
    async def ready(response: Response) -> Ready:
        reasons = not_ready()
        if reasons:
            response.status_code = 503
        return Ready(ready=not reasons, reasons=reasons)

    return app, [Depends(auth)], {401: {"model": Problem, "description": "missing or wrong token"}}


def build_app(pipeline: Pipeline, control: StreamControl, jobs: TalkJobs | None, token: str | None,
              mjpeg_fps: float, closing: asyncio.Event, max_upload: int = 50_000_000) -> FastAPI:
    """The API over `pipeline` (running or about to). `closing` ends live streams at shutdown."""
    latest = LatestResults()
    pipeline.results.add_sink(latest)
    registry, latency = make_registry(pipeline, lambda: facts_now)
    pipeline.results.add_sink(latency)
    facts_now: list[Any] = []
    def secrets():
        return tuple(pipeline.secrets)
    def not_ready() -> list[str]:
        reasons = []
        if not pipeline.ready.is_set():
            reasons.append("starting")
        else:
            for name, r in pipeline.streams.items():
                pool = pipeline.models.pool(r.model)
                if pool is None or pool.slot_of(name) is None:
                    reasons.append(f"stream {name}: no executor slot ({r.state.value})")
            c = pipeline.publisher.counters()
            if not c["connected"] and c["buffered"] >= pipeline.config.mqtt.buffer:
                reasons.append("mqtt: disconnected and its buffer is full")
        return reasons

    app, guarded, errors = base_app("Control a running framegrid: streams, devices, stats, talking heads.", token,
                                    secrets, not_ready)
    # a job carries two files of at most max_upload each, plus the form's own framing
    app.add_middleware(BodyLimit, limit=2 * max_upload + 64 * 1024, paths=("/api/talk/jobs",))

    def running() -> None:
        if not pipeline.ready.is_set():
            raise HTTPException(503, "starting")

    target = LocalTarget(pipeline, latest, latency)
    app.include_router(streams_router(target, control, guarded, errors, mjpeg_fps, closing))
    app.include_router(sessions_router(target, control, guarded, errors, closing))

    app.include_router(observe_router(target, control, guarded, errors, closing))

    if faults.ENABLED:  # test-only (FRAMEGRID_FAULTS=1): the soak tool's executor-slot faults
        @app.post("/api/faults/slots/{slot}", status_code=204, tags=["faults"], dependencies=guarded,
                  include_in_schema=False)
        async def fault(slot: str, kind: str) -> Response:
            running()
            if not any(slot in pool.slots for pool in pipeline.all_pools().values()):
                raise HTTPException(404, f"no slot {slot}")
            try:
                faults.arm(slot, kind)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            return Response(status_code=204)

    # -- stats and metrics ---------------------------------------------------------------------
    @app.get("/metrics", tags=["stats"], dependencies=guarded, response_class=Response,
             responses={**errors, 200: {"content": {CONTENT_TYPE_LATEST: {}}}}, summary="Prometheus metrics")
    async def metrics() -> Response:
        nonlocal facts_now
        if pipeline.ready.is_set():
            facts_now = await target.device_facts()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    add_job_routes(app, jobs, guarded, errors, secrets)

    add_page(app)

    return app
