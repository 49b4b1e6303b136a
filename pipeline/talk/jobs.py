"""Talking-head jobs: a persisted queue of offline renders (avatar + audio -> lip-synced MP4).

`POST /api/talk/jobs` lands here. Each job is a folder under the jobs folder:

    <jobs>/<id>/job.json    its record (state, timing, progress), rewritten atomically
    <jobs>/<id>/avatar.*    the avatar (uploaded or copied from a path on the server)
    <jobs>/<id>/audio.*     the audio
    <jobs>/<id>/out.mp4     the result, once done

Jobs run in parallel, as many as there are lip-sync slots (at least one). A MuseTalk job deals
its segments to every slot (`talkinghead.offline.render`, as `framegrid talk` does) and a
segment whose slot fails is submitted again (up to SEGMENT_TRIES); an energy job renders on a
worker thread. At start-up, jobs found queued or running (the process stopped under them) are
queued again from the start, so an accepted job is never lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.clientpaths import ClientPathError, ClientPaths
from pipeline.config import ApiConfig, LipSyncConfig, TtsConfig, default
from pipeline.errors import Invalid, TooLarge, Unavailable
from streams.disk import disk_state, write_atomic
from streams.sinks import OFFLINE, Encoding
from talkinghead.audio import SAMPLE_RATE
from talkinghead.tts import Speech

log = logging.getLogger(__name__)

SEGMENT_TRIES = 3
CHUNK = 1 << 20
STATES = ("queued", "running", "done", "failed", "cancelled")


@dataclass
class Job:
    id: str
    backend: str
    avatar: str  # file name inside the job's folder
    audio: str
    state: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    frames: int = 0
    total_frames: int | None = None
    error: str | None = None

    def public(self) -> dict[str, Any]:
        progress = 1.0 if self.state == "done" else (self.frames / self.total_frames if self.total_frames else 0.0)
        return {"id": self.id, "state": self.state, "backend": self.backend, "created_at": self.created_at,
                "started_at": self.started_at, "finished_at": self.finished_at, "frames": self.frames,
                "total_frames": self.total_frames, "error": self.error, "progress": round(min(1.0, progress), 4)}


class TalkJobs:
    """The queue. `workers()` is how many jobs run at once; `lipsync()` starts/returns the MuseTalk slots."""

    def __init__(self, folder: Path, max_upload_bytes: int, workers: Callable[[], int],
                 lipsync: Callable[[], Any] | None = None, musetalk_ready: bool = False,
                 paths: ClientPaths | None = None,
                 render_always: bool = default(LipSyncConfig, "offline_render_silence") == "always",
                 max_queued: int = default(ApiConfig, "max_queued_jobs"), encoding: Encoding = OFFLINE,
                 speech: Speech | None = None) -> None:
        """`render_always`: MuseTalk renders silent frames too (`lipsync.offline_render_silence`);
        `encoding`: the videos' x264 settings (`api.jobs_crf`, `api.jobs_preset`)."""
        self.encoding = encoding
        self.speech = speech or TtsConfig().speech()  # jobs from text
        self.folder = folder
        self.disk = disk_state("talk jobs")
        self.render_always = render_always
        self.paths = paths  # where `avatar_path` / `audio_path` may point (None: anywhere, in-process use)
        self.max_upload = max_upload_bytes
        self.workers = workers
        self.lipsync = lipsync  # async () -> (LipSyncPool, MuseTalk front end)
        self.musetalk_ready = musetalk_ready
        self.jobs: dict[str, Job] = {}
        # bounded: a job beyond `max_queued` is refused at submission (nothing stored), or failed with
        # a reason when a restart finds more waiting than the bound
        self._queue: asyncio.Queue[str] = asyncio.Queue(max_queued)
        self._runner: asyncio.Task[None] | None = None  # start()'s task (run() is the caller's)
        self._cancel: dict[str, threading.Event] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the queue until cancelled (a task of the caller's TaskGroup): jobs a previous run left
        are queued again, then `workers()` of them render at once, as tasks of this one's TaskGroup."""
        self._requeue()
        await self._serve()

    async def start(self) -> None:
        """`run()` for a caller without a TaskGroup (tests, tools): returns once the queue is restored;
        `close()` ends it."""
        self._requeue()
        self._runner = asyncio.create_task(self._serve(), name="talk.jobs")

    def _requeue(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for job_file in sorted(self.folder.glob("*/job.json"), key=lambda p: p.stat().st_mtime):
            try:
                job = Job(**json.loads(job_file.read_text("utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("talk job %s: unreadable record, skipped (%s)", job_file.parent.name, exc)
                continue
            self.jobs[job.id] = job
            if job.state in ("queued", "running"):
                if self._queue.full():
                    job.state, job.error = "failed", f"not queued again after a restart: the queue holds " \
                                                     f"{self._queue.maxsize} jobs (api.max_queued_jobs)"
                    self._save(job)
                    log.warning("talk job %s: %s", job.id, job.error)
                    continue
                job.state, job.frames, job.started_at = "queued", 0, None
                self._save(job)
                self._queue.put_nowait(job.id)
                log.info("talk job %s: queued again after a restart", job.id)

    async def _serve(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(max(1, self.workers())):
                    tg.create_task(self._worker(), name=f"talk.jobs[{i}]")
        finally:  # cancelled: renders in progress (on threads) are told to stop
            for ev in self._cancel.values():
                ev.set()

    async def close(self) -> None:
        for ev in self._cancel.values():
            ev.set()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)

    # -- queries -----------------------------------------------------------------------------------
    def list(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created_at)

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def video_path(self, job: Job) -> Path:
        return self.folder / job.id / "out.mp4"

    # -- submission --------------------------------------------------------------------------------
    async def submit(self, avatar: Any, audio: Any, avatar_path: str | None, audio_path: str | None,
                     backend: str, text: str | None = None, voice: str | None = None) -> Job:
        """A job from an avatar and an audio file, or text spoken by espeak-ng (`text`, `voice`)."""
        if text is not None and (audio is not None or audio_path is not None):
            raise Invalid("give audio (audio or audio_path) or text, not both", [("text", "with audio")])
        if backend == "musetalk" and not self.musetalk_ready:
            raise Invalid("backend: musetalk needs lipsync.weights in the config")
        if self._queue.full():  # before the uploads are taken in
            raise self._full()
        job_id = uuid.uuid4().hex[:12]
        folder = self.folder / job_id
        folder.mkdir(parents=True)
        try:
            names = {"avatar": await self._take_input(folder, "avatar", avatar, avatar_path)}
            if text is not None:
                names["audio"] = await asyncio.to_thread(self._speak, folder, text, voice)
            else:
                names["audio"] = await self._take_input(folder, "audio", audio, audio_path)
            await asyncio.to_thread(self._check_inputs, folder / names["avatar"], folder / names["audio"])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = Job(job_id, backend, names["avatar"], names["audio"])
        try:
            self._queue.put_nowait(job_id)
        except asyncio.QueueFull:  # others filled it while this one's files were taken in
            shutil.rmtree(folder, ignore_errors=True)
            raise self._full() from None
        self.jobs[job_id] = job
        self._save(job)
        log.info("talk job %s: queued (%s)", job_id, backend)
        return job

    def _speak(self, folder: Path, text: str, voice: str | None) -> str:
        """`text` spoken by espeak-ng into the job's audio file (16 kHz mono WAV) -> its name."""
        import wave

        from talkinghead.tts import TtsError

        try:
            samples = np.concatenate(list(self.speech.stream(text, voice)))
        except TtsError as exc:
            raise Invalid(f"text: {exc}", [("text", str(exc))]) from None
        with wave.open(str(folder / "audio.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
        return "audio.wav"

    def _full(self) -> Unavailable:
        return Unavailable(f"the talk-job queue is full ({self._queue.maxsize} waiting, api.max_queued_jobs): "
                           "try again when some have rendered")

    async def _take_input(self, folder: Path, kind: str, upload: Any, path: str | None) -> str:
        if (upload is None) == (path is None):
            raise Invalid(f"{kind}: give either an uploaded {kind} file or {kind}_path")
        if path is not None:
            try:
                src = self.paths.file(path) if self.paths is not None else Path(path)
            except ClientPathError as exc:
                raise Invalid(f"{kind}_path: {exc}") from None
            if not src.is_file():
                raise Invalid(f"{kind}_path: file not found: {path}")
            if src.stat().st_size > self.max_upload:
                raise TooLarge(f"{kind}_path: larger than api.max_upload_mb")
            name = f"{kind}{src.suffix.lower()[:8]}"
            await asyncio.to_thread(shutil.copyfile, src, folder / name)
            return name
        suffix = Path(upload.filename or "").suffix.lower()[:8]
        name = f"{kind}{suffix if suffix.isascii() and suffix.replace('.', '').isalnum() else ''}"
        size = 0
        with open(folder / name, "wb") as fh:
            while chunk := await upload.read(CHUNK):
                size += len(chunk)
                if size > self.max_upload:
                    raise TooLarge(f"{kind}: upload larger than api.max_upload_mb "
                                        f"({self.max_upload / 1e6:.0f} MB)")
                fh.write(chunk)
        if size == 0:
            raise Invalid(f"{kind}: empty file")
        return name

    @staticmethod
    def _check_inputs(avatar: Path, audio: Path) -> None:
        """Reject what cannot be rendered now (422), not when the job's turn comes."""
        import av
        import cv2

        from talkinghead import AudioError, load_audio

        try:
            samples = load_audio(audio)
        except (AudioError, OSError, ValueError) as exc:
            raise Invalid(f"audio: not a readable audio file ({exc})") from None
        if len(samples) == 0:
            raise Invalid("audio: no audio samples in the file")
        if cv2.imread(str(avatar)) is None:
            try:
                with av.open(str(avatar)) as c:
                    if not c.streams.video:
                        raise Invalid("avatar: neither an image nor a video")
            except (av.error.FFmpegError, OSError, UnicodeDecodeError):
                raise Invalid("avatar: neither an image nor a video") from None

    async def delete(self, job_id: str) -> bool:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return False
        ev = self._cancel.get(job_id)
        if ev is not None:
            ev.set()
        job.state = "cancelled"
        await asyncio.to_thread(shutil.rmtree, self.folder / job_id, True)
        return True

    # -- running -----------------------------------------------------------------------------------
    def _save(self, job: Job) -> None:
        folder = self.folder / job.id
        if folder.is_dir():
            write_atomic(folder / "job.json", json.dumps(asdict(job)))

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            job = self.jobs.get(job_id)
            if job is None or job.state != "queued":
                continue
            cancel = self._cancel[job_id] = threading.Event()
            job.state, job.started_at, job.error = "running", time.time(), None
            try:  # nothing a job does stops the queue (its TaskGroup is framegrid's)
                self._save(job)
                if job.backend == "musetalk":
                    await self._run_musetalk(job, cancel)
                else:
                    await asyncio.to_thread(self._run_energy, job, cancel)
                if cancel.is_set():
                    continue
                job.state = "done"
                log.info("talk job %s: done (%d frames in %.1f s)", job_id, job.frames,
                         time.time() - (job.started_at or 0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancel.is_set():
                    continue
                job.state, job.error = "failed", str(exc)[:500]
                if self.disk.failed(exc, f"job {job_id}"):
                    job.error = f"the disk is full: {job.error}"[:500]
                log.warning("talk job %s: failed: %s", job_id, job.error)
            finally:
                self._cancel.pop(job_id, None)
                if job.state != "cancelled":
                    job.finished_at = time.time() if job.state in ("done", "failed") else None
                    try:
                        self._save(job)
                    except OSError as exc:  # its record stays as it was; the queue goes on
                        self.disk.failed(exc, f"job {job_id} record")
                        log.warning("talk job %s: record not saved: %s", job_id, exc)
                    else:
                        if job.state == "done":
                            self.disk.wrote()

    def _progress(self, job: Job, cancel: threading.Event) -> Callable[[int, int], None]:
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if cancel.is_set():
                raise RuntimeError("cancelled")
            job.frames, job.total_frames = done, total
            now = time.monotonic()
            if now - last[0] > 1.0:
                last[0] = now
                self._save(job)

        return progress

    def _run_energy(self, job: Job, cancel: threading.Event) -> None:
        from streams.sinks import AVSink
        from talkinghead import SAMPLES_PER_FRAME, EnergyLipSync, TalkSession, load_audio, prepare_avatar

        folder = self.folder / job.id
        samples = load_audio(folder / job.audio)
        total = -(-len(samples) // SAMPLES_PER_FRAME)
        avatar = prepare_avatar(folder / job.avatar, f"job-{job.id}", max_frames=None)  # every frame, offline
        w, h = avatar.size
        sink = AVSink(str(folder / "out.partial.mp4"), w, h, encoding=self.encoding,
                      audio_source=folder / job.audio)  # its own audio, as given
        progress = self._progress(job, cancel)
        chunks = (samples[i:i + SAMPLES_PER_FRAME] for i in range(0, len(samples), SAMPLES_PER_FRAME))
        session = TalkSession(f"job-{job.id}", EnergyLipSync(avatar), chunks, sink, realtime=False,
                              on_frame=lambda i, _level: progress(i + 1, total))
        session.start()
        while not session.wait(0.5):
            if cancel.is_set():
                session.stop()
                return
        if session.state == "failed":
            raise RuntimeError(session.error or "render failed")
        os.replace(folder / "out.partial.mp4", folder / "out.mp4")

    async def _run_musetalk(self, job: Job, cancel: threading.Event) -> None:
        assert self.lipsync is not None
        pool, frontend = await self.lipsync()
        await asyncio.to_thread(self._render_musetalk, job, cancel, pool, frontend)

    def _render_musetalk(self, job: Job, cancel: threading.Event, pool: Any, frontend: Any) -> None:
        from streams.sinks import AVSink
        from talkinghead import load_audio, prepare_avatar
        from talkinghead.offline import render

        folder = self.folder / job.id
        avatar = prepare_avatar(folder / job.avatar, f"job-{job.id}", extra_margin=frontend.extra_margin,
                                max_frames=None)  # every frame, offline
        samples = load_audio(folder / job.audio)
        w, h = avatar.size
        sink = AVSink(str(folder / "out.partial.mp4"), w, h, encoding=self.encoding,
                      audio_source=folder / job.audio)  # its own audio, as given
        key = f"job-{job.id}"

        def submit(jobs: list[Any], k: int) -> concurrent.futures.Future[list[Any]]:
            return _retrying(lambda: pool.submit(key, jobs, slot=k), SEGMENT_TRIES, job.id)

        try:
            render(frontend, avatar, samples, sink, batch_size=pool.settings.batch_size,
                   progress=self._progress(job, cancel), submit=submit, in_flight=2 * pool.n,
                   always=self.render_always)
        finally:
            sink.close()
            with contextlib.suppress(Exception):
                pool.release(key)
        os.replace(folder / "out.partial.mp4", folder / "out.mp4")


def _retrying(call: Callable[[], concurrent.futures.Future[list[Any]]], tries: int,
              job_id: str) -> concurrent.futures.Future[list[Any]]:
    """A segment's future that submits it again when its slot fails (the pool moves it to a healthy slot)."""
    out: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

    def attempt(left: int) -> None:
        fut = call()

        def done(f: concurrent.futures.Future[list[Any]]) -> None:
            exc = f.exception()
            if exc is None:
                out.set_result(f.result())
            elif left > 1:
                log.warning("talk job %s: a segment failed (%s); submitted again", job_id, exc)
                attempt(left - 1)
            else:
                out.set_exception(exc)

        fut.add_done_callback(done)

    attempt(tries)
    return out
