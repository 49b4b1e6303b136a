"""The HTTP server: uvicorn in the pipeline's own event loop, on a socket bound before anything loads.

Binding first means a taken port or a refused address is reported at once, with the key to
change (`api.listen`), before minutes of model loading. The server shares the loop with the
pipeline (no second thread touching its state); `closing` ends live views and event streams so
shutdown does not wait for browsers to leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import uvicorn

from pipeline.config import Config
from pipeline.errors import FramegridError
from pipeline.talk.jobs import TalkJobs
from streams.sinks import Encoding

from .app import build_app
from .control import StreamControl
from .routes import TRANSPORT_KEY

if TYPE_CHECKING:
    from pipeline.app import Pipeline

log = logging.getLogger(__name__)


class ApiError(FramegridError):
    pass


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the CLI owns SIGINT/SIGTERM (they stop the pipeline)
        yield


def with_transport(app: Any) -> Any:
    """The ASGI app behind uvicorn, with each HTTP request's connection in its scope (`TRANSPORT_KEY`), so a
    live view can abort the connection of a client that stopped reading (`LiveResponse`)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            transport = getattr(getattr(send, "__self__", None), "transport", None)  # uvicorn's request cycle
            if transport is not None:
                scope = {**scope, TRANSPORT_KEY: transport}
        await app(scope, receive, send)

    return wrapped


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ApiError(f"api.listen {host}:{port}: {exc.strerror or exc} (choose another address or port, or set "
                       "api.enabled = false)") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def jobs_folder(config: Config, config_path: Path | None) -> Path:
    if config.api.jobs_dir is not None:
        return config.api.jobs_dir
    if config_path is not None:
        return config_path.resolve().with_name(config_path.stem + ".jobs")
    from streams import default_state_dir

    return default_state_dir() / "jobs"


class ApiServer:
    """The one HTTP server of framegrid, for one process and for a cluster head alike: serves the app
    `build` makes (uvicorn, in this loop) on `api.listen` and runs the talk-job queue over `back_end`
    (where a job's MuseTalk segments render). `bind()` raises ApiError; `stop()` ends it (`closing`
    ends live views first). `port` is the bound port. Made by `local_api` or
    `pipeline.cluster.api.cluster_api`."""

    def __init__(self, config: Config, control: StreamControl, back_end: JobBackEnd,
                 build: Callable[[TalkJobs, str | None, asyncio.Event, int], Any], config_path: Path | None) -> None:
        self.config = config
        self.control = control
        self.closing = asyncio.Event()
        api = config.api
        self.jobs = TalkJobs(jobs_folder(config, config_path), int(api.max_upload_mb * 1e6), back_end.workers,
                             back_end.lipsync, musetalk_ready=config.lipsync.weights is not None,
                             paths=control.paths, render_always=config.lipsync.offline_render_silence == "always",
                             encoding=Encoding(preset=api.jobs_preset, crf=api.jobs_crf, live=False),
                             speech=config.tts.speech(),
                             max_queued=api.max_queued_jobs)
        self._jobs_started = False
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.app = build(self.jobs, self.token, self.closing, int(api.max_upload_mb * 1e6))

    @property
    def token(self) -> str | None:
        api = self.config.api
        return (api.token.get_secret_value() if api.token is not None else None) or None

    def bind(self) -> None:
        """Take `api.listen` (raises ApiError: taken, refused), before anything else starts."""
        api = self.config.api
        self._sock = bind(api.host, api.port)
        self.port = self._sock.getsockname()[1]

    async def serve(self) -> None:
        """Serve on the bound socket until `stop()`: the CLI runs this in its one TaskGroup."""
        assert self._sock is not None, "bind() first"
        api = self.config.api
        cfg = uvicorn.Config(with_transport(self.app), log_level="warning", access_log=False, lifespan="off",
                             timeout_graceful_shutdown=3, server_header=False)
        self._server = _Server(cfg)
        log.info("api: listening on http://%s:%d (docs /docs, metrics /metrics, page /)", api.host, self.port)
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            self._sock.close()

    async def start(self) -> None:
        """bind() and serve() in a task of its own (for callers without a TaskGroup: tests, tools)."""
        self.bind()
        self._task = asyncio.create_task(self.serve(), name="api.server")

    async def run_jobs(self) -> None:
        """The talk-job queue until cancelled (the CLI runs this in its one TaskGroup once the
        pipeline or head is ready)."""
        await self.jobs.run()

    async def start_jobs(self) -> None:
        """The talk-job queue in a task of its own (for callers without a TaskGroup: tests, tools)."""
        await self.jobs.start()
        self._jobs_started = True

    async def stop(self) -> None:
        self.closing.set()
        if self._jobs_started:
            await self.jobs.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)


class JobBackEnd(Protocol):
    """Where talk jobs render: how many run at once, and the lipsync slots (+ MuseTalk front end)."""

    def workers(self) -> int: ...

    async def lipsync(self) -> Any: ...


class LocalJobs:
    """Talk jobs of one process: on its own lipsync slots."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def workers(self) -> int:
        from pipeline.talk.lipsync import plan_lipsync

        config = self.pipeline.config
        lcfg = config.lipsync
        plans = plan_lipsync(self.pipeline.facts(), lcfg.slot_memory_gb, config.devices.usable_fraction, lcfg.slots)
        return max(1, sum(p.slots for p in plans))

    async def lipsync(self) -> Any:
        return await self.pipeline.talk.ensure_lipsync()


def local_api(pipeline: Pipeline, config_path: Path | None) -> ApiServer:
    """The API of one running pipeline."""
    control = StreamControl(pipeline.running, config_path)

    def build(jobs: TalkJobs, token: str | None, closing: asyncio.Event, max_upload: int) -> Any:
        return build_app(pipeline, control, jobs, token, pipeline.config.api.mjpeg_fps, closing, max_upload)

    return ApiServer(pipeline.config, control, LocalJobs(pipeline), build, config_path)
