"""Talking heads with the energy backend: avatar preparation, A/V output, lip sync, bad input."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from streams.sinks import AVSink, SinkError
from talkinghead import (
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AudioError,
    AvatarError,
    EnergyLipSync,
    PushAudio,
    TalkSession,
    load_audio,
    musetalk_box,
    prepare_avatar,
)
from tests.support.media import probe_output, tone_on_off, wait_until_stable, write_wav, x264_settings


def test_avatar_box_follows_musetalk_rule(face_image: Path, tmp_path: Path) -> None:
    av1 = prepare_avatar(face_image, cache_dir=tmp_path)
    lm = av1.landmarks
    assert lm is not None
    assert lm.shape == (68, 2)
    x1, y1, x2, y2 = av1.box
    chin, nose = lm[:, 1].max(), lm[29, 1]
    assert y1 == int(nose - (chin - nose))  # the chin mirrored above the nose
    assert y2 == int(chin) + 10  # v1.5's extra margin
    assert (x1, x2) == (int(lm[:, 0].min()), int(lm[:, 0].max()))
    assert musetalk_box(lm, 512, 512, 0)[3] == int(chin)  # v1.0: no margin
    mx1, my1, mx2, my2 = av1.mouth
    assert x1 < mx1 < mx2 < x2
    assert nose < my1 < my2 < y2
    # cached: same result without detection; a manual box overrides detection
    t = time.perf_counter()
    again = prepare_avatar(face_image, cache_dir=tmp_path)
    assert again.box == av1.box
    assert time.perf_counter() - t < 0.5
    manual = prepare_avatar(face_image, box=(150, 60, 290, 220), cache_dir=tmp_path)
    assert manual.box == (150, 60, 290, 220)
    assert manual.landmarks is None


def test_bad_avatar_and_audio_inputs(tmp_path: Path) -> None:
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 180, np.uint8))
    with pytest.raises(AvatarError, match="no face found"):
        prepare_avatar(blank, cache_dir=tmp_path)
    with pytest.raises(AvatarError, match="outside the 256x256 image"):
        prepare_avatar(blank, box=(0, 0, 300, 100), cache_dir=tmp_path)
    with pytest.raises(AvatarError, match="image not found"):
        prepare_avatar(tmp_path / "missing.png", cache_dir=tmp_path)
    corrupt = tmp_path / "speech.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 10)
    with pytest.raises(AudioError, match=r"speech\.wav"):
        load_audio(corrupt)


def test_audio_is_resampled_to_16k_mono(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "44k.wav", tone_on_off([(1.0, True)], 44_100), 44_100)
    audio = load_audio(wav)
    assert abs(len(audio) - SAMPLE_RATE) <= SAMPLES_PER_FRAME  # one second, at 16 kHz
    assert 0.3 < np.abs(audio).max() <= 0.51


def test_offline_session_writes_av_in_sync(face_image: Path, tmp_path: Path) -> None:
    """The tone switches on and off; the mouth opens and closes on the same frames (within one)."""
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    backend = EnergyLipSync(avatar)
    pattern = [(0.6, False), (0.8, True), (0.6, False), (0.4, True), (0.4, False)]
    audio = tone_on_off(pattern)
    out = tmp_path / "talk.mp4"
    w, h = avatar.size
    opened: list[float] = []
    session = TalkSession("t", backend, [audio], AVSink(str(out), w, h), realtime=False,
                          on_frame=lambda i, lvl: opened.append(lvl))
    session.start()
    assert session.wait(60), session.error
    assert session.state == "ended", session.error
    n, fps, audio_s, frames = probe_output(out)
    duration = len(audio) / SAMPLE_RATE
    assert fps == FPS
    assert abs(n - duration * FPS) <= 1
    assert abs(audio_s - duration) <= 1 / FPS + 0.025  # AAC priming aside, all of the input's audio
    # mouth motion measured on the decoded output, against the avatar's own mouth
    x1, y1, x2, y2 = avatar.mouth
    pad = (y2 - y1)
    still = avatar.image[y1 - pad:y2 + 2 * pad, x1:x2].astype(np.float32)
    motion = np.array([np.abs(f[y1 - pad:y2 + 2 * pad, x1:x2].astype(np.float32) - still).mean() for f in frames])
    moving = motion > (motion.min() + 0.5 * (motion.max() - motion.min()))
    envelope = np.array([np.sqrt(np.mean(audio[i * SAMPLES_PER_FRAME:(i + 1) * SAMPLES_PER_FRAME] ** 2)) > 0.05
                         for i in range(n)])
    edges_audio = np.flatnonzero(np.diff(envelope.astype(int)))
    edges_mouth = np.flatnonzero(np.diff(moving.astype(int)))
    assert len(edges_audio) == len(edges_mouth) == 4, (edges_audio, edges_mouth)
    assert np.abs(edges_audio - edges_mouth).max() <= 1
    assert session.stats.idle > 0
    assert session.stats.inferred > 0
    assert session.stats.late == 0


def test_live_session_with_pushed_pcm_to_hls(face_image: Path, tmp_path: Path) -> None:
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    push = PushAudio()
    playlist = tmp_path / "hls" / "index.m3u8"
    w, h = avatar.size
    session = TalkSession("live", EnergyLipSync(avatar), push, AVSink(str(playlist), w, h), realtime=True)
    session.start()
    pcm = (tone_on_off([(0.5, True), (0.5, False)] * 2) * 32767).astype("<i2").tobytes()
    for i in range(0, len(pcm), 3200):  # 100 ms chunks, as a TTS engine would push them
        push.push_pcm16(pcm[i:i + 3200])
        time.sleep(0.05)
    push.close()
    assert session.wait(30), session.error
    assert session.state in ("ended", "degraded"), session.error
    assert playlist.is_file()
    assert list(playlist.parent.glob("*.ts"))
    n, fps, audio_s, _ = probe_output(playlist)
    # all 2 s of pushed audio, plus any 40 ms of silence the session emitted while waiting for data
    assert fps == FPS
    assert 2.0 * FPS <= n <= 2.0 * FPS + 3
    # audio and video end together; MPEG-TS keeps AAC's priming (64 ms at 16 kHz) and final padding
    assert -1 / FPS <= audio_s - n / FPS <= 0.13
    snap = session.snapshot()
    assert snap["frames"] == n
    assert snap["output_fps"]
    assert snap["render_ms_p50"] is not None
    # audio-in to frame-out: pushed 2x faster than real time, so chunks wait their turn (< 2 s)
    assert 0 < snap["latency_ms_p50"] <= snap["latency_ms_p95"] < 2500


def test_sink_that_goes_away_fails_only_its_session(face_image: Path, tmp_path: Path) -> None:
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    with pytest.raises(SinkError, match="cannot open"):
        AVSink("rtsp://127.0.0.1:9/nothing-listens", 320, 240, timeout=2)

    class Breaks:
        def __init__(self) -> None:
            self.n = 0

        def write(self, frame: np.ndarray, audio: np.ndarray) -> None:
            self.n += 1
            if self.n > 5:
                raise SinkError("sink rtsp://127.0.0.1/x: write failed: Broken pipe")

        def close(self) -> None:
            pass

    w, h = avatar.size
    audio = tone_on_off([(1.0, True)])
    bad = TalkSession("bad", EnergyLipSync(avatar), [audio], Breaks(), realtime=False)
    good = TalkSession("good", EnergyLipSync(avatar), [audio], AVSink(str(tmp_path / "ok.mkv"), w, h),
                       realtime=False)
    bad.start()
    good.start()
    assert bad.wait(30)
    assert good.wait(30)
    assert bad.state == "failed"
    assert "Broken pipe" in (bad.error or "")
    assert good.state == "ended"
    assert good.stats.frames == 25


def test_live_session_pushes_to_rtsp_record_server(face_image: Path, tmp_path: Path) -> None:
    """ANNOUNCE/RECORD to a real gst-rtsp-server: what it received has 25 fps video and all the audio."""
    from tools.servers import RtspServer

    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    received = tmp_path / "received.mkv"
    server = RtspServer({}, records={"anna": received})
    server.start()
    try:
        w, h = avatar.size
        audio = tone_on_off([(0.6, True), (0.4, False), (1.0, True)])
        session = TalkSession("push", EnergyLipSync(avatar), [audio], AVSink(server.url("anna"), w, h),
                              realtime=True)
        session.start()
        assert session.wait(30), session.error
        assert session.state == "ended", session.error
        wait_until_stable(received)  # the server drains and finalises the file after TEARDOWN
    finally:
        server.kill()
    n, fps, audio_s, _ = probe_output(received)
    assert fps == FPS
    assert n == 50
    # all the audio: RTP carries whole AAC frames (1024 samples), so the last one arrives with the
    # encoder's padding (2.0 s -> 32 frames = 2.048 s); nothing may be missing
    assert 0.0 <= audio_s - 2.0 <= 1024 / SAMPLE_RATE


def test_pushed_audio_refuses_bad_chunks_by_reason_and_keeps_the_rest() -> None:
    from talkinghead.audio import AudioError, PushAudio

    def framed(seq: int, rate: int, body: bytes) -> bytes:
        return b"FGA1" + seq.to_bytes(4, "little") + rate.to_bytes(4, "little") + body

    push = PushAudio()
    tick = (np.full(640, 1000, "<i2")).tobytes()
    cases = [(tick, None), (b"\x01\x02\x03", "malformed"), (bytes(64_002), "oversized"), (bytes(64_000), None),
             (framed(5, 16_000, tick), None), (framed(5, 16_000, tick), "out_of_order"), (framed(4, 16_000, tick),
             "out_of_order"), (framed(6, 8_000, tick), "wrong_rate"), (framed(9, 16_000, tick), None),
             (b"FGA1\x00\x00", "malformed"), (framed(10, 16_000, b"\x00"), "malformed"),
             (framed(10, 16_000, tick), None)]  # the refused body did not take sequence number 10
    for payload, reason in cases:
        if reason is None:
            push.push_payload(payload)
        else:
            with pytest.raises(AudioError) as err:
                push.push_payload(payload)
            assert err.value.reason == reason
    assert push.rejected_by == {"malformed": 3, "oversized": 1, "wrong_rate": 1, "out_of_order": 2}
    assert push.gaps == 3  # 6, 7 and 8 never came (6 came at the wrong rate)
    chunks = []
    while (c := push.pop()) is not None:
        chunks.append(c)
    assert len(chunks) == 1 + 50 + 1 + 1 + 1  # 40 ms + 2 s + three framed 40 ms: only accepted audio
    assert np.allclose(chunks[0], 1000 / 32768)


def counting_chunk(k: int) -> bytes:
    """Pushed PCM for chunk `k` of a counting "speech": every sample holds (k + 1) / 1000."""
    return (np.full(SAMPLES_PER_FRAME, (k + 1) / 1000) * 32767).astype("<i2").tobytes()


def chunk_values(chunks: list[np.ndarray]) -> list[int]:
    """Which counting chunk each of `chunks` is (k + 1; 0 for silence), read from its first sample."""
    return [round(float(c[0]) * 1000) for c in chunks]


class SlowBlocks:
    """A block backend that takes `cost` seconds per block and records what each block was given;
    its frames carry the index of the chunk they were made from (fillers: -1)."""

    name = "slow-blocks"

    def __init__(self, block: int, lookahead: int, cost: float) -> None:
        self.block, self.lookahead, self.cost = block, lookahead, cost
        self.calls: list[tuple[int, int]] = []  # (chunks, lookahead chunks) per voiced block
        self.skipped = 0  # chunks the session could not render in time

    def render_block(self, chunks: list[np.ndarray], voiced: list[bool], ahead: list[np.ndarray]) -> list[np.ndarray]:
        if any(voiced[:len(chunks)]):
            self.calls.append((len(chunks), len(ahead)))
            time.sleep(self.cost)
        return [np.full((2, 2), c[0] if c.any() else -1, np.float32) for c in chunks]

    def idle_frame(self) -> np.ndarray:
        return np.full((2, 2), -1, np.float32)

    def skip(self, chunks: list[np.ndarray], voiced: list[bool]) -> None:
        self.skipped += len(chunks)


def test_pushed_live_audio_keeps_its_lookahead_and_is_never_late() -> None:
    """Audio pushed in real time (a microphone over WebRTC) into a block backend that needs 5 chunks
    after each block of 4 and takes 100 ms per block: the session delays the spurt by filler frames
    until block and lookahead are in, plus a render's length; then every block gets its whole
    lookahead, no frame is late, and the audio comes out whole and in order."""
    from tests.support.media import FrameSink

    backend = SlowBlocks(block=4, lookahead=5, cost=0.1)
    push, sink = PushAudio(), FrameSink()
    session = TalkSession("mic", backend, push, sink, realtime=True)
    session.start()
    n = 75  # 3 s of "speech": chunk k holds the value k + 1 throughout
    t0 = time.monotonic()
    for k in range(n):
        push.push_pcm16(counting_chunk(k))
        time.sleep(max(0.0, t0 + (k + 1) / FPS - time.monotonic()))
    time.sleep(1.0)
    push.close()
    assert session.wait(10), session.error
    assert session.state == "ended", session.error
    assert session.stats.late == 0, session.snapshot()
    full = [c for c in backend.calls[:-3]]  # the last blocks of the spurt have no audio after them
    assert full, backend.calls
    assert all(c == (4, 5) for c in full), backend.calls
    values = chunk_values(sink.audio)
    spoken = [v for v in values if v > 0]
    assert spoken == list(range(1, n + 1))  # whole and in order, fillers (silence) only before and after
    first = values.index(1)
    assert all(v == 0 for v in values[:first])
    assert values[first:first + n] == spoken
    # the spurt plays (4 + 5 - 1) frames plus a render behind its arrival: well under a second
    assert 9 <= first <= 9 + 25, first


async def test_the_talk_job_queue_is_bounded_and_says_so(face_image: Path, tmp_path: Path) -> None:
    """Beyond `api.max_queued_jobs` waiting jobs a new one is refused (nothing stored); a restart that
    finds more waiting than the bound fails the rest with the reason instead of growing the queue."""
    from pipeline.errors import Unavailable
    from pipeline.talk.jobs import TalkJobs

    wav = write_wav(tmp_path / "a.wav", tone_on_off([(0.4, True)]), 16_000)
    folder = tmp_path / "jobs"
    jobs = TalkJobs(folder, 10**8, lambda: 1, max_queued=2)  # not started: nothing renders, jobs wait
    first = await jobs.submit(None, None, str(face_image), str(wav), "energy")
    second = await jobs.submit(None, None, str(face_image), str(wav), "energy")
    with pytest.raises(Unavailable, match=r"queue is full \(2 waiting, api.max_queued_jobs\)"):
        await jobs.submit(None, None, str(face_image), str(wav), "energy")
    assert sorted(p.name for p in folder.iterdir()) == sorted([first.id, second.id])  # the refused one left nothing
    again = TalkJobs(folder, 10**8, lambda: 1, max_queued=1)
    await again.start()
    try:
        states = sorted((j.state, j.error or "") for j in again.list())
        assert states[0] == ("failed", "not queued again after a restart: the queue holds 1 jobs "
                                       "(api.max_queued_jobs)"), states
    finally:
        await again.close()


def test_a_file_is_encoded_as_musetalk_publishes_and_a_live_output_for_latency(face_image: Path,
                                                                              tmp_path: Path) -> None:
    """`framegrid talk` to an .mp4: x264 CRF 18, preset medium (subme 7, 16 reference frames would be
    slower presets), keyframes where x264 wants them (keyint 250); to an HLS playlist: ultrafast
    (subme 0), zerolatency, a keyframe every second (keyint 25)."""
    from pipeline.cli import main

    audio = tmp_path / "a.wav"
    write_wav(audio, tone_on_off([(0.3, False), (0.5, True), (0.2, False)]), SAMPLE_RATE)
    out = tmp_path / "talk.mp4"
    assert main(["talk", "--avatar", str(face_image), "--audio", str(audio), "--out", str(out)]) == 0
    offline = x264_settings(out)
    assert offline["rc"] == "crf"
    assert offline["crf"] == "18.0"
    assert offline["subme"] == "7"  # medium
    assert offline["keyint"] == "250"
    assert main(["talk", "--avatar", str(face_image), "--audio", str(audio), "--out", str(out), "--crf", "28",
                 "--preset", "veryfast"]) == 0
    chosen = x264_settings(out)
    assert chosen["crf"] == "28.0"
    assert chosen["subme"] == "2"  # veryfast
    hls = tmp_path / "hls" / "live.m3u8"
    assert main(["talk", "--avatar", str(face_image), "--audio", str(audio), "--out", str(hls)]) == 0
    live = x264_settings(next(hls.parent.glob("*.ts")))
    assert live["subme"] == "0"  # ultrafast
    assert live["keyint"] == "25"
    assert live["bframes"] == "0"  # zerolatency: no B-frames, sliced threads
    assert live["sliced_threads"] == "1"
    assert offline["bframes"] == "3"


def test_a_file_keeps_the_input_audio_as_given(face_image: Path, tmp_path: Path) -> None:
    """44.1 kHz stereo in (a different tone per channel): the file carries 44.1 kHz stereo, both
    channels the input's (correlation after AAC >= 0.98), all of it; a live output stays 16 kHz mono."""
    import wave

    import av

    rate, seconds = 44_100, 1.6
    t = np.arange(round(rate * seconds)) / rate
    left, right = 0.4 * np.sin(2 * np.pi * 220 * t), 0.4 * np.sin(2 * np.pi * 330 * t) * (t > 0.5)
    wav = tmp_path / "stereo.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.stack([left, right], axis=1) * 32767).astype("<i2").tobytes())
    from pipeline.cli import main

    out = tmp_path / "talk.mp4"
    assert main(["talk", "--avatar", str(face_image), "--audio", str(wav), "--out", str(out)]) == 0
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert a.codec_context.sample_rate == rate
        assert a.codec_context.channels == 2
        got = np.concatenate([f.to_ndarray() for f in c.decode(a)], axis=1)  # (2, n), planar float
    n, fps, _, _ = probe_output(out)
    assert n == round(seconds * fps)
    assert abs(got.shape[1] / rate - seconds) < 0.05  # all of it (AAC frames of 1024 aside)
    for ch, src in enumerate((left, right)):  # aligned on the encoder's delay, then compared
        lag = max(range(0, 2049), key=lambda k: float(np.dot(got[ch, k:k + 20000], src[:20000])))
        seg = got[ch, lag:lag + len(src) - 4096]
        assert np.corrcoef(seg, src[:len(seg)])[0, 1] >= 0.98, ch
    hls = tmp_path / "hls" / "live.m3u8"
    assert main(["talk", "--avatar", str(face_image), "--audio", str(wav), "--out", str(hls)]) == 0
    with av.open(str(next(hls.parent.glob("*.ts")))) as c:
        assert c.streams.audio[0].codec_context.sample_rate == SAMPLE_RATE
        assert c.streams.audio[0].codec_context.channels == 1


