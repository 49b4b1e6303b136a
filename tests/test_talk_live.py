"""Live talking-head sessions inside the running pipeline: PCM in over MQTT, HLS out, state on MQTT."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest

from pipeline import parse_config
from tests.support.media import probe_output, tone_on_off
from tests.support.procs import Mosquitto, Subscriber, start_pipeline, wait_until


async def speak(config: Any, mosquitto: Mosquitto, prefix: str, session: str, pcm: bytes,
                extra: tuple[bytes, ...] = (), timeout: float = 60, realtime: bool = False) -> Subscriber:
    """Run the pipeline, push `pcm` (then `extra` messages, then the empty end-of-audio message) to
    the session's audio topic in 100 ms chunks, faster than real time as a TTS engine sends (or in real
    time, as a microphone does: `realtime`), wait for
    the session to end and for a stats message; returns the subscriber that saw everything."""
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    pipeline, shutdown = await start_pipeline(config)
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{prefix}-tts")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        await wait_until(lambda: session in pipeline.talk.sessions and pipeline.talk.sessions[session].state == "live",
                         timeout, "session live")
        topic = f"{prefix}/talk/{session}/audio"
        start = time.monotonic()
        for i in range(0, len(pcm), 3200):
            pub.publish(topic, pcm[i:i + 3200], qos=1).wait_for_publish(5)
            if realtime:
                await asyncio.sleep(max(0.0, start + (i + 3200) / 32_000 - time.monotonic()))
        for message in (*extra, b""):
            pub.publish(topic, message, qos=1).wait_for_publish(5)
        try:
            await wait_until(lambda: pipeline.talk.sessions[session].state == "ended", timeout, "session ended")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {pipeline.stats_payload()}") from None
        await asyncio.sleep(1.2)  # a stats message with the session in it
    finally:
        pub.loop_stop()
        pub.disconnect()
        await shutdown()
        sub.close()
    return sub


@pytest.mark.slow
async def test_mqtt_audio_session_streams_hls_and_reports_state(
    tmp_path: Path, face_image: Path, mosquitto: Mosquitto, topic_prefix: str,
) -> None:
    wall = tmp_path / "wall.png"
    cv2.imwrite(str(wall), np.full((200, 200, 3), 128, np.uint8))
    playlist = tmp_path / "hls" / "live.m3u8"
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix, "stats_interval": 1},
        "talk": {"anna": {"avatar": str(face_image), "audio": "mqtt", "out": str(playlist)},
                 "nobody": {"avatar": str(wall), "audio": "mqtt", "out": str(tmp_path / "x.mp4")}},
        "pipeline": {"status_interval": 0},
    }, tmp_path)
    pcm = (tone_on_off([(0.5, True), (0.5, False)] * 2) * 32767).astype("<i2").tobytes()
    # bad chunks are refused and counted by reason; the session is unaffected
    def framed(seq: int, rate: int, body: bytes) -> bytes:
        return b"FGA1" + seq.to_bytes(4, "little") + rate.to_bytes(4, "little") + body

    tick = b"\0\0" * 640  # 40 ms
    bad = (b"\x01", bytes(96_000), framed(1, 44_100, tick), framed(10, 16_000, tick), framed(9, 16_000, tick),
           framed(13, 16_000, tick), b"FGA1\x00")
    sub = await speak(config, mosquitto, topic_prefix, "anna", pcm, extra=bad, timeout=20)
    states = [json.loads(m.payload) for m in sub.of("/talk/anna/state")]
    seen = [s["state"] for s in states]
    # (`degraded` in between when the CPU is busy); `stopped` at shutdown
    assert seen[:2] == ["starting", "live"], seen
    assert seen[-2:] == ["ended", "stopped"], seen
    ended = next(s for s in states if s["state"] == "ended")
    assert ended["frames"] >= 50
    assert ended["output_fps"] is not None
    # odd length, 3 s in one chunk, 44.1 kHz, a repeated sequence number, a short header; two chunks skipped
    assert ended["audio_rejected_by"] == {"malformed": 2, "oversized": 1, "wrong_rate": 1, "out_of_order": 1}
    assert ended["audio_rejected"] == 5
    assert ended["audio_gaps"] == 2
    nobody = [json.loads(m.payload) for m in sub.of("/talk/nobody/state")]
    assert nobody[-1]["state"] == "failed"
    assert "no face found" in nobody[-1]["error"]
    stats = [json.loads(m.payload) for m in sub.of("/stats")]
    assert any("anna" in s.get("talk", {}) for s in stats)
    n, fps, audio_s, _ = probe_output(playlist)
    # 2 s of speech plus the silence the session kept the clock with while waiting for it
    # MPEG-TS keeps AAC's 1024 priming samples (64 ms at 16 kHz) and the last frame's padding
    assert fps == 25
    assert n >= 50
    assert -0.04 <= audio_s - n / 25 <= 0.13


@pytest.mark.slow
async def test_musetalk_session_on_lipsync_slots_in_the_pipeline(
    tmp_path: Path, face_image: Path, tiny: Path, mosquitto: Mosquitto, topic_prefix: str,
) -> None:
    """A live MuseTalk session (tiny random weights in the official layout) fed over MQTT: its frames
    are generated on the pipeline's lipsync slot, the output has all the audio, stats show the slot."""
    out = tmp_path / "anna.mkv"
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix, "stats_interval": 1},
        "lipsync": {"weights": str(tiny), "slots": 1, "block": 4},
        "talk": {"anna": {"avatar": str(face_image), "audio": "mqtt", "out": str(out), "backend": "musetalk"}},
        "pipeline": {"status_interval": 0},
        "devices": {"cpu_slots": 1},
    }, tmp_path)
    pcm = (tone_on_off([(1.0, True), (0.4, False), (0.6, True)]) * 32767).astype("<i2").tobytes()
    sub = await speak(config, mosquitto, topic_prefix, "anna", pcm)
    states = [json.loads(m.payload) for m in sub.of("/talk/anna/state")]
    ended = next(s for s in states if s["state"] == "ended")
    # every frame is accounted for: generated on the slot, silent (the avatar's own), or late (the
    # last frame repeated while generation caught up with real time: the CPU decides how many)
    assert ended["errors"] == 0, json.dumps(ended)
    assert ended["inferred"] > 0, json.dumps(ended)
    assert ended["frames"] == ended["inferred"] + ended["idle"] + ended["late"]
    assert ended["latency_ms_p50"] is not None
    assert ended["latency_ms_p50"] > 0
    stats = [json.loads(m.payload) for m in sub.of("/stats")]
    lipsync = [s["lipsync"] for s in stats if s.get("lipsync")]
    assert lipsync
    assert lipsync[-1]["slots"]["lipsync.0"]["frames"] == ended["inferred"]
    assert any(s["talk"].get("anna", {}).get("slot") == "lipsync.0" for s in stats if s.get("talk"))
    n, fps, audio_s, _ = probe_output(out)
    assert fps == 25
    assert n >= 50
    assert 0 <= audio_s - n / 25 <= 1024 / 16_000


