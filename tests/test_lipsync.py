"""lipsync executor slots on tiny random MuseTalk models: batching across sessions, offline segments
across slots without a seam, live MuseTalk sessions sharing a slot, and a failing slot."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import LipSyncConfig, PipelineConfig
from pipeline.devices import DeviceInfo
from pipeline.lipsync import LipSyncPool, musetalk_pool
from talkinghead import AvatarError, TalkSession, prepare_avatar
from talkinghead.live import MuseTalkLive
from talkinghead.musetalk import LipSyncJob, MuseTalk, MuseTalkSlotModel, ping_pong
from talkinghead.offline import render

from .test_musetalk import tiny  # noqa: F401 - fixture
from .test_talkinghead import face_image, probe_output, tone_on_off  # noqa: F401 - fixture

CPU = [DeviceInfo("cpu", "cpu", "test CPU", 0, 0, cores=2)]


class FrameSink:
    """Keeps what a session or render writes, uncompressed."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.audio: list[np.ndarray] = []

    def write(self, frame: np.ndarray, audio: np.ndarray) -> None:
        self.frames.append(frame)
        self.audio.append(audio)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def frontend(tiny: Path) -> MuseTalk:  # noqa: F811
    m = MuseTalk(tiny, "v15", parts={"vae", "whisper"})
    m.load()
    return m


def test_slot_model_loads_only_what_a_slot_needs(tiny: Path, frontend: MuseTalk) -> None:  # noqa: F811
    slot = MuseTalkSlotModel(tiny, "v15", threads=1)
    slot.load()
    assert slot.model.unet is not None and slot.model.vae is not None and slot.model.encoder is None
    assert frontend.unet is None and frontend.encoder is not None
    assert slot.memory_bytes() > 0 and slot.model.prompt_len == frontend.prompt_len  # sizes from configs alone
    slot.warmup()


def test_batches_merge_the_jobs_of_several_sessions(tiny: Path, frontend: MuseTalk) -> None:  # noqa: F811
    pool = musetalk_pool(LipSyncConfig(weights=tiny, slots=1, batch_size=8, batch_timeout_ms=500),
                         device_facts=CPU).start_in_thread()
    try:
        latents = torch_zeros_latents(frontend)
        prompt = frontend.audio_prompts(np.zeros(16_000, np.float32))[0]
        jobs = [LipSyncJob(latents, prompt)] * 4
        busy = pool.submit("w", [LipSyncJob(latents, prompt)] * 8)  # occupies the slot for a while
        time.sleep(0.02)
        a = pool.submit("a", jobs)
        b = pool.submit("b", jobs)
        outs = a.result(30), b.result(30)
        assert len(busy.result(30)) == 8
        assert [len(o) for o in outs] == [4, 4] and outs[0][0].shape == (256, 256, 3)
        pool.release("w")
        snap = pool.snapshot()
        # the free slot took what was ready: one UNet call for both sessions (after the busy one)
        assert snap["batches"] == 2 and snap["mean_batch"] == 8, snap
        assert snap["slots"]["lipsync.0"]["sessions"] == ["a", "b"]
        assert snap["slots"]["lipsync.0"]["memory_gb"] > 0  # measured from the loaded model
        c = pool.submit("a", [LipSyncJob(latents, prompt)] * 12)  # more than a batch: still served, whole
        assert len(c.result(30)) == 12
    finally:
        pool.shutdown()


def torch_zeros_latents(m: MuseTalk) -> Any:
    import torch

    return torch.zeros(1, 8, m.latent_side, m.latent_side)


def test_offline_segments_across_slots_have_no_seam(tiny: Path, frontend: MuseTalk, face_image: Path,  # noqa: F811
                                                    tmp_path: Path) -> None:
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    audio = tone_on_off([(0.6, True), (0.2, False), (0.8, True)])  # 40 frames, 5 of them silent
    outputs = {}
    for slots in (1, 2):
        pool = musetalk_pool(LipSyncConfig(weights=tiny, slots=slots, batch_size=4), device_facts=CPU
                             ).start_in_thread()
        try:
            sink = FrameSink()
            counts = render(frontend, avatar, audio, sink, batch_size=4, in_flight=2 * slots,
                            submit=lambda jobs, k, p=pool: p.submit("job", jobs, slot=k))
            snap = pool.snapshot()
        finally:
            pool.shutdown()
        assert counts == {"frames": 40, "generated": 35, "idle": 5}
        assert len(sink.frames) == 40 and all(len(a) == 640 for a in sink.audio)
        used = [s["batches"] for s in snap["slots"].values()]
        assert len(used) == slots and all(b > 0 for b in used)  # every slot took segments
        outputs[slots] = np.stack(sink.frames).astype(np.int16)
    diff = np.abs(outputs[1] - outputs[2])
    # the same frames in the same order; only float rounding of different thread counts may differ
    assert diff.max() <= 2 and diff.mean() < 0.01