def test_speech_is_streamed_at_16k_and_says_what_is_wrong() -> None:
    """espeak-ng's speech comes in blocks while it synthesises, at the session rate; an unknown voice,
    empty text, too long a text and a missing engine each give a clear error."""
    from talkinghead.tts import MAX_TEXT, Speech, TtsError

    speech = Speech("en", 170)
    blocks = list(speech.stream("Hello there, this is a test of streamed speech."))
    assert len(blocks) > 5  # not one block at the end
    audio = np.concatenate(blocks)
    assert audio.dtype == np.float32
    assert 1.5 < len(audio) / SAMPLE_RATE < 6  # a sentence at 170 words per minute
    assert np.sqrt(np.mean(audio ** 2)) > 0.02
    for text, voice, message in (("hi", "xx-none", "voice 'xx-none'"), ("  ", None, "empty"),
                                 ("a" * (MAX_TEXT + 1), None, "at most")):
        with pytest.raises(TtsError, match=message):
            list(speech.stream(text, voice))
    with pytest.raises(TtsError, match="apt install espeak-ng"):
        list(Speech("en", 170, binary="no-such-tts").stream("hi"))


def test_a_piper_voice_speaks_through_the_piper_package(tmp_path: Path) -> None:
    """A configured piper voice (a tiny one with piper's interface, `tools/make_tiny_piper.py`) is run by
    the real `piper` package: phonemised with its espeak-ng data, one sentence at a time, resampled
    from the voice's 22.05 kHz to 16 kHz, paced by `speed`; espeak-ng voices still work beside it; a
    missing voice file says what to download."""
    from piper import PiperVoice

    from talkinghead.tts import Speech, TtsError
    from tools.make_tiny_piper import HOP, make

    path = make(tmp_path / "voices")
    speech = Speech("tiny", 170, {"tiny": path})
    text = "Hello there. This is a second sentence."
    blocks = list(speech.stream(text))
    assert len(blocks) >= 2  # a sentence at a time
    voice = PiperVoice.load(path)
    expected = sum(len(voice.phonemes_to_ids(p)) for p in voice.phonemize(text))  # the voice's own phoneme ids
    audio = np.concatenate(blocks)
    assert abs(len(audio) - expected * HOP * SAMPLE_RATE / 22050) < 64, (len(audio), expected)
    first = audio[: int(HOP * SAMPLE_RATE / 22050)]  # the first phoneme id: BOS (^ = id 1): 132 Hz
    spectrum = np.abs(np.fft.rfft(first * np.hanning(len(first)), 8192))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / 8192 - 132) < 6
    fast = np.concatenate(list(Speech("tiny", 340, {"tiny": path}).stream(text)))
    assert abs(len(fast) / len(audio) - 0.5) < 0.02  # twice the words per minute: half the length
    assert len(np.concatenate(list(speech.stream("Hi.", "en")))) > 0  # espeak-ng beside it
    with pytest.raises(TtsError, match="piper-voices"):
        list(Speech("gone", 170, {"gone": tmp_path / "gone.onnx"}).stream("Hi."))


