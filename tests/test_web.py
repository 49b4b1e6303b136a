"""The web page in a real browser (Debian's Chromium, headless, driven by Selenium) against a real framegrid."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from tests.support.configs import TOKEN, env_with_token, wait_ready, write_api_config
from tests.support.procs import Framegrid, Mosquitto, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    driver_bin = shutil.which("chromedriver")
    assert chromium, "chromium and chromium-driver are not installed (tools/bootstrap test does it)"
    assert driver_bin, "chromium and chromium-driver are not installed (tools/bootstrap test does it)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except Exception:  # an element not there yet, a stale one: look again
            got = None
        if got is not None and (isinstance(got, np.ndarray) or got):
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def box_pixels(image: np.ndarray) -> int:
    """Pixels in the box colours the server draws (one per class of the shapes model)."""
    from pipeline.api.views import _colour

    count = 0
    for cid in range(3):
        colour = np.array(_colour(cid), np.int16)
        count += int((np.abs(image.astype(np.int16) - colour).max(axis=2) < 30).sum())
    return count


def displayed_frame(driver: Any, stream: str) -> np.ndarray:
    """The frame the tile's <img> shows now, read back through a canvas."""
    data = driver.execute_script(
        "const img = document.querySelector(`#tile-${arguments[0]} img`);"
        "if (!img || !img.naturalWidth) return null;"
        "const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;"
        "c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png');", stream)
    assert data, f"{stream}: no frame shown"
    png = base64.b64decode(data.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def test_page_live_tiles_boxes_add_pause_remove_and_token(
    browser: Any, tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, framegrid_env: dict[str, str],
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    port = free_port()
    cfg = write_api_config(tmp_path / "fg.toml", f"fgweb-{os.getpid()}", mosquitto, port,
                       {"cam1": str(videos["cam1"]), "cam2": str(videos["cam2"])})
    fg = Framegrid(cfg, env_with_token(framegrid_env), tmp_path / "fg.log")
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                       timeout=10)
    try:
        wait_ready(api)
        browser.get(f"http://127.0.0.1:{port}/")
        # a token is set: the page asks for it and shows nothing else
        wait("the token form", lambda: browser.find_element(By.ID, "login").is_displayed())
        assert not browser.find_element(By.ID, "app").is_displayed()
        browser.find_element(By.ID, "token").send_keys("wrong")
        browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
        wait("the wrong-token message", lambda: browser.find_element(By.ID, "login-error").text == "wrong token")
        token = browser.find_element(By.ID, "token")
        token.clear()
        token.send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login-form button").click()

        # one tile per stream, live
        wait("tiles for cam1 and cam2", lambda: {t.get_attribute("data-stream") for t in
                                                 browser.find_elements(By.CSS_SELECTOR, ".tile")} == {"cam1", "cam2"})
        wait("cam1 streaming with objects", lambda: browser.find_element(By.ID, "tile-cam1")
             .get_attribute("data-state") == "streaming" and int(browser.find_element(By.ID, "tile-cam1")
                                                                 .get_attribute("data-objects")) > 0)
        assert "fps" in browser.find_element(By.CSS_SELECTOR, "#tile-cam1 .fps").text
        wait("the device table", lambda: browser.find_element(By.CSS_SELECTOR, "#devices tr[data-device=cpu]"))
        assert "cam1" in browser.find_element(By.CSS_SELECTOR, "#devices tr[data-device=cpu]").text

        # recent events, with the best view of each object
        wait("event cards with snapshots", lambda: len(browser.find_elements(By.CSS_SELECTOR, ".event img")) >= 2)
        card = browser.find_element(By.CSS_SELECTOR, ".event")
        assert card.get_attribute("data-event").startswith(("cam1-", "cam2-"))
        wait("an event's crop loaded", lambda: browser.execute_script(
            "return [...document.querySelectorAll('.event img')].some(i => i.complete && i.naturalWidth > 0)"))

        # boxes are drawn on the live view of a stream with known objects
        shown = wait("a frame in cam1's tile", lambda: displayed_frame(browser, "cam1"))
        assert shown.shape == (360, 640, 3)
        plain = cv2.imdecode(np.frombuffer(api.get("/api/streams/cam1/snapshot.jpg").content, np.uint8),
                             cv2.IMREAD_COLOR)
        drawn, background = box_pixels(shown), box_pixels(plain)
        assert drawn > max(150, 3 * background), f"box-coloured pixels: {drawn} shown vs {background} without boxes"

        # add a stream through the form: its tile appears and shows detections
        form = browser.find_element(By.ID, "add-form")
        form.find_element(By.NAME, "name").send_keys("cam3")
        form.find_element(By.NAME, "url").send_keys(str(videos["cam2"]))
        Select(form.find_element(By.NAME, "model")).select_by_value("shapes")
        form.find_element(By.NAME, "max_fps").send_keys("4")
        form.find_element(By.CSS_SELECTOR, "button").click()
        wait("cam3's tile with detections", lambda: int(browser.find_element(By.ID, "tile-cam3")
                                                       .get_attribute("data-objects")) > 0)
        assert api.get("/api/streams/cam3").json()["published"] > 0
        # a bad stream gets the API's message, naming the field
        form.find_element(By.NAME, "name").send_keys("cam4")
        form.find_element(By.NAME, "url").send_keys(str(videos["cam2"].with_name("no-such-video.mp4")))
        form.find_element(By.CSS_SELECTOR, "button").click()
        wait("the form's error", lambda: "url: file not found" in browser.find_element(By.ID, "add-error").text)

        # pause, then remove
        browser.find_element(By.CSS_SELECTOR, "#tile-cam3 button.pause").click()
        wait("cam3 paused", lambda: browser.find_element(By.ID, "tile-cam3").get_attribute("data-state")
             == "disabled")
        assert api.get("/api/streams/cam3").json()["enabled"] is False
        browser.find_element(By.CSS_SELECTOR, "#tile-cam3 button.remove").click()
        wait("cam3's tile gone", lambda: not browser.find_elements(By.ID, "tile-cam3"))
        assert api.get("/api/streams/cam3").status_code == 404
        assert {t.get_attribute("data-stream") for t in browser.find_elements(By.CSS_SELECTOR, ".tile")} == {
            "cam1", "cam2"}
        # no script error on the page (the 401 and 422 answers above are network entries, expected)
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
        assert not errors, errors
    finally:
        api.close()
        assert fg.stop() == 0


def tile_pixels(driver: Any) -> dict[str, bytes]:
    """Every tile's picture now, as PNG bytes read back through a canvas (empty: none shown yet)."""
    got = driver.execute_script(
        "const out = {};"
        "for (const img of document.querySelectorAll('.tile img')) {"
        "  const name = img.closest('.tile').dataset.stream;"
        "  if (!img.naturalWidth) { out[name] = ''; continue; }"
        "  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;"
        "  c.getContext('2d').drawImage(img, 0, 0); out[name] = c.toDataURL('image/png'); }"
        "return out;")
    return {k: base64.b64decode(v.split(",", 1)[1]) if v else b"" for k, v in got.items()}


@pytest.mark.timeout(600)
def test_page_holds_32_cameras_and_a_phone(
    browser: Any, tmp_path: Path, mosquitto: Mosquitto, framegrid_env: dict[str, str],
) -> None:
    """32 cameras on one page: every tile's picture changes within 2 s (the tiles share the browser's six
    connections instead of holding one MJPEG stream each), a click opens one live view, and the page
    fits a phone (the screenshot at 390x844 is in the test output)."""
    from selenium.webdriver.common.by import By

    from streams.synthetic import MovingScene, write_video

    names = [f"c{i:02d}" for i in range(32)]
    video = tmp_path / "small.mp4"
    write_video(video, MovingScene(seed=5, width=320, height=180, fps=5.0, speed=6.0), seconds=20)
    port = free_port()
    cfg = write_api_config(tmp_path / "fg.toml", f"fgweb32-{os.getpid()}", mosquitto, port,
                           dict.fromkeys(names, str(video)), token=None)
    cfg.write_text(cfg.read_text().replace("max_fps = 4", "max_fps = 2"))
    fg = Framegrid(cfg, framegrid_env, tmp_path / "fg.log")
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        wait_ready(api)
        browser.get(f"http://127.0.0.1:{port}/")
        wait("32 tiles", lambda: len(browser.find_elements(By.CSS_SELECTOR, ".tile")) == 32)
        wait("a picture in every tile", lambda: all(tile_pixels(browser).values()), timeout=90)
        before = tile_pixels(browser)
        t0 = time.monotonic()
        changed: set[str] = set()
        while time.monotonic() - t0 < 2.0 and len(changed) < len(names):
            now = tile_pixels(browser)
            changed |= {n for n in names if now[n] and now[n] != before[n]}
            time.sleep(0.1)
        assert changed == set(names), f"{sorted(set(names) - changed)} did not change within 2 s"
        # the live view of one camera, on click: an MJPEG stream that keeps coming
        browser.find_element(By.CSS_SELECTOR, "#tile-c07 img").click()
        wait("the live view", lambda: browser.find_element(By.ID, "live").is_displayed())
        wait("its first picture", lambda: browser.execute_script(
            "return document.querySelector('#live img').naturalWidth") == 320)
        assert browser.find_element(By.CSS_SELECTOR, "#live .title").text == "c07"
        browser.find_element(By.ID, "live-close").click()
        wait("the live view closed", lambda: not browser.find_element(By.ID, "live").is_displayed())
        # a phone: the page is one column and nothing runs off the side
        browser.set_window_size(390, 844)
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(1.5)
        width = browser.execute_script("return document.documentElement.scrollWidth")
        tile_width = browser.execute_script("return document.querySelector('.tile').getBoundingClientRect().width")
        shot = tmp_path / "page-390x844.png"
        browser.save_screenshot(str(shot))
        print(f"phone screenshot: {shot}")
        assert width <= 390, f"the page is {width}px wide on a 390px screen"
        assert tile_width <= 390
        # nothing covers the page: the first tile is what a finger on it would touch
        assert browser.execute_script("return document.elementFromPoint(195, 250).closest('.tile')?.dataset.stream") \
            == "c00"
    finally:
        api.close()
        assert fg.stop() == 0, fg.output()[-3000:]
