"""Live talking-head sessions inside the running pipeline: PCM in over MQTT, HLS out, state on MQTT."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest

from pipeline import parse_config

from .conftest import Mosquitto, Subscriber, start_pipeline, wait_until
from .test_musetalk import tiny  # noqa: F401 - fixture
from .test_talkinghead import face_image, probe_output, tone_on_off  # noqa: F401 - fixture


async def speak(config: Any, mosquitto: Mosquitto, prefix: str, session: str, pcm: bytes,
                extra: tuple[bytes, ...] = (), timeout: float = 60) -> Subscriber:
    """Run the pipeline, push `pcm` (then `extra` messages, then the empty end-of-audio message) to
    the session's audio topic in 100 ms chunks, faster than real time as a TTS engine sends, wait for
    the session to end and for a stats message; returns the subscriber that saw everything."""
    sub = Subscriber(mosquitto.port, f"{prefix}/#")
    pipeline, shutdown = await start_pipeline(config)
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{prefix}-tts")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        await wait_until(lambda: session in pipeline.sessions and pipeline.sessions[session].state == "live",
                         timeout, "session live")
        topic = f"{prefix}/talk/{session}/audio"
        for i in range(0, len(pcm), 3200):
            pub.publish(topic, pcm[i:i + 3200], qos=1).wait_for_publish(5)
        for message in (*extra, b""):
            pub.publish(topic, message, qos=1).wait_for_publish(5)
        try:
            await wait_until(lambda: pipeline.sessions[session].state == "ended", timeout, "session ended")
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
    tmp_path: Path, face_image: Path, mosquitto: Mosquitto, topic_prefix: str,  # noqa: F811
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
    # an odd-length chunk is refused and the session is unaffected
    sub = await speak(config, mosquitto, topic_prefix, "anna", pcm, extra=(b"\x01",), timeout=20)
    states = [json.loads(m.payload) for m in sub.of("/talk/anna/state")]
    seen = [s["state"] for s in states]
    # (`degraded` in between when the CPU is busy); `stopped` at shutdown
    assert seen[:2] == ["starting", "live"] and seen[-2:] == ["ended", "stopped"], seen
    ended = next(s for s in states if s["state"] == "ended")
    assert ended["frames"] >= 50 and ended["output_fps"] is not None
    assert ended["audio_rejected"] == 1  # the odd-length chunk, refused and counted; the speech went on
    nobody = [json.loads(m.payload) for m in sub.of("/talk/nobody/state")]
    assert nobody[-1]["state"] == "failed" and "no face found" in nobody[-1]["error"]
    stats = [json.loads(m.payload) for m in sub.of("/stats")]
    assert any("anna" in s.get("talk", {}) for s in stats)
    n, fps, audio_s, _ = probe_output(playlist)
    # 2 s of speech plus the silence the session kept the clock with while waiting for it
    # MPEG-TS keeps AAC's 1024 priming samples (64 ms at 16 kHz) and the last frame's padding
    assert fps == 25 and n >= 50 and -0.04 <= audio_s - n / 25 <= 0.13


@pytest.mark.slow
async def test_musetalk_session_on_lipsync_slots_in_the_pipeline(
    tmp_path: Path, face_image: Path, tiny: Path, mosquitto: Mosquitto, topic_prefix: str,  # noqa: F811
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
    assert ended["errors"] == 0 and ended["inferred"] > 0, json.dumps(ended)
    assert ended["frames"] == ended["inferred"] + ended["idle"] + ended["late"]
    assert ended["latency_ms_p50"] is not None and ended["latency_ms_p50"] > 0  # audio in -> frame out
    stats = [json.loads(m.payload) for m in sub.of("/stats")]
    lipsync = [s["lipsync"] for s in stats if s.get("lipsync")]
    assert lipsync and lipsync[-1]["slots"]["lipsync.0"]["frames"] == ended["inferred"]
    assert any(s["talk"].get("anna", {}).get("slot") == "lipsync.0" for s in stats if s.get("talk"))
    n, fps, audio_s, _ = probe_output(out)
    assert fps == 25 and n >= 50 and 0 <= audio_s - n / 25 <= 1024 / 16_000


def test_musetalk_session_needs_weights(tmp_path: Path, face_image: Path) -> None:  # noqa: F811
    from pipeline import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"talk": {"a": {"avatar": str(face_image), "audio": "mqtt", "out": "x.mp4",
                                     "backend": "musetalk"}}}, tmp_path)
    assert "talk.a.backend" in str(err.value) and "lipsync.weights" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config({"lipsync": {"weights": str(tmp_path / "none")},
                      "talk": {"a": {"avatar": str(face_image), "audio": "mqtt", "out": "x.mp4",
                                     "backend": "musetalk"}}}, tmp_path)
    assert "lipsync.weights" in str(err.value) and "musetalkV15/unet.pth" in str(err.value)