def test_musetalk_session_needs_weights(tmp_path: Path, face_image: Path) -> None:
    from pipeline import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"talk": {"a": {"avatar": str(face_image), "audio": "mqtt", "out": "x.mp4",
                                     "backend": "musetalk"}}}, tmp_path)
    assert "talk.a.backend" in str(err.value)
    assert "lipsync.weights" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config({"lipsync": {"weights": str(tmp_path / "none")},
                      "talk": {"a": {"avatar": str(face_image), "audio": "mqtt", "out": "x.mp4",
                                     "backend": "musetalk"}}}, tmp_path)
    assert "lipsync.weights" in str(err.value)
    assert "musetalkV15/unet.pth" in str(err.value)


def onsets(on: np.ndarray) -> list[int]:
    return [i for i in range(1, len(on)) if on[i] and not on[i - 1]]


@pytest.mark.slow
async def test_live_session_output_keeps_lips_and_sound_in_sync(
    tmp_path: Path, face_image: Path, mosquitto: Mosquitto, topic_prefix: str,
) -> None:
    """In the written output, the mouth opens on the frame whose sound starts: each onset of the voice
    (read from the decoded audio track at its own timestamps) and of the mouth (read from the decoded
    frames) are at most one frame (40 ms) apart."""
    import av

    out = tmp_path / "sync.mkv"
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "talk": {"anna": {"avatar": str(face_image), "audio": "mqtt", "out": str(out)}},
        "pipeline": {"status_interval": 0},
    }, tmp_path)
    pattern = [(0.6, False), (0.4, True), (0.6, False), (0.4, True), (0.6, False), (0.4, True), (0.6, False)]
    pcm = (tone_on_off(pattern) * 32767).astype("<i2").tobytes()
    await speak(config, mosquitto, topic_prefix, "anna", pcm, timeout=30)

    with av.open(str(out)) as c:
        decoded = list(c.decode(c.streams.video[0]))
        v0 = float(decoded[0].pts * decoded[0].time_base)  # video time zero
        frames = [f.to_ndarray(format="bgr24").astype(np.int16) for f in decoded]
    with av.open(str(out)) as c:
        stream = c.streams.audio[0]
        rate = stream.rate
        chunks = [(float(f.pts * f.time_base), f.to_ndarray().reshape(-1).astype(np.float32))
                  for f in c.decode(stream)]
    audio = np.zeros(int((chunks[-1][0] - v0) * rate) + len(chunks[-1][1]), np.float32)
    for t, samples in chunks:  # placed by their timestamps on the video's clock (priming included)
        i = round((t - v0) * rate)
        if i < 0:
            samples, i = samples[-i:], 0
        audio[i:i + len(samples)] = samples[:len(audio) - i]
    per_frame = rate // 25
    loud = np.array(
        [
            np.sqrt(np.mean(audio[k * per_frame : (k + 1) * per_frame] ** 2))
            if (k + 1) * per_frame <= len(audio)
            else 0.0
            for k in range(len(frames))
        ]
    )
    # the mouth: the pixels that change most over the clip; its opening: their distance from the median frame
    stack = np.stack([f.mean(axis=2) for f in frames]).astype(np.float32)
    median = np.median(stack, axis=0)
    spread = stack.std(axis=0)
    mask = spread >= np.quantile(spread, 0.995)
    mouth = np.array([np.abs(f - median)[mask].mean() for f in stack])
    voice_on, mouth_on = loud > 0.5 * loud.max(), mouth > 0.5 * mouth.max()
    voice, lips = onsets(voice_on), onsets(mouth_on)
    print(f"voice onsets {voice}, mouth onsets {lips} (frames)")
    assert len(voice) == 3, (voice, lips)
    assert len(lips) == 3, (voice, lips)
    assert all(abs(a - b) <= 1 for a, b in zip(voice, lips, strict=True)), (voice, lips)


