"""The side-by-side benchmark's own logic on a short run: every system reports every field.

Speeds are not asserted (they belong to the benchmark's report, not to a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

FIELDS = {"processed_fps", "per_stream_fps", "fairness", "latency_ms", "cpu_s_per_frame", "peak_rss_mb",
          "rss_growth_after_warmup", "runtime"}


@pytest.mark.slow
def test_bench_streams_short_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_streams.py"), "--cameras", "2", "--imgsz", "320",
         "--seconds", "4", "--warmup", "4", "--systems", "framegrid", "ultralytics", "ceiling",
         "--json", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (res,) = report["results"]
    assert (res["cameras"], res["imgsz"]) == (2, 320)
    for system in ("framegrid", "ultralytics", "ceiling"):
        row = res["systems"][system]
        assert "error" not in row, row
        assert FIELDS <= set(row), (system, FIELDS - set(row))
        assert row["processed_fps"] > 0 and set(row["per_stream_fps"]) == {"cam0", "cam1"}
        assert set(row["latency_ms"]) == {"p50", "p95", "p99"}
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p95"] <= row["latency_ms"]["p99"]
        assert 0 < row["fairness"] <= 1 and row["cpu_s_per_frame"] > 0 and row["peak_rss_mb"] > 50
    assert res["systems"]["framegrid"]["runtime"] == res["systems"]["ceiling"]["runtime"]
    assert set(res["systems"]["framegrid"]["stages_ms_p50"]) >= {
        "decode", "queue", "preprocess", "inference", "postprocess", "publish"}
    for key in ("framegrid_over_ultralytics_fps", "framegrid_over_ultralytics_p95", "framegrid_over_ceiling_fps",
                "framegrid_over_attainable_fps"):
        assert res["ratios"][key] is not None and res["ratios"][key] > 0, key
    assert "framegrid/ultralytics" in proc.stdout  # the table


@pytest.mark.slow
def test_bench_talkinghead_short_run(tmp_path: Path) -> None:
    """The talking-head benchmark on tiny models: every stage, the live ladder and the offline slots."""
    out = tmp_path / "talk.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_talkinghead.py"), "--live-seconds", "2", "--max-sessions", "2",
         "--offline-seconds", "2", "--slots", "1", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["models"].startswith("tiny random models")
    stages = report["stages_ms_per_frame"]
    assert set(stages) == {"features", "unet", "decode", "blend", "encode", "total"}
    assert all(v > 0 for v in stages.values())
    assert report["live"] and all(r["frames"] == 50 * r["sessions"] for r in report["live"])
    assert [r["slots"] for r in report["offline"]] == [1, 2] and report["offline"][0]["speedup"] == 1.0
    assert all(r["frames"] == 50 and r["fps"] > 0 for r in report["offline"])
    assert "sustainable at 25 fps" in proc.stdout