def test_live_musetalk_sessions_share_a_slot(tiny: Path, frontend: MuseTalk, face_image: Path,  # noqa: F811
                                             tmp_path: Path) -> None:
    from streams.sinks import AVSink

    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    faces = ping_pong([frontend.prepare_face(avatar.image, avatar.box)])
    pool = musetalk_pool(LipSyncConfig(weights=tiny, slots=1, batch_size=8, batch_timeout_ms=50),
                         device_facts=CPU).start_in_thread()
    audio = tone_on_off([(0.6, True), (0.4, False), (1.0, True)])  # 2 s: 50 frames, 10 silent
    sessions = []
    try:
        for name in ("s1", "s2"):
            backend = MuseTalkLive(frontend, faces, lambda jobs, n=name: pool.submit(n, jobs), block=4,
                                   timeout=10.0)
            w, h = avatar.size
            out = tmp_path / f"{name}.mkv"
            sessions.append((TalkSession(name, backend, [audio], AVSink(str(out), w, h), realtime=False), out))
        for s, _ in sessions:
            s.start()
        for s, _ in sessions:
            assert s.wait(120) and s.state == "ended", s.error
        snap = pool.snapshot()
    finally:
        pool.shutdown()
    for s, out in sessions:
        assert s.stats.frames == 50 and s.stats.inferred == 40 and s.stats.idle == 10 and s.stats.errors == 0
        n, fps, audio_s, frames = probe_output(out)
        assert (n, fps) == (50, 25.0) and 0 <= audio_s - 2.0 <= 1024 / 16_000
    assert snap["slots"]["lipsync.0"]["frames"] == 80  # both sessions' voiced frames, on the one slot
    assert sorted(snap["slots"]["lipsync.0"]["sessions"]) == ["s1", "s2"]


