"""A talking head live in a real browser over WebRTC: Chromium (headless, its fake microphone playing
our own tone file) opens the session's page, watches it (WHEP-style) and speaks into it
(WHIP-style); the avatar's picture moves with the voice and stays still in the pauses, the audio
track arrives, the session counts its viewers, and a viewer leaving does not stop the session."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.configs import TOKEN, env_with_token, wait_ready, write_api_config
from tests.support.media import tone_on_off, write_wav
from tests.support.procs import Framegrid, Mosquitto, free_port
from tools.webrtc_probe import chromium, jitter_buffer_ms, onset_lags, open_session, page_state, speak, until

pytestmark = pytest.mark.slow

STILL, MOVING = 8.0, 15.0  # picture change (grey levels): codec noise of a still avatar, a mouth opening
OPEN = 14.0  # change from the avatar at rest: 6-9 in the pauses (codec noise), 18-25 with the mouth open


@pytest.fixture
def speaking_browser(tmp_path: Path) -> Iterator[Any]:
    """Chromium whose microphone plays 1 s of tone, 1 s of silence, in a loop."""
    driver = chromium(write_wav(tmp_path / "voice.wav", tone_on_off([(1.0, True), (1.0, False)] * 5), 16_000))
    try:
        yield driver
    finally:
        driver.quit()


def figures(client: httpx.Client, name: str) -> dict[str, Any]:
    got = [s for s in client.get("/api/talk/sessions").json() if s["name"] == name]
    return {"state": got[0]["state"], **got[0]["figures"]} if got else {}


def test_browser_watches_and_speaks_to_a_talking_head(
    tmp_path: Path, mosquitto: Mosquitto, face_image: Path, speaking_browser: Any, framegrid_env: dict[str, str]
) -> None:
    port = free_port()
    extra = (f'[webrtc]\naddresses = ["127.0.0.1"]\n[talk.anna]\navatar = "{face_image}"\naudio = "webrtc"\n'
             'out = "webrtc"\n')
    cfg = write_api_config(tmp_path / "fg.toml", f"fgrtc-{port}", mosquitto, port, {}, extra=extra)
    fg = Framegrid(cfg, env_with_token(framegrid_env), tmp_path / "fg.log")
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    driver = speaking_browser
    try:
        wait_ready(client)
        until("the session live", lambda: figures(client, "anna").get("state") == "live", 60)
        open_session(driver, base, "anna", TOKEN)
        assert figures(client, "anna")["viewers"] == 1
        still = page_state(driver)["motion"][-10:]
        # the browser's microphone (our tone file, 1 s on, 1 s off) becomes the session's audio
        state = speak(driver, 8.0)
        motion = state["motion"][-70:]  # the last 7 s, sampled every 100 ms
        away = state["away"][-70:]  # the same samples' change from the avatar at rest
        print(f"picture change, still: {still}; speaking: {[round(m) for m in motion]}; "
              f"from rest: {[round(m) for m in away]}")
        # no voice: a still picture; while the tone plays the mouth moves, and it stops in the pauses
        # (the page's change figure: grey levels at the 99.5th percentile of a 128x128 difference)
        assert still, still
        assert max(still) < STILL, still
        assert max(motion) > MOVING, motion
        # both phases: the mouth away from rest (open) for a good part of the 7 s and back at rest
        # for another (the change between looks is high only while the mouth opens or closes)
        at_rest = sum(m < OPEN for m in away)
        assert at_rest >= 10, away
        assert len(away) - at_rest >= 10, away
        assert (state["stats"].get("audio") or {}).get("samples", 0) > 16_000, state["stats"]  # audio plays
        assert jitter_buffer_ms(state["stats"]) is not None, state["stats"]
        session = figures(client, "anna")
        assert session["state"] in ("live", "degraded"), session
        assert session["inferred"] > 0, session
        # microphone onset -> the mouth moving on screen, both on the browser's clock
        lags = onset_lags(state["micOnsets"], state["motionOnsets"])
        assert len(lags) >= 2, (state["micOnsets"], state["motionOnsets"])
        print(f"voice onset to mouth motion on screen: {sorted(lags)} ms; jitter buffer "
              f"{jitter_buffer_ms(state['stats'])} ms; server: audio in -> frame out p95 "
              f"{session['latency_ms_p95']} ms, write -> encoder p95 {session['webrtc_send_ms_p95']} ms")
        # the target (issue 27): voice onset to mouth on screen, p50 <= 300 ms on this machine class with the
        # energy backend (measured 127-137 ms here, 196 ms from an independent client)
        assert statistics.median(lags) <= 300, sorted(lags)

        # a second viewer joins, the first leaves: the session goes on
        first = driver.current_window_handle
        driver.switch_to.new_window("tab")
        driver.get(f"{base}/talk/anna")
        until("the second viewer's frames", lambda: page_state(driver).get("frames", 0) >= 10, 60)
        assert figures(client, "anna")["viewers"] == 2
        driver.close()
        driver.switch_to.window(first)
        until("one viewer left", lambda: figures(client, "anna").get("viewers") == 1, 30)
        frames = figures(client, "anna")["frames"]
        time.sleep(1.0)
        assert figures(client, "anna")["frames"] > frames  # still rendering
        assert fg.stop() == 0, fg.output()[-3000:]
    finally:
        client.close()
