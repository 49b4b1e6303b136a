"""The side-by-side benchmark's own logic on a short run: every system reports every field.

Speeds are not asserted (they belong to the benchmark's report, not to a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import ROOT

FIELDS = {"processed_fps", "per_stream_fps", "fairness", "latency_ms", "older_than_max_frame_age",
          "cpu_s_per_frame", "peak_rss_mb", "rss_growth_after_warmup", "rss_peak_growth",
          "rss_trend_per_10min", "runtime"}


@pytest.mark.slow
def test_bench_streams_short_looped_run(tmp_path: Path) -> None:
    """A 2-second clip served for longer than it lasts: the RTSP server loops it, every system
    keeps processing after the clip's end, and the JSON records the cameras actually served."""
    from streams.synthetic import camera_scene, write_video

    clip = tmp_path / "clip.mp4"
    write_video(clip, camera_scene(480, 270, 25.0), seconds=2.0, gop_seconds=1.0)
    out = tmp_path / "bench.json"
    systems = ("framegrid", "ultralytics-openvino", "decode-only", "ceiling")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench_streams", "--cameras", "2", "--imgsz", "320",
         "--seconds", "4", "--warmup", "4", "--systems", *systems, "--video", str(clip), "--json", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    machine = report["machine"]  # figures from two hosts compare only with their CPUs named
    assert machine["cores"] == os.cpu_count(), machine
    assert machine["model"], machine
    assert set(machine["isa"]) <= {"avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                   "amx_int8"}, machine
    assert f"machine: {machine['model']}, {machine['cores']} cores" in proc.stdout
    cam = report["settings"]["camera"]
    assert (cam["size"], cam["fps"], cam["codec"], cam["gop_frames"], cam["clip_frames"]) == ("480x270", 25.0, "h264",
                                                                                              25, 50)
    (res,) = report["results"]
    assert (res["cameras"], res["imgsz"]) == (2, 320)
    for system in systems:
        row = res["systems"][system]
        assert "error" not in row, row
        assert set(row) >= FIELDS, (system, FIELDS - set(row))
        # measured from 4 s to 8 s after the system started: only a looping camera has frames then
        assert set(row["per_stream_fps"]) == {"cam0", "cam1"}, row
        assert min(row["per_stream_fps"].values()) > 0, row
        assert row["cpu_s_per_frame"] > 0
        if system == "decode-only":  # frames decoded and dropped: nothing to time but the decoding
            assert row["latency_ms"] is None
            assert row["decode_threads"] == max(1, (os.cpu_count() or 1) // 2)
            assert row["processed_fps"] >= 2 * 25 * 0.9, row  # a 480x270 camera decodes in real time
            continue
        assert set(row["latency_ms"]) == {"p50", "p95", "p99", "max"}
        lat = row["latency_ms"]
        assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert 0 < row["fairness"] <= 1
        assert row["peak_rss_mb"] > 50
    assert res["systems"]["framegrid"]["runtime"] == res["systems"]["ceiling"]["runtime"]
    assert set(res["systems"]["framegrid"]["stages_ms_p50"]) >= {
        "decode", "queue", "preprocess", "inference", "postprocess", "publish"}
    r = res["ratios"]
    assert r["offered_fps"] == 50.0
    for key in ("framegrid_over_ultralytics_openvino_fps", "framegrid_over_ultralytics_openvino_p95",
                "framegrid_over_ultralytics_openvino_cpu_per_frame", "framegrid_over_decode_only_fps",
                "framegrid_over_ceiling_fps", "framegrid_over_limit", "framegrid_over_shared_limit"):
        assert r[key] is not None, key
        assert r[key] > 0, key
    # the limit: what decoding alone or inference alone reaches, at most what the cameras offer
    decode, infer = res["systems"]["decode-only"]["processed_fps"], res["systems"]["ceiling"]["processed_fps"]
    assert r["limit_fps"] == min(decode, infer, 50.0)
    assert r["shared_limit_fps"] <= r["limit_fps"]  # decoding's cores are not the detector's
    # ... nor are the camera server's (it runs on this machine only to serve the benchmark's cameras)
    dec, cores = res["systems"]["decode-only"], os.cpu_count() or 1
    left = cores - dec["cpu_s_per_frame"] * decode - dec["camera_server_cores"]
    assert r["shared_limit_fps"] == round(min(50.0, infer * max(0.0, left) / cores), 1)
    assert all(row.get("camera_server_cores", 0) >= 0 for row in res["systems"].values())
    assert {"vs_ultralytics_openvino", "vs_limit", "fairness", "none_older_than_max_frame_age"} <= set(r["targets"])
    agreement = res["agreement"]
    assert agreement["frames"] >= 10
    assert 0 <= agreement["at_0.7"]["f1"] <= 1
    assert "framegrid/ultralytics-openvino" in proc.stdout
    assert "framegrid/limit" in proc.stdout
    assert "agreement with YOLO.predict" in proc.stdout


@pytest.mark.slow
def test_bench_talkinghead_short_run(tmp_path: Path) -> None:
    """The talking-head benchmark on tiny models: every stage, the live ladder and the offline slots."""
    out = tmp_path / "talk.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench_talkinghead", "--live-seconds", "2", "--max-sessions", "2",
         "--offline-seconds", "2", "--slots", "1", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["models"].startswith("tiny random models")
    stages = report["stages_ms_per_frame"]
    assert set(stages) == {"features", "unet", "decode", "blend", "encode", "total"}
    assert all(v > 0 for v in stages.values())
    assert report["live"]
    assert all(r["frames"] == 50 * r["sessions"] for r in report["live"])
    one, two = report["offline"]
    assert (one["slots"], two["slots"]) == (1, 2)
    assert two["speedup"] == round(two["fps"] / one["fps"], 2)  # the 2-slot figure is its own measurement
    assert all(r["frames"] == 50 and r["fps"] > 0 for r in report["offline"])
    assert "sustainable at 25 fps" in proc.stdout


def test_rss_growth_sees_a_trend_and_not_the_swing() -> None:
    """A flat series swinging by 8% shows no growth; one climbing 5% over ten minutes shows it both ways."""
    from tools.bench_streams import rss_growth

    ts = [i * 0.5 for i in range(1200)]  # ten minutes, a sample every 0.5 s, as the benchmark samples
    swing = [(t, 500_000_000 + (40_000_000 if i % 97 == 0 else 0)) for i, t in enumerate(ts)]
    flat = rss_growth(swing)
    assert flat["rss_peak_growth"] == 0.0
    assert abs(flat["rss_trend_per_10min"] or 1) < 0.005
    climb = rss_growth([(t, int(500_000_000 * (1 + 0.05 * t / 600))) for t in ts])
    assert 0.035 < (climb["rss_peak_growth"] or 0) < 0.045  # peaks at 10 and 2 min: 1.05 / 1.01
    assert abs((climb["rss_trend_per_10min"] or 0) - 0.05) < 0.003
    assert rss_growth(swing[:5]) == {"rss_peak_growth": None, "rss_trend_per_10min": None}
