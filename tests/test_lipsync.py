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
from pipeline.core.devices import DeviceInfo
from pipeline.talk.lipsync import LipSyncPool, musetalk_pool
from talkinghead import AvatarError, TalkSession, prepare_avatar
from talkinghead.live import MuseTalkLive
from talkinghead.musetalk import LipSyncJob, MuseTalk, MuseTalkSlotModel, ping_pong
from talkinghead.offline import render
from tests.support.media import FrameSink, probe_output, tone_on_off

CPU = [DeviceInfo("cpu", "cpu", "test CPU", 0, 0, cores=2)]



@pytest.fixture(scope="module")
def frontend(tiny: Path) -> MuseTalk:
    m = MuseTalk(tiny, "v15", parts={"vae", "whisper"})
    m.load()
    return m


def test_slot_model_loads_only_what_a_slot_needs(tiny: Path, frontend: MuseTalk) -> None:
    slot = MuseTalkSlotModel(tiny, "v15", threads=1)
    slot.load()
    assert slot.model.unet is not None
    assert slot.model.vae is not None
    assert slot.model.encoder is None
    assert frontend.unet is None
    assert frontend.encoder is not None
    assert slot.memory_bytes() > 0
    assert slot.model.prompt_len == frontend.prompt_len
    slot.warmup()


def test_batches_merge_the_jobs_of_several_sessions(tiny: Path, frontend: MuseTalk) -> None:
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
        assert [len(o) for o in outs] == [4, 4]
        assert outs[0][0].shape == (256, 256, 3)
        pool.release("w")
        snap = pool.snapshot()
        # the free slot took what was ready: one UNet call for both sessions (after the busy one)
        assert snap["batches"] == 2, snap
        assert snap["mean_batch"] == 8, snap
        assert snap["slots"]["lipsync.0"]["sessions"] == ["a", "b"]
        assert snap["slots"]["lipsync.0"]["memory_gb"] > 0  # measured from the loaded model
        c = pool.submit("a", [LipSyncJob(latents, prompt)] * 12)  # more than a batch: still served, whole
        assert len(c.result(30)) == 12
    finally:
        pool.shutdown()


def torch_zeros_latents(m: MuseTalk) -> Any:
    import torch

    return torch.zeros(1, 8, m.latent_side, m.latent_side)


def test_offline_segments_across_slots_have_no_seam(tiny: Path, frontend: MuseTalk, face_image: Path,
                                                    tmp_path: Path) -> None:
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    # 55 frames: speech, 20 silent frames, speech; the model skips the 10 that are more than 5
    # frames away from speech (its 2-frame window and the 3-frame fades fall on the others)
    audio = tone_on_off([(0.6, True), (0.8, False), (0.8, True)])
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
        assert counts == {"frames": 55, "generated": 45, "idle": 10}
        assert len(sink.frames) == 55
        assert all(len(a) == 640 for a in sink.audio)
        used = [s["batches"] for s in snap["slots"].values()]
        assert len(used) == slots
        assert all(b > 0 for b in used)
        outputs[slots] = np.stack(sink.frames).astype(np.int16)
    diff = np.abs(outputs[1] - outputs[2])
    # the same frames in the same order; only float rounding of different thread counts may differ
    assert diff.max() <= 2
    assert diff.mean() < 0.01