class FailsAfter(MuseTalkSlotModel):
    """The real tiny model, whose calls start raising after `n` batches (a slot going bad)."""

    def __init__(self, *args: Any, n: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.n = n
        self.calls = 0

    def infer(self, jobs: list[LipSyncJob]) -> list[np.ndarray]:
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return super().infer(jobs)


def pool_whose_slot0_fails(tiny: Path) -> tuple[LipSyncPool, list[int]]:  # noqa: F811
    """Two CPU lipsync slots, started; slot 0's first model fails on its 3rd batch (warm-up is the
    1st), its replacement is sound. Also returns the slot indices models were made for."""
    made: list[int] = []

    def factory(i: int) -> MuseTalkSlotModel:
        made.append(i)
        return FailsAfter(tiny, "v15", threads=1, n=2 if made.count(0) == 1 and i == 0 else 10**9)

    lcfg = LipSyncConfig(weights=tiny, batch_size=4, batch_timeout_ms=10, restart_backoff_cap=1.0)
    pool = LipSyncPool(factory, ["cpu", "cpu"], lcfg.pool_settings(PipelineConfig()), lcfg.max_queue
                       ).start_in_thread()
    return pool, made


def test_failing_slot_moves_its_session_and_restarts(tiny: Path, frontend: MuseTalk, face_image: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    faces = ping_pong([frontend.prepare_face(avatar.image, avatar.box)])
    pool, made = pool_whose_slot0_fails(tiny)
    try:
        assert pool.place("talk") == "lipsync.0"
        backend = MuseTalkLive(frontend, faces, lambda jobs: pool.submit("talk", jobs), block=4, timeout=10.0)
        sink = FrameSink()
        session = TalkSession("talk", backend, [tone_on_off([(2.0, True)])], sink, realtime=False)
        session.start()
        assert session.wait(120) and session.state == "ended", session.error
        deadline = time.monotonic() + 30
        while pool.snapshot()["slots"]["lipsync.0"]["state"] != "healthy" and time.monotonic() < deadline:
            time.sleep(0.1)
        snap = pool.snapshot()
    finally:
        pool.shutdown()
    assert len(sink.frames) == 50  # the session never stopped: every 40 ms of audio has its frame
    assert session.stats.errors == 4  # the one failed block showed its last frame
    assert session.stats.inferred == 46
    slots = snap["slots"]
    assert slots["lipsync.0"]["restarts"] == 1 and slots["lipsync.0"]["state"] == "healthy"  # restarted
    assert slots["lipsync.1"]["sessions"] == ["talk"] and slots["lipsync.1"]["frames"] > 0  # moved at once
    assert made.count(0) == 2


def test_pool_threads_are_daemons_and_shutdown_is_clean(tiny: Path) -> None:  # noqa: F811
    before = {t.name for t in threading.enumerate()}
    pool = musetalk_pool(LipSyncConfig(weights=tiny, slots=1), device_facts=CPU).start_in_thread()
    pool.shutdown()
    time.sleep(0.2)
    assert "lipsync.loop" not in {t.name for t in threading.enumerate()} - before
    assert pool.submit("x", []).exception() is not None  # a closed pool refuses at once


def test_lipsync_slots_are_planned_from_gpu_memory(tiny: Path) -> None:  # noqa: F811
    """Invented device facts (no GPU is touched before start): slots per GPU from free memory."""
    gb = 2**30
    facts = [DeviceInfo("cuda:0", "cuda", "big GPU", 24 * gb, 24 * gb), DeviceInfo("cuda:1", "cuda", "small GPU",
                                                                                  16 * gb, 16 * gb),
             DeviceInfo("cpu", "cpu", "CPU", 0, 0, cores=16)]
    pool = musetalk_pool(LipSyncConfig(weights=tiny, slot_memory_gb=8.0), device_facts=facts)
    assert pool.n == 3 and pool.devices == ["cuda:0", "cuda:0", "cuda:1"]  # 21.6 GB -> 2, 14.4 GB -> 1
    assert musetalk_pool(LipSyncConfig(weights=tiny, slots=4), device_facts=facts).devices == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert musetalk_pool(LipSyncConfig(weights=tiny), device_facts=CPU).devices == ["cpu"]
    assert musetalk_pool(LipSyncConfig(weights=tiny, device="cuda:1"), device_facts=facts).devices == ["cuda:1"]


def write_video(path: Path, frames: list[np.ndarray], fps: int = 25) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv444p"
        s.codec_context.options = {"crf": "0"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="bgr24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def test_video_avatar_frames_ping_pong_and_cached_latents(frontend: MuseTalk, face_image: Path,  # noqa: F811
                                                          tmp_path: Path) -> None:
    """A video avatar: a face per frame (a frame without one borrows its neighbour's box), MuseTalk
    latents and masks for every frame in ping-pong order, cached on disk and reloaded unchanged."""
    import cv2

    base = cv2.imread(str(face_image))
    shifted = [np.roll(base, 8 * k, axis=1) for k in range(4)]
    blank = np.full_like(base, 127)
    video = write_video(tmp_path / "anna.mp4", [shifted[0], shifted[1], blank, shifted[2], shifted[3]])
    seen: list[tuple[int, int]] = []
    avatar = prepare_avatar(video, cache_dir=tmp_path / "cache", progress=lambda d, t: seen.append((d, t)))
    assert len(avatar.frames) == 5 and seen[-1] == (5, 5)
    boxes = [a.box for a in avatar.frames]
    assert boxes[2] in (boxes[1], boxes[3])  # the blank frame borrowed a neighbour's face
    assert 6 <= boxes[1][0] - boxes[0][0] <= 10 and 14 <= boxes[4][0] - boxes[3][0] + 8 <= 18  # it follows the face
    again = prepare_avatar(video, cache_dir=tmp_path / "cache")
    assert [a.box for a in again.frames] == boxes and again.key == avatar.key  # from the cache
    faces = frontend.prepare_faces(avatar, cache_dir=tmp_path / "cache")
    assert len(faces) == 10 and [f.box for f in faces] == boxes + boxes[::-1]  # ping-pong
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    reloaded = frontend.prepare_faces(avatar, cache_dir=tmp_path / "cache")
    for a, b in zip(faces, reloaded, strict=True):
        assert np.array_equal(a.latents.numpy(), b.latents.numpy()) and np.array_equal(a.mask, b.mask)
        assert a.crop == b.crop
    with pytest.raises(AvatarError, match="no face found in any of its 2 frames"):
        prepare_avatar(write_video(tmp_path / "wall.mp4", [blank, blank]), cache_dir=tmp_path / "cache")


async def test_a_talk_job_survives_a_failing_lipsync_slot(tiny: Path, frontend: MuseTalk, face_image: Path,  # noqa: F811
                                                          tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A MuseTalk job's segment whose slot fails is submitted again and the job completes whole."""
    import asyncio

    from pipeline.jobs import TalkJobs

    from .test_talkinghead import write_wav

    pool, made = pool_whose_slot0_fails(tiny)

    async def lipsync() -> tuple[LipSyncPool, MuseTalk]:
        return pool, frontend

    wav = write_wav(tmp_path / "speech.wav", tone_on_off([(1.6, True)]), 16_000)
    jobs = TalkJobs(tmp_path / "jobs", 10**8, lambda: 1, lipsync, musetalk_ready=True)
    try:
        await jobs.start()
        job = await jobs.submit(None, None, str(face_image), str(wav), "musetalk")
        deadline = time.monotonic() + 120
        while job.state not in ("done", "failed") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await jobs.close()
    finally:
        pool.shutdown()
    assert job.state == "done", job.error
    assert job.frames == job.total_frames == 40
    assert "a segment failed" in caplog.text and "submitted again" in caplog.text
    frames, fps, _, _ = probe_output(jobs.video_path(job))
    assert frames == 40 and fps == 25
    assert made.count(0) == 2  # slot 0 failed and was restarted
