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


def first_after(times: list[float], t: float) -> float | None:
    later = [x - t for x in times if x >= t]
    return round(min(later)) if later else None


@pytest.mark.parametrize("backend", ["energy", "musetalk"])
def test_text_said_to_a_session_is_heard_and_seen_in_the_browser_and_stop_cuts_it(
    tmp_path: Path, mosquitto: Mosquitto, face_image: Path, framegrid_env: dict[str, str], tiny: Path, backend: str
) -> None:
    """The session page's Say and Stop, in Chromium watching over WebRTC: measured on the browser's
    clock from the request, the first sound of the text and (energy backend) the mouth opening on
    screen; then a long text cut by Stop, from the request to the end of the sound the browser hears.
    MuseTalk runs the tiny random weights (noise for a mouth: its picture is not measured) with its
    block and lookahead in flight."""
    port = free_port()
    extra = (f'[webrtc]\naddresses = ["127.0.0.1"]\n[talk.ben]\navatar = "{face_image}"\naudio = "mqtt"\n'
             f'out = "webrtc"\nbackend = "{backend}"\n')
    if backend == "musetalk":  # MuseTalk runs on torch: detection too, one runtime in the process
        extra += f'[lipsync]\nweights = "{tiny}"\nslots = 1\n'
    cfg = write_api_config(tmp_path / "fg.toml", f"fgsay-{port}", mosquitto, port, {}, extra=extra)
    if backend == "musetalk":
        cfg.write_text(cfg.read_text().replace("imgsz = 320\n", 'imgsz = 320\nbackend = "torch"\n'))
    fg = Framegrid(cfg, env_with_token(framegrid_env), tmp_path / "fg.log")
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    driver = chromium(write_wav(tmp_path / "quiet.wav", tone_on_off([(1.0, False)]), 16_000))
    try:
        wait_ready(client)
        until("the session live", lambda: figures(client, "ben").get("state") == "live", 60)
        open_session(driver, base, "ben", TOKEN)
        time.sleep(1.0)  # a still, silent avatar before the text

        def after(keys: list[str], t: float) -> dict[str, Any] | None:
            """The page's figures once each of `keys` has a time after `t`."""
            state = page_state(driver)
            return state if all(first_after(state[k], t) is not None for k in keys) else None

        def say(text: str) -> float:
            box = driver.find_element("id", "text")
            box.clear()
            box.send_keys(text)
            driver.find_element("id", "say").click()
            return float(until("the request sent", lambda: [s["at"] for s in page_state(driver)["sent"]
                                                             if s["kind"] == "say"][-1:], 5)[0])

        sent = say("Hello there, how are you today?")
        seen = ["soundOnsets", "openOnsets"] if backend == "energy" else ["soundOnsets"]
        state = until("sound (and the mouth opening) after the text", lambda: after(seen, sent), 20)
        sound, mouth = first_after(state["soundOnsets"], sent), first_after(state["openOnsets"], sent)
        session = figures(client, "ben")
        print(f"{backend}: text -> first sound in the browser {sound} ms, mouth open on screen {mouth} ms "
              f"(server: first audio queued {session['say']['first_audio_ms']} ms; jitter buffer "
              f"{jitter_buffer_ms(state['stats'])} ms)")
        assert sound is not None
        assert sound < 1500, sound  # a few hundred ms: request, espeak-ng, a block, the encoder, the network
        if backend == "energy":
            assert mouth is not None
            assert mouth < 1500, mouth
        until("the text said", lambda: figures(client, "ben")["say"]["said"] == 1, 20)

        time.sleep(1.0)
        long = ("This is a long sentence that goes on for several seconds, so that there is time to stop it "
                "in the middle, as a user talking over an assistant would.")
        sent = say(long)
        until("the long text heard", lambda: first_after(page_state(driver)["soundOnsets"], sent) is not None, 20)
        time.sleep(1.5)
        driver.find_element("id", "stop").click()
        stopped = float(until("stop sent", lambda: [s["at"] for s in page_state(driver)["sent"]
                                                    if s["kind"] == "stop"][-1:], 5)[0])
        # The last loud moment the browser heard, once it has been quiet for 2 s: Stop may land in a
        # pause between words (then the sound had already ended, and no end follows the click).
        def quiet_since_stop() -> dict[str, Any] | None:
            state = driver.execute_script("return {...window.fg, now: performance.now()}")
            last = state["soundLast"]
            return state if last is not None and state["now"] - max(last, stopped) >= 2000 else None

        quiet = until("2 s of quiet after Stop", quiet_since_stop, 15)
        cut = quiet["soundLast"] - stopped
        session = figures(client, "ben")
        print(f"{backend}: Stop -> the last sound in the browser {cut:.0f} ms after the click (server: the cut "
              f"reached the writer in {session.get('cut_ms')} ms, {session.get('viewer_frames_cut')} queued frames "
              f"dropped; audio jitter buffer {jitter_buffer_ms(quiet['stats'], 'audio')} ms)")
        assert cut < 500, cut  # the fade is 40 ms, then the next frame's wait, the encoder and the network
        until("the text interrupted", lambda: figures(client, "ben")["say"]["interrupted"] == 1, 10)
        assert fg.stop() == 0, fg.output()[-3000:]
    finally:
        driver.quit()
        client.close()