def test_live_musetalk_sessions_share_a_slot(tiny: Path, frontend: MuseTalk, face_image: Path,
                                             tmp_path: Path) -> None:
    from streams.sinks import AVSink

    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    faces = ping_pong([frontend.prepare_face(avatar.image, avatar.box)])
    pool = musetalk_pool(LipSyncConfig(weights=tiny, slots=1, batch_size=8, batch_timeout_ms=50),
                         device_facts=CPU).start_in_thread()
    # 2.6 s: 65 frames, 25 silent of which 15 are more than 5 frames from speech (the model skips those)
    audio = tone_on_off([(0.6, True), (1.0, False), (1.0, True)])
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
            assert s.wait(120), s.error
            assert s.state == "ended", s.error
        snap = pool.snapshot()
    finally:
        pool.shutdown()
    for s, out in sessions:
        assert s.stats.frames == 65
        assert s.stats.inferred == 50
        assert s.stats.idle == 15
        assert s.stats.errors == 0
        n, fps, audio_s, _frames = probe_output(out)
        assert (n, fps) == (65, 25.0)
        assert 0 <= audio_s - 2.6 <= 1024 / 16_000
    assert snap["slots"]["lipsync.0"]["frames"] == 100  # both sessions' model frames, on the one slot
    assert sorted(snap["slots"]["lipsync.0"]["sessions"]) == ["s1", "s2"]


HANG_S = 20.0  # how long a hung call sleeps


