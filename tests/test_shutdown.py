"""Stopping framegrid loses nothing, however the stop signal arrives."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from .conftest import Framegrid, Subscriber, free_port
from .test_e2e import detections, write_config


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
    assert account["buffered"] == 0 and account["dropped_overflow"] == 0, account
    assert account["published_by_kind"]["detections"] == account["results"]["cam"], account
    assert "unavailable" not in out, out
