"""Stopping framegrid loses nothing, however the stop signal arrives."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from tests.support.configs import write_config
from tests.support.media import detections
from tests.support.procs import Framegrid, Mosquitto, Subscriber, free_port


@pytest.mark.slow
def test_group_sigterm_with_embedded_broker_flushes_everything(
    tmp_path: Path, videos: dict[str, Path], framegrid_env: dict[str, str],
) -> None:
    """`timeout`, systemd and container runtimes signal the whole process group; the embedded
    broker must outlive the publisher's last messages (final state, stats, `offline`)."""
    port = free_port()
    cfg = write_config(tmp_path / "fg.toml", "fgstop", "embedded", {"cam": str(videos["cam1"])})
    cfg.write_text(cfg.read_text().replace('url = "embedded"', f'url = "embedded"\nembedded_port = {port}')
                   # with the HTTP API serving: it must not hold the shutdown up
                   .replace("enabled = false", f'listen = "127.0.0.1:{free_port()}"'))
    fg = Framegrid(cfg, framegrid_env, tmp_path / "fg.log", own_group=True)
    sub = None
    try:
        import time

        deadline = time.monotonic() + 60
        while sub is None and time.monotonic() < deadline:
            try:
                sub = Subscriber(port, "fgstop/#")
            except OSError:
                time.sleep(0.3)
        assert sub is not None, fg.output()
        sub.wait_for(lambda: len(detections(sub, "cam")) >= 10, 60, "10 detections")
        rc = fg.stop(signal.SIGTERM, group=True)
        assert rc == 0, fg.output()
        sub.wait_for(lambda: any(m.payload == b"offline" for m in sub.of("/availability")), 5, "offline")
        assert any(m.json()["state"] == "stopped" for m in sub.of("/streams/cam/state") if m.payload)
    finally:
        if sub is not None:
            sub.close()
        if fg.proc.poll() is None:
            fg.stop(signal.SIGKILL)
    out = fg.output()
    account = json.loads(re.search(r"mqtt: final account (\{.*\})", out).group(1))
    assert account["buffered"] == 0, account
    assert account["dropped_overflow"] == 0, account
    assert account["published_by_kind"]["detections"] == account["results"]["cam"], account
    assert "unavailable" not in out, out


@pytest.mark.slow
def test_sigterm_with_an_external_broker_during_a_hung_model_call(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str, framegrid_env: dict[str, str],
) -> None:
    """A model call hangs (the test-only fault hook) and SIGTERM arrives before its watchdog fires: framegrid
    exits 0 at once, without waiting for the hung call, and every result it made reached the broker."""
    import time

    import httpx

    from tests.support.configs import wait_ready
    from tests.support.configs import write_api_config as api_config

    port = free_port()
    cfg = api_config(tmp_path / "fg.toml", topic_prefix, mosquitto, port, {"cam": str(videos["cam1"])}, token=None)
    cfg.write_text(cfg.read_text().replace("imgsz = 320", "imgsz = 320\nhang_timeout = 20"))
    fg = Framegrid(cfg, {**framegrid_env, "FRAMEGRID_FAULTS": "1"}, tmp_path / "fg.log")
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_ready(http)
            sub.wait_for(lambda: len(sub.of("/streams/cam/detections")) >= 5, 60, "5 detections")
            assert http.post("/api/faults/slots/shapes.0", params={"kind": "hang"}).status_code == 204
            n = len(sub.of("/streams/cam/detections"))
            time.sleep(3.0)  # the next call hangs (for 40 s: twice its 20 s watchdog)
            assert len(sub.of("/streams/cam/detections")) <= n + 1, "no call was hanging"
        t0 = time.monotonic()
        rc = fg.stop(signal.SIGTERM, timeout=20)
        took = time.monotonic() - t0
        assert rc == 0, (rc, took, fg.output()[-3000:])
        assert took < 10, (rc, took, fg.output()[-3000:])
        sub.wait_for(lambda: any(m.payload == b"offline" for m in sub.of("/availability")), 5, "offline")
        assert any(m.json()["state"] == "stopped" for m in sub.of("/streams/cam/state") if m.payload)
    finally:
        sub.close()
        if fg.proc.poll() is None:
            fg.stop(signal.SIGKILL)
    out = fg.output()
    account = json.loads(re.search(r"mqtt: final account (\{.*\})", out).group(1))
    assert account["buffered"] == 0
    assert account["published_by_kind"]["detections"] == account["results"]["cam"]
    received = {m.json()["seq"] for m in sub.of("/streams/cam/detections")}
    assert len(received) == account["results"]["cam"], (len(received), account["results"])
    print(f"SIGTERM during a hung call: exit 0 after {took:.1f}s, {len(received)} results all received")
