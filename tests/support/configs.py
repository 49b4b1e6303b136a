"""Config files the process tests run framegrid with."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from .procs import MODEL, Mosquitto

TOKEN = "api-T0ken-never-shown"


def write_config(path: Path, prefix: str, mqtt_url: str, streams: dict[str, str], **extra: Any) -> Path:
    lines = [
        "[mqtt]", f'url = "{mqtt_url}"', f'topic_prefix = "{prefix}"',
        f"stats_interval = {extra.get('stats_interval', 2)}", f"buffer = {extra.get('buffer', 1000)}",
        "reconnect_cap = 1.0",
        "[models.shapes]", 'type = "yolo"', f'weights = "{MODEL}"', "imgsz = 320", "confidence = 0.3",
        "[pipeline]", "status_interval = 2", "max_frame_age = 2.0",
        "[api]", "enabled = false",  # (the API's own tests give it a free port)
    ]
    for name, url in streams.items():
        lines += [f"[streams.{name}]", f'url = "{url}"', 'model = "shapes"',
                  f"max_fps = {extra.get('max_fps', 5)}", f"stall_timeout = {extra.get('stall_timeout', 4)}",
                  "reconnect_cap = 1.0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_api_config(path: Path, prefix: str, mosquitto: Mosquitto, port: int, streams: dict[str, str],
                     token: str | None = TOKEN, extra: str = "") -> Path:
    # API clients may name files in pytest's base folder, where every test's fixtures live (videos, avatar)
    lines = ["[mqtt]", f'url = "{mosquitto.url}"', f'topic_prefix = "{prefix}"', "stats_interval = 1",
             "[api]", f'listen = "127.0.0.1:{port}"', "max_upload_mb = 2", "mjpeg_fps = 4",
             f'media_dirs = ["{path.parent.parent}"]']
    if token:
        lines.append('token = "${FG_TEST_TOKEN}"')
    lines += ["[models.shapes]", 'type = "yolo"', f'weights = "{MODEL}"', "imgsz = 320",
              "[pipeline]", "status_interval = 0"]
    for name, url in streams.items():
        lines += [f"[streams.{name}]", f'url = "{url}"', 'model = "shapes"', "max_fps = 4"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def env_with_token(base: dict[str, str]) -> dict[str, str]:
    return {**base, "FG_TEST_TOKEN": TOKEN}


def wait_ready(client: httpx.Client, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/api/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("framegrid did not become ready")
