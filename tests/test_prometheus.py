"""Prometheus scrapes a real framegrid; the shipped Grafana dashboard queries only metrics that exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.configs import TOKEN, env_with_token, wait_ready, write_api_config
from tests.support.procs import ROOT, Framegrid, Mosquitto, free_port, wait_port

pytestmark = pytest.mark.slow
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "framegrid.json"


def start_prometheus(port: int, config: Path, tmp: Path) -> subprocess.Popen[bytes]:
    with (tmp / "prometheus.log").open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, 30)
    return proc


def query(client: httpx.Client, expr: str) -> list[dict[str, object]]:
    res = client.get("/api/v1/query", params={"query": expr})
    res.raise_for_status()
    return res.json()["data"]["result"]  # type: ignore[no-any-return]


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs, "the dashboard has no queries"
    names = {m for e in exprs for m in re.findall(r"\bframegrid_[a-z_]+", e)}
    # a histogram is queried through its series (_bucket/_sum/_count)
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_prometheus_scrapes_framegrid_and_dashboard_metrics_exist(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, framegrid_env: dict[str, str],
) -> None:
    api_port = free_port()
    cfg = write_api_config(tmp_path / "fg.toml", f"fgprom-{os.getpid()}", mosquitto, api_port,
                       {"cam1": str(videos["cam1"]), "cam2": str(videos["cam2"])})
    fg = Framegrid(cfg, env_with_token(framegrid_env), tmp_path / "fg.log")
    prom_port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = tmp_path / "prometheus.yml"
    shipped = (ROOT / "deploy" / "prometheus.yml").read_text()
    # the shipped scrape config, pointed at this framegrid and this token file
    config.write_text(shipped.replace("/run/secrets/framegrid_token", str(token_file))
                      .replace("framegrid:8080", f"127.0.0.1:{api_port}").replace("10s", "1s"))
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    prom = start_prometheus(prom_port, config, tmp_path)
    client = httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10)
    fgc = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {TOKEN}"},
                       timeout=10)
    try:
        wait_ready(fgc)
        deadline = time.monotonic() + 60
        rates: dict[str, float] = {}
        while time.monotonic() < deadline:
            rows = query(client, "rate(framegrid_frames_published_total[5s]) > 0")
            rates = {r["metric"]["stream"]: float(r["value"][1]) for r in rows}  # type: ignore[index]
            if set(rates) == {"cam1", "cam2"}:
                break
            time.sleep(1)
        assert set(rates) == {"cam1", "cam2"}, f"rates seen by Prometheus: {rates}"
        up = query(client, "up")
        assert up
        assert up[0]["value"][1] == "1"
        # a stream's latency series appear with its first result, a rate needs two scrapes of them
        p95: list[dict[str, object]] = []
        while time.monotonic() < deadline + 30:
            p95 = query(client, "histogram_quantile(0.95, sum by (le, stream) "
                                "(rate(framegrid_latency_seconds_bucket[10s])))")
            if {r["metric"]["stream"] for r in p95} == {"cam1", "cam2"}:  # type: ignore[index]
                break
            time.sleep(1)
        assert {r["metric"]["stream"] for r in p95} == {"cam1", "cam2"}, p95  # type: ignore[index]
        assert all(0 < float(r["value"][1]) < 2 for r in p95)  # type: ignore[index]

        # every metric the dashboard queries is exposed (a family may have no series yet, e.g.
        # GPU temperature on a CPU machine: its HELP/TYPE lines still name it)
        exposed = fgc.get("/metrics").text
        names_exposed = set(re.findall(r"^(?:# (?:TYPE|HELP) )?(framegrid_[a-z_]+)", exposed, re.M))
        missing = sorted(m for m in dashboard_metrics() if m not in names_exposed)
        assert not missing, f"the dashboard queries metrics framegrid does not expose: {missing}"
        # and those with samples have reached Prometheus under the same names
        names = set(client.get("/api/v1/label/__name__/values").json()["data"])
        assert {"framegrid_frames_published_total", "framegrid_latency_seconds_bucket",
                "framegrid_slot_busy_seconds_total", "framegrid_batch_size_bucket"} <= names
    finally:
        client.close()
        fgc.close()
        prom.terminate()
        prom.wait(10)
        assert fg.stop() == 0