class StallingBlocks(SlowBlocks):
    """SlowBlocks whose fifth voiced block takes 1.5 s: the writer runs out of frames meanwhile."""

    def __init__(self) -> None:
        super().__init__(block=4, lookahead=5, cost=0.01)
        self.stalling = threading.Event()
        self.stalled = threading.Event()  # the stall is over
        self.stalled_values: list[int] = []  # what the stalled block's chunks hold

    def render_block(self, chunks: list[np.ndarray], voiced: list[bool], ahead: list[np.ndarray]) -> list[np.ndarray]:
        if any(voiced[:len(chunks)]) and len(self.calls) == 4:
            self.stalled_values = chunk_values(chunks)
            self.stalling.set()
            time.sleep(1.5)
            self.stalled.set()
        return super().render_block(chunks, voiced, ahead)


def test_a_cut_while_the_writer_waits_for_a_render_fades_out_at_once() -> None:
    """A model slower than real time leaves the writer sending the block in render's chunks on the
    last frame; a cut then fades the next two of them out at once, on the last frame written, instead
    of after the render (here 1.5 s; ~140 ms a block for the tiny MuseTalk on two cores), and drops the
    rest."""
    from tests.support.media import FrameSink

    backend = StallingBlocks()
    push, sink = PushAudio(), FrameSink()
    session = TalkSession("stall", backend, push, sink, realtime=True)
    session.start()
    t0 = time.monotonic()
    for k in range(60):  # 2.4 s of "speech", chunk k holds k + 1
        push.push_pcm16(counting_chunk(k))
        while time.monotonic() < t0 + (k + 1) / FPS and not (backend.stalling.is_set() and session._written_ahead):
            time.sleep(0.002)
        if backend.stalling.is_set() and session._written_ahead:
            break  # the writer has sent a chunk of the stalled block on a repeated frame
    assert backend.stalling.is_set()
    written, cut_at = len(sink.times), time.monotonic()
    push.cut(2)
    assert not backend.stalled.is_set(), "the stall ended before the cut: the writer was not waiting"
    time.sleep(1.8)
    push.close()
    assert session.wait(10), session.error
    assert len(sink.times) > written, "nothing written after the cut"
    assert sink.times[written] - cut_at < 0.1, sink.times[written] - cut_at  # not at the stall's end
    loud = [i for i in range(written, len(sink.audio)) if np.abs(sink.audio[i]).max() > 1e-4]
    assert loud == [written, written + 1], loud  # the two faded chunks, then silence
    assert sink.audio[written + 1][-1] < 0.05 * sink.audio[written][0]  # faded out
    assert np.array_equal(sink.frames[written], sink.frames[written - 1])  # on the last frame written
    assert session.stats.cut > 0, session.snapshot()