class Faulty(MuseTalkSlotModel):
    """The real tiny model with one fault from its 3rd batch on (the warm-up is the 1st): `fail` raises
    at every batch from then on (a slot going bad), `hang` does not come back in time once; None: sound."""

    def __init__(self, *args: Any, fault: str | None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fault = fault
        self.calls = 0

    def infer(self, jobs: list[LipSyncJob]) -> list[np.ndarray]:
        self.calls += 1
        if self.fault == "fail" and self.calls >= 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        if self.fault == "hang" and self.calls == 3:
            time.sleep(HANG_S)  # far past the watchdog; finite so the test process can exit
        return super().infer(jobs)


def pool_whose_slot0_fails(tiny: Path) -> tuple[LipSyncPool, list[int]]:
    """Two CPU lipsync slots, started; slot 0's first model fails on its 3rd batch (warm-up is the
    1st), its replacement is sound. Also returns the slot indices models were made for."""
    made: list[int] = []

    def factory(i: int) -> MuseTalkSlotModel:
        made.append(i)
        return Faulty(tiny, "v15", threads=1, fault="fail" if made.count(0) == 1 and i == 0 else None)

    lcfg = LipSyncConfig(weights=tiny, batch_size=4, batch_timeout_ms=10, restart_backoff_cap=1.0)
    pool = LipSyncPool(factory, ["cpu", "cpu"], lcfg.pool_settings(PipelineConfig()), lcfg.max_queue
                       ).start_in_thread()
    return pool, made


def talk_through_a_faulty_slot0(pool: LipSyncPool, frontend: MuseTalk, faces: Any
                                ) -> tuple[FrameSink, TalkSession, dict[str, Any], float]:
    """A 2 s spurt of talk placed on `pool`'s slot 0, run to its end, then the pool's snapshot once
    slot 0 is healthy again (or 30 s passed); the pool is shut down. -> (sink, session, snapshot,
    seconds the session took)."""
    try:
        assert pool.place("talk") == "lipsync.0"
        backend = MuseTalkLive(frontend, faces, lambda jobs: pool.submit("talk", jobs), block=4, timeout=10.0)
        sink = FrameSink()
        session = TalkSession("talk", backend, [tone_on_off([(2.0, True)])], sink, realtime=False)
        t0 = time.monotonic()
        session.start()
        assert session.wait(120), session.error
        assert session.state == "ended", session.error
        took = time.monotonic() - t0
        deadline = time.monotonic() + 30
        while pool.snapshot()["slots"]["lipsync.0"]["state"] != "healthy" and time.monotonic() < deadline:
            time.sleep(0.1)
        return sink, session, pool.snapshot(), took
    finally:
        pool.shutdown()


def test_failing_slot_moves_its_session_and_restarts(tiny: Path, frontend: MuseTalk, face_image: Path,
                                                     tmp_path: Path) -> None:
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    faces = ping_pong([frontend.prepare_face(avatar.image, avatar.box)])
    pool, made = pool_whose_slot0_fails(tiny)
    sink, session, snap, _ = talk_through_a_faulty_slot0(pool, frontend, faces)
    assert len(sink.frames) == 50  # the session never stopped: every 40 ms of audio has its frame
    assert session.stats.errors == 4  # the one failed block showed its last frame
    assert session.stats.inferred == 46
    slots = snap["slots"]
    assert slots["lipsync.0"]["restarts"] == 1
    assert slots["lipsync.0"]["state"] == "healthy"
    assert slots["lipsync.1"]["sessions"] == ["talk"]
    assert slots["lipsync.1"]["frames"] > 0
    assert made.count(0) == 2


def test_hung_lipsync_slot_is_caught_by_the_watchdog(tiny: Path, frontend: MuseTalk, face_image: Path,
                                                     tmp_path: Path) -> None:
    """A lipsync model call that hangs: the slot's watchdog fails that block (the session shows its last
    frame), the session moves to the other slot at once and the hung slot is replaced."""
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    faces = ping_pong([frontend.prepare_face(avatar.image, avatar.box)])
    made: list[int] = []

    def factory(i: int) -> MuseTalkSlotModel:
        made.append(i)
        return Faulty(tiny, "v15", threads=1, fault="hang" if i == 0 and made.count(0) == 1 else None)

    lcfg = LipSyncConfig(weights=tiny, batch_size=4, batch_timeout_ms=10, restart_backoff_cap=1.0, hang_timeout=1.0)
    pool = LipSyncPool(factory, ["cpu", "cpu"], lcfg.pool_settings(PipelineConfig()), lcfg.max_queue).start_in_thread()
    sink, session, snap, took = talk_through_a_faulty_slot0(pool, frontend, faces)
    assert len(sink.frames) == 50
    assert session.stats.errors == 4
    # the session did not wait for the hung call (the watchdog fires after max(1 s, 10x the measured
    # batch time): a few seconds on a loaded 2-core machine, well before the call would return)
    assert took < HANG_S - 5, took
    slots = snap["slots"]
    assert "hang" in (slots["lipsync.0"]["last_error"] or ""), slots["lipsync.0"]
    assert slots["lipsync.0"]["restarts"] == 1
    assert slots["lipsync.1"]["sessions"] == ["talk"]
    assert made.count(0) == 2


def test_pool_threads_are_daemons_and_shutdown_is_clean(tiny: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    pool = musetalk_pool(LipSyncConfig(weights=tiny, slots=1), device_facts=CPU).start_in_thread()
    pool.shutdown()
    time.sleep(0.2)
    assert "lipsync.loop" not in {t.name for t in threading.enumerate()} - before
    assert pool.submit("x", []).exception() is not None  # a closed pool refuses at once


def test_lipsync_slots_are_planned_from_gpu_memory(tiny: Path) -> None:
    """Invented device facts (no GPU is touched before start): slots per GPU from free memory."""
    gb = 2**30
    facts = [DeviceInfo("cuda:0", "cuda", "big GPU", 24 * gb, 24 * gb), DeviceInfo("cuda:1", "cuda", "small GPU",
                                                                                  16 * gb, 16 * gb),
             DeviceInfo("cpu", "cpu", "CPU", 0, 0, cores=16)]
    pool = musetalk_pool(LipSyncConfig(weights=tiny, slot_memory_gb=8.0), device_facts=facts)
    assert pool.n == 3
    assert pool.devices == ["cuda:0", "cuda:0", "cuda:1"]
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


def test_video_avatar_frames_ping_pong_and_cached_latents(frontend: MuseTalk, face_image: Path,
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
    assert len(avatar.frames) == 5
    assert seen[-1] == (5, 5)
    boxes = [a.box for a in avatar.frames]
    assert boxes[2] in (boxes[1], boxes[3])  # the blank frame borrowed a neighbour's face
    assert 6 <= boxes[1][0] - boxes[0][0] <= 10
    assert 14 <= boxes[4][0] - boxes[3][0] + 8 <= 18
    again = prepare_avatar(video, cache_dir=tmp_path / "cache")
    assert [a.box for a in again.frames] == boxes
    assert again.key == avatar.key
    faces = frontend.prepare_faces(avatar, cache_dir=tmp_path / "cache")
    assert len(faces) == 10
    assert [f.box for f in faces] == boxes + boxes[::-1]
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    reloaded = frontend.prepare_faces(avatar, cache_dir=tmp_path / "cache")
    for a, b in zip(faces, reloaded, strict=True):
        assert np.array_equal(a.latents.numpy(), b.latents.numpy())
        assert np.array_equal(a.mask, b.mask)
        assert a.crop == b.crop
    with pytest.raises(AvatarError, match="no face found in any of its 2 frames"):
        prepare_avatar(write_video(tmp_path / "wall.mp4", [blank, blank]), cache_dir=tmp_path / "cache")


async def test_a_talk_job_survives_a_failing_lipsync_slot(tiny: Path, frontend: MuseTalk, face_image: Path,
                                                          tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A MuseTalk job's segment whose slot fails is submitted again and the job completes whole."""
    import asyncio

    from pipeline.talk.jobs import TalkJobs
    from tests.support.media import write_wav

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
    assert "a segment failed" in caplog.text
    assert "submitted again" in caplog.text
    frames, fps, _, _ = probe_output(jobs.video_path(job))
    assert frames == 40
    assert fps == 25
    assert made.count(0) == 2  # slot 0 failed and was restarted


def test_whisper_on_the_slot_gives_the_same_frames(tiny: Path, frontend: MuseTalk, face_image: Path,
                                                    tmp_path: Path) -> None:
    """`lipsync.whisper = "slot"`: the session sends each block's audio window and the slot computes
    the prompts beside the UNet (as on a GPU); the frames are those of session-side prompts."""
    from pipeline.talk.lipsync import whisper_on_slots

    assert whisper_on_slots(LipSyncConfig(), ["cuda:0", "cuda:1"])
    assert not whisper_on_slots(LipSyncConfig(), ["cpu"])
    assert not whisper_on_slots(LipSyncConfig(), ["cuda:0", "cpu"])  # a mixed pool keeps them on the session side
    assert whisper_on_slots(LipSyncConfig(whisper="slot"), ["cpu"])
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    faces = ping_pong([frontend.prepare_face(avatar.image, avatar.box)])
    audio = tone_on_off([(0.6, True), (0.6, False), (0.4, True)])
    frames, memory = {}, {}
    for where in ("session", "slot"):
        pool = musetalk_pool(LipSyncConfig(weights=tiny, slots=1, batch_size=4, whisper=where),  # type: ignore[arg-type]
                             device_facts=CPU).start_in_thread()
        assert pool.whisper_on_slot == (where == "slot")
        try:
            backend = MuseTalkLive(frontend, faces, lambda jobs, p=pool: p.submit("s", jobs), block=4, timeout=10.0,
                                   whisper_on_slot=pool.whisper_on_slot)
            sink = FrameSink()
            session = TalkSession("s", backend, [audio], sink, realtime=False)
            session.start()
            assert session.wait(120), session.error
            assert session.state == "ended", session.error
            slot = pool.pool.slots["lipsync.0"]
            memory[where] = slot.model.memory_bytes()  # type: ignore[union-attr]
        finally:
            pool.shutdown()
        assert session.stats.errors == 0
        frames[where] = np.stack(sink.frames).astype(np.int16)
    diff = np.abs(frames["session"] - frames["slot"])
    assert diff.max() <= 2, (diff.max(), diff.mean())
    assert diff.mean() < 0.01, (diff.max(), diff.mean())  # thread counts' float rounding
    assert memory["slot"] > memory["session"]  # the encoder's weights count in the slot's memory
