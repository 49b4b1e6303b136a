"""A real browser talking to a framegrid talking head over WebRTC (used by tests/test_webrtc.py and
tools/bench_talkinghead.py --webrtc).

Debian's headless Chromium, driven by Selenium, with its fake microphone playing a WAV file of
ours: it opens `/talk/<name>`, watches (WHEP-style), presses "Speak" (WHIP-style) and reads back
what the page measures on the browser's own clock: decoded frames, picture change per sample,
voice onsets at the microphone, mouth-motion onsets on screen, and the receiver's getStats().
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-extensions", "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    # WebRTC on this machine only: loopback candidates, plain addresses (no mDNS names)
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
)


def chromium(microphone: Path) -> Any:
    """A headless Chromium whose microphone plays `microphone` (a WAV file, looped)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_bin):
        raise RuntimeError("chromium and chromium-driver are not installed (tools/bootstrap test does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={microphone}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin), options=options)
    driver.set_page_load_timeout(30)
    return driver


def page_state(driver: Any) -> dict[str, Any]:
    return driver.execute_script("return window.fg") or {}


def until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except Exception:
            got = None
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def open_session(driver: Any, base: str, name: str, token: str | None) -> None:
    """Open the session's page (with the API token's cookie) and wait for its first second of video."""
    if token:
        driver.get(f"{base}/api/health")  # the origin, to set the page's cookie
        driver.add_cookie({"name": "framegrid_token", "value": token, "path": "/"})
    driver.get(f"{base}/talk/{name}")
    until("video frames in the browser", lambda: page_state(driver).get("frames", 0) >= 25, 60)


def speak(driver: Any, seconds: float) -> dict[str, Any]:
    """Press "Speak", let the microphone play `seconds`, return the page's figures."""
    driver.find_element("id", "speak").click()
    until("the microphone connected", lambda: page_state(driver).get("micConnected") or page_state(driver).get("error"),
          30)
    state = page_state(driver)
    if not state.get("micConnected"):
        raise AssertionError(f"microphone: {state.get('error')}")
    time.sleep(seconds)
    return page_state(driver)


def onset_lags(mic: list[float], motion: list[float], within: float = 1500.0) -> list[float]:
    """For each voice onset at the microphone, ms until the first mouth-motion onset on screen."""
    lags = []
    for m in mic:
        after = [v - m for v in motion if 0 <= v - m <= within]
        if after:
            lags.append(round(min(after)))
    return lags


def jitter_buffer_ms(stats: dict[str, Any], kind: str = "video") -> float | None:
    s = stats.get(kind) or {}
    n = s.get("jitterBufferEmittedCount") or 0
    return round(1000 * s["jitterBufferDelay"] / n, 1) if n else None