def offline_fps(musetalk_model: Any, block: int) -> float:
    """Frames per second the tiny MuseTalk generates offline on this machine, in blocks of `block`
    (audio prompts and the UNet and VAE at once, as the live slot runs them: one slot on every core; torch's
    thread count is process-wide and an earlier test may have lowered it)."""
    import os

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return _offline_fps(musetalk_model, block)
    finally:
        torch.set_num_threads(before)


def _offline_fps(musetalk_model: Any, block: int) -> float:
    latents = musetalk_model.prepare_face(np.full((256, 256, 3), 128, np.uint8), (0, 0, 256, 256)).latents
    audio = (tone_on_off([(2.0, True)]) * 0.5).astype(np.float32)
    prompts = musetalk_model.audio_prompts(audio)[:block]
    musetalk_model.generate_faces([latents] * block, prompts)  # warm
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        musetalk_model.audio_prompts(audio[:block * 640 + 16_000])
        musetalk_model.generate_faces([latents] * block, prompts)
        done += block
    return done / (time.perf_counter() - t0)


@pytest.mark.slow
async def test_a_live_musetalk_session_keeps_real_time_for_20_s_on_one_slot(
    tmp_path: Path, face_image: Path, tiny: Path, musetalk_model: Any, mosquitto: Mosquitto, topic_prefix: str,
) -> None:
    """Issue 27: where the machine generates fast enough offline, a live session over 20 s of speech
    shows no late frame (a frame repeated because generation fell behind real time)."""
    rate = offline_fps(musetalk_model, 4)
    if rate < 25 * 1.5:  # the slot also shares the cores with decode, the encoder and the loop
        pytest.skip(f"this machine generates {rate:.0f} frames/s offline with the tiny models; live at 25 fps "
                    "needs 37.5 (1.5x) to promise no late frame")
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix, "stats_interval": 1},
        "lipsync": {"weights": str(tiny), "slots": 1, "block": 4},
        "talk": {"anna": {"avatar": str(face_image), "audio": "mqtt", "out": str(tmp_path / "anna.mkv"),
                          "backend": "musetalk"}},
        "pipeline": {"status_interval": 0},
        "devices": {"cpu_slots": 1},
    }, tmp_path)
    pcm = (tone_on_off([(20.0, True)]) * 32767).astype("<i2").tobytes()
    sub = await speak(config, mosquitto, topic_prefix, "anna", pcm, timeout=90, realtime=True)
    ended = next(json.loads(m.payload) for m in sub.of("/talk/anna/state") if json.loads(m.payload)["state"] == "ended")
    print(f"offline {rate:.1f} frames/s; live session: {json.dumps(ended)}")
    assert ended["errors"] == 0, ended
    assert ended["inferred"] >= 20 * 25 * 0.95, ended
    assert ended["late"] == 0, ended