def test_a_cut_reaches_into_the_block_and_lookahead_a_session_holds() -> None:
    """Barge-in on a block backend (block 4, lookahead 5): the session holds frames rendered but not
    written (its margin and blocks in the writer) and up to 9 chunks it has not rendered; a cut fades the
    first two of all these and drops the rest with the queue, so after the cut only those two play (and
    one the writer may be writing). Before, the writer's frames all played (12 after the cut, then 6)."""
    from tests.support.media import FrameSink

    backend = SlowBlocks(block=4, lookahead=5, cost=0.02)
    push, sink = PushAudio(), FrameSink()
    session = TalkSession("cut", backend, push, sink, realtime=True)
    session.start()
    t0 = time.monotonic()
    written_at_cut = None
    for k in range(50):  # 2 s of "speech", chunk k holds k + 1
        push.push_pcm16(counting_chunk(k))
        if k == 25:
            written_at_cut = session.stats.frames
            push.cut(2)
            break
        time.sleep(max(0.0, t0 + (k + 1) / FPS - time.monotonic()))
    time.sleep(1.0)
    push.close()
    assert session.wait(10), session.error
    assert written_at_cut is not None
    loud = [i for i, a in enumerate(sink.audio) if np.abs(a).max() > 1e-4]
    after = [i for i in loud if i >= written_at_cut]
    assert len(after) <= 2 + 1, (written_at_cut, after)
    assert session.stats.cut > 0, session.snapshot()
    values = [round(float(sink.audio[i][0]) * 1000) for i in loud]
    assert values[:-2] == list(range(1, len(values) - 1))  # whole and in order up to the two faded ones
    tail = sink.audio[loud[-1]]
    assert tail[-1] < 0.2 * tail[0] + 1e-4  # the last one fades out


