"""Clients that cannot hold the server: a live viewer that stops reading is cut, the others go on.
(The crowd itself, 200 clients for minutes, is `tools/crowd.py`: its figures are in the operations page.)"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from tests.support.procs import MODEL, Mosquitto, start_pipeline, wait_until
from tools.servers import free_port


def closed_by_server(s: socket.socket) -> bool:
    """Reads (and drops) what waits; True once the server has closed or reset the connection."""
    s.setblocking(False)
    try:
        while True:
            if not s.recv(1 << 20):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.slow
async def test_a_viewer_that_stops_reading_is_cut_and_the_others_keep_watching(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from pipeline import parse_config
    from pipeline.api import local_api, routes

    monkeypatch.setattr(routes, "STUCK_VIEWER_S", 1.0)
    port = free_port()
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
        "streams": {"a": {"url": str(videos["cam1"]), "model": "shapes", "max_fps": 10}},
        "pipeline": {"status_interval": 0},
        "api": {"listen": f"127.0.0.1:{port}", "mjpeg_fps": 10},
    }, tmp_path)
    pipeline, shutdown = await start_pipeline(config)
    api = local_api(pipeline, None)
    await api.start()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frames = 0
    try:
        await wait_until(lambda: pipeline.stats_payload()["streams"]["a"]["processed"] > 0, 60, "a first result")
        before = routes.LiveResponse.cut
        stuck.connect(("127.0.0.1", port))
        stuck.sendall(b"GET /api/streams/a/mjpeg HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads again
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client, \
                client.stream("GET", "/api/streams/a/mjpeg") as watching:
            deadline = time.monotonic() + 90
            cut_at_frames: int | None = None
            async for chunk in watching.aiter_bytes():
                frames += chunk.count(b"--frame")
                if cut_at_frames is None and routes.LiveResponse.cut > before:
                    cut_at_frames = frames
                if (cut_at_frames is not None and frames >= cut_at_frames + 5) or time.monotonic() > deadline:
                    break  # the reading viewer went on after the cut
        assert routes.LiveResponse.cut == before + 1, "the stuck viewer was cut (and only it)"
        await asyncio.sleep(0.5)
        assert closed_by_server(stuck), "its connection was closed by the server"
        assert cut_at_frames is not None
        assert frames >= cut_at_frames + 5
    finally:
        stuck.close()
        await api.stop()
        await shutdown()