class HiccupBlocks(SlowBlocks):
    """SlowBlocks whose sixth voiced block takes 0.3 s (a model finishing blocks unevenly)."""

    def __init__(self) -> None:
        super().__init__(block=4, lookahead=5, cost=0.01)

    def render_block(self, chunks: list[np.ndarray], voiced: list[bool], ahead: list[np.ndarray]) -> list[np.ndarray]:
        if any(voiced[:len(chunks)]) and len(self.calls) == 5:
            time.sleep(0.3)
        return super().render_block(chunks, voiced, ahead)


def test_a_block_renders_once_its_audio_is_in_and_the_margin_absorbs_a_slow_render() -> None:
    """Pushed audio arriving in real time: a block renders as soon as its lookahead is in, so the margin
    the spurt plays behind is slack for a slow render. (Waiting for the next chunk, the session slept
    until the next frame's due time less a render: every block rendered just in time, and one that
    took 0.3 s reached the writer ~0.3 s late; its frames went out in a burst after a 0.33 s gap.)"""
    from tests.support.media import FrameSink

    backend = HiccupBlocks()
    push, sink = PushAudio(), FrameSink()
    session = TalkSession("hiccup", backend, push, sink, realtime=True)
    session.start()
    n = 60  # 2.4 s of "speech": chunk k holds k + 1
    t0 = time.monotonic()
    for k in range(n):
        push.push_pcm16(counting_chunk(k))
        time.sleep(max(0.0, t0 + (k + 1) / FPS - time.monotonic()))
    time.sleep(1.0)
    push.close()
    assert session.wait(10), session.error
    assert len(backend.calls) > 6, backend.calls
    gaps = np.diff(sink.times) * 1000
    assert gaps.max() < 100, sorted(gaps)[-4:]  # every frame about a frame's time after the last
    assert session.stats.late == 0, session.snapshot()
    values = chunk_values(sink.audio)
    assert [v for v in values if v > 0] == list(range(1, n + 1))  # the audio whole and in order


def test_a_late_block_keeps_the_sound_on_its_clock_on_the_last_frame() -> None:
    """A block that renders long after its due time (here 1.5 s): the writer sends its chunks at their
    due times on the last frame written instead of holding the sound back and sending
    it in a burst after the render (which made a viewer's jitter buffer grow to the lateness, and a
    barge-in heard that much later); the frames rendered for them are not shown with them, the audio
    stays whole."""
    from tests.support.media import FrameSink

    backend = StallingBlocks()
    push, sink = PushAudio(), FrameSink()
    session = TalkSession("late", backend, push, sink, realtime=True)
    session.start()
    t0 = time.monotonic()
    n = 60
    for k in range(n):  # chunk k holds k + 1
        push.push_pcm16(counting_chunk(k))
        time.sleep(max(0.0, t0 + (k + 1) / FPS - time.monotonic()))
    time.sleep(2.0)
    push.close()
    assert session.wait(10), session.error
    values = chunk_values(sink.audio)
    assert [v for v in values if v > 0] == list(range(1, n + 1))  # whole and in order
    shown = [round(float(f[0, 0]) * 1000) for f in sink.frames]
    stalled = backend.stalled_values
    first = values.index(stalled[0])
    block = values[first:first + len(stalled)]
    assert block == stalled, (block, stalled)  # the stalled block's chunks went out one after the other
    times = np.array(sink.times[first - 1:first + len(stalled)])
    assert np.diff(times).max() < 0.09, np.diff(times)  # at their due times (before: held back 1.5 s)
    assert all(shown[i] == shown[first - 1] for i in range(first, first + len(stalled)))  # on the last frame
    snap = session.snapshot()  # every frame written is counted once: rendered (inferred, idle) or late
    assert snap["frames"] == snap["inferred"] + snap["idle"] + snap["late"], snap
