#!/usr/bin/env python3
"""Soak: framegrid for a long time against real RTSP cameras and a real Mosquitto, with faults.

    .venv/bin/python -m tools.soak [--cameras 8] [--minutes 60] [--seed 1] [--json out.json]

Every camera is its own gst-rtsp-server (so one can be killed or frozen alone); framegrid runs as a
child process (`framegrid run`, `FRAMEGRID_FAULTS=1`); a durable subscriber takes every message.
On a seeded schedule it injects, one at a time:

  camera      a camera's server killed, restarted 5 s later
  stall       a camera's server frozen (SIGSTOP) for 6 s: a network stall, no disconnect
  broker      Mosquitto stopped for 4 s and started again (persistent: the durable session stays)
  crash       an executor slot's next model call fails (test-only fault hook)
  hang        an executor slot's next model call hangs past the watchdog
  churn       a stream added through the HTTP API, then removed 10 s later

and measures each recovery: the first result of the affected stream(s) after the fault ends, against
its bound (camera: the reconnect cap + 2 s; stall: stall_timeout + reconnect cap + 2 s; broker: the
first delivery after it is back; slot: 2 s after the watchdog or error). Every 5 s it samples
framegrid's RSS, descriptors, threads and asyncio tasks (`/api/stats` -> `process`). At the end it
accounts for every frame of every camera (framegrid's final counters and account):

  decoded    = dispatched + dropped stale + dropped too_old (+ at most one frame left in the mailbox)
  dispatched = processed + dropped error (a batch in flight when its slot stops counts as error)
  processed  = results = published + dropped (broker away longer than the buffer)
  published  = received by the subscriber (QoS 1, durable session)

and prints a summary table (also `--json`). Exit status 0 when every target holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from tools.servers import Mosquitto, RtspServer, free_port

ROOT = Path(__file__).resolve().parent.parent

MODEL = ROOT / "models" / "shapes-yolo11n.pt"
TOKEN = uuid.uuid4().hex
RECONNECT_CAP = 2.0
STALL_TIMEOUT = 3.0
HANG_TIMEOUT = 1.0
KINDS = ("camera", "stall", "broker", "crash", "hang", "churn")


class Collector:
    """A durable paho subscriber: every message under the prefix, with its arrival time."""

    def __init__(self, port: int, prefix: str) -> None:
        import paho.mqtt.client as paho

        self.lock = threading.Lock()
        self.seqs: dict[str, set[int]] = {}
        self.seq_at: dict[tuple[str, int], float] = {}  # (stream, seq) -> arrival
        self.arrivals: dict[str, list[float]] = {}
        self.last_stats: dict[str, Any] | None = None
        self.prefix = prefix
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"soak-{uuid.uuid4().hex[:8]}",
                                  clean_session=False)
        self.client.on_message = self._on
        self.client.on_connect = lambda c, _u, _f, _rc, _p=None: c.subscribe(f"{prefix}/#", qos=1)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        now = time.time()
        with self.lock:
            if parts[-1] == "detections":
                data = json.loads(msg.payload)
                self.seqs.setdefault(data["stream"], set()).add(data["seq"])
                self.seq_at.setdefault((data["stream"], data["seq"]), now)
                self.arrivals.setdefault(data["stream"], []).append(now)
            elif parts[-1] == "stats":
                self.last_stats = json.loads(msg.payload)

    def first_after(self, stream: str, t: float) -> float | None:
        with self.lock:
            return next((a for a in self.arrivals.get(stream, []) if a > t), None)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_config(path: Path, prefix: str, broker: Mosquitto, cams: dict[str, RtspServer], api_port: int,
                 max_fps: float) -> None:
    lines = ["[mqtt]", f'url = "{broker.url}"', f'topic_prefix = "{prefix}"', "stats_interval = 2",
             "buffer = 20000", "reconnect_cap = 1.0",
             "[api]", f'listen = "127.0.0.1:{api_port}"', f'token = "{TOKEN}"',
             "[pipeline]", "status_interval = 0", "max_frame_age = 2.0",
             "[models.shapes]", 'type = "yolo"', f'weights = "{MODEL}"', "imgsz = 320",
             f"hang_timeout = {HANG_TIMEOUT}", "restart_budget = 100"]
    for name, server in cams.items():
        lines += [f"[streams.{name}]", f'url = "{server.url("cam")}"', 'model = "shapes"', f"max_fps = {max_fps}",
                  f"stall_timeout = {STALL_TIMEOUT}", f"reconnect_cap = {RECONNECT_CAP}", "open_timeout = 3"]
    path.write_text("\n".join(lines) + "\n")


def proc_figures(http: Any) -> dict[str, Any] | None:
    try:
        r = http.get("/api/stats")
        return r.json().get("process") if r.status_code == 200 else None
    except Exception:
        return None


def run(cameras: int, minutes: float, seed: int, max_fps: float = 4.0, gap_s: float | None = None,
        kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    import httpx

    from streams.synthetic import MovingScene, write_video

    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="fg-soak-"))
    video = work / "cam.mp4"
    write_video(video, MovingScene(seed=seed), seconds=30)
    broker = Mosquitto(work, persistent=True)
    broker.start()
    cams = {f"cam{i}": RtspServer({"cam": video}) for i in range(cameras)}
    for server in cams.values():
        server.start()
    prefix = f"soak-{uuid.uuid4().hex[:6]}"
    api_port = free_port()
    config = work / "soak.toml"
    write_config(config, prefix, broker, cams, api_port, max_fps)
    collector = Collector(broker.port, prefix)
    env = {**os.environ, "FRAMEGRID_FAULTS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = work / "framegrid.log"
    log = log_path.open("w")
    fg = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=10)
    faults: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not all(collector.first_after(c, 0) for c in cams):
            time.sleep(0.5)
        if not all(collector.first_after(c, 0) for c in cams):
            raise RuntimeError("not every camera published within 180 s:\n" + log_path.read_text()[-3000:])
        t_start = time.time()
        warm_until = t_start + min(60.0, minutes * 60 * 0.25)
        end = t_start + minutes * 60
        gap = gap_s if gap_s is not None else max(15.0, min(60.0, minutes * 60 / 40))
        next_fault = t_start + gap
        next_sample = t_start
        while time.time() < end:
            now = time.time()
            if now >= next_sample:
                fig = proc_figures(http)
                if fig is not None:
                    samples.append({"t": round(now - t_start, 1), "warm": now >= warm_until, **fig})
                next_sample = now + 5
            if now >= next_fault and end - now > 25:
                faults.append(inject(rng.choice(kinds), rng, cams, broker, http, collector))
                next_fault = time.time() + gap
            time.sleep(0.2)
        fg.send_signal(signal.SIGINT)
        rc = fg.wait(60)
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait(10)
        log.close()
        http.close()
        time.sleep(1.0)
        collector.close()
        for server in cams.values():
            server.kill()
        broker.stop()
    return report(rc, log_path.read_text(), collector, cams, faults, samples, minutes, cameras, t_start)


def inject(kind: str, rng: random.Random, cams: dict[str, RtspServer], broker: Mosquitto, http: Any,
           collector: Collector) -> dict[str, Any]:
    """One fault; returns its record with the measured recovery time and its bound."""
    cam = rng.choice(sorted(cams))
    t0 = time.time()
    rec: dict[str, Any] = {"kind": kind, "at": round(t0, 1)}
    watch, bound = [cam], RECONNECT_CAP + 2.0
    if kind == "camera":
        cams[cam].kill()
        time.sleep(5)
        cams[cam].start()
    elif kind == "stall":
        assert cams[cam].proc is not None
        cams[cam].proc.send_signal(signal.SIGSTOP)
        time.sleep(6)
        cams[cam].proc.send_signal(signal.SIGCONT)
        bound = STALL_TIMEOUT + RECONNECT_CAP + 2.0
    elif kind == "broker":
        broker.stop()
        time.sleep(4)
        broker.start()
        watch, bound = sorted(cams), 10.0  # framegrid's reconnect cap (1 s) + the subscriber's own reconnect
    elif kind in ("crash", "hang"):
        slots = sorted((collector.last_stats or {}).get("executors", {}))
        slot = rng.choice(slots) if slots else "shapes.0"
        r = http.post(f"/api/faults/slots/{slot}", params={"kind": kind})
        rec["slot"], rec["armed"] = slot, r.status_code
        watch = sorted(cams)
        bound = 2.0 + (HANG_TIMEOUT if kind == "hang" else 0.0)
    else:  # churn: a stream added through the API and removed again
        name = f"churn{int(t0)}"
        r = http.post("/api/streams", json={"name": name, "url": cams[cam].url("cam"), "model": "shapes",
                                            "max_fps": 2})
        rec["added"] = r.status_code
        first = None
        limit = time.time() + 30
        while time.time() < limit and first is None:
            first = collector.first_after(name, t0)
            time.sleep(0.2)
        time.sleep(max(0.0, 10 - (time.time() - t0)))
        rec["removed"] = http.delete(f"/api/streams/{name}").status_code
        rec["recovered_s"] = None if first is None else round(first - t0, 2)
        rec["bound_s"] = 30.0
        rec["ok"] = first is not None and rec["added"] == 201 and rec["removed"] == 204
        return rec
    t_back = time.time()
    limit = t_back + 60
    firsts: list[float | None] = [None] * len(watch)
    while time.time() < limit and not all(firsts):
        firsts = [collector.first_after(s, t_back) for s in watch]
        time.sleep(0.1)
    worst = max((f - t_back for f in firsts if f is not None), default=None) if all(firsts) else None
    # a slot fault shows as the longest silence of any stream after it
    rec["recovered_s"] = None if worst is None else round(worst, 2)
    rec["bound_s"] = bound
    rec["ok"] = worst is not None and worst <= bound
    return rec


def report(rc: int, log: str, collector: Collector, cams: dict[str, RtspServer], faults: list[dict[str, Any]],
           samples: list[dict[str, Any]], minutes: float, cameras: int, t_start: float) -> dict[str, Any]:
    line = next((ln for ln in log.splitlines() if "mqtt: final account " in ln), None)
    final = json.loads(line.split("mqtt: final account ", 1)[1]) if line else {}
    stats = collector.last_stats or {}
    accounts = {}
    for name in cams:
        s = stats.get("streams", {}).get(name, {})
        drops = s.get("drops", {})
        results = final.get("results", {}).get(name)
        received = len(collector.seqs.get(name, set()))
        accounts[name] = {
            "decoded": s.get("decoded"), "dispatched": s.get("dispatched"), "processed": s.get("processed"),
            "stale": drops.get("stale"), "too_old": drops.get("too_old"), "error": drops.get("error"),
            "results": results, "received": received,
            # a frame too old when its slot takes it is dropped there, before it counts as dispatched
            "decode_gap": None if not s else s["decoded"] - s["dispatched"] - drops.get("stale", 0)
            - drops.get("too_old", 0),
            "dispatch_gap": None if not s else s["dispatched"] - s["processed"] - drops.get("error", 0),
            "result_gap": None if not s or results is None else s["processed"] - results,
        }
    published = final.get("published_by_kind", {}).get("detections")
    dropped = final.get("dropped_by_kind", {}).get("detections", 0)
    # streams added and removed (churn) are gone from the final account: their results are their last seq
    churn = {n: max(v) for n, v in collector.seqs.items() if n not in cams and v}
    total_results = sum(a["results"] or 0 for a in accounts.values()) + sum(churn.values())
    total_received = sum(len(v) for v in collector.seqs.values())
    warm = [x for x in samples if x["warm"] and x.get("rss_mb")]
    rss_growth = (warm[-1]["rss_mb"] / warm[0]["rss_mb"] - 1) if len(warm) >= 2 else None
    all_seen_at, rss_growth_each_once, slope = rss_diagnostics(warm, faults, t_start)

    def spread(key: str) -> tuple[Any, Any]:
        vals = [x[key] for x in warm if x.get(key) is not None]
        return (min(vals), max(vals)) if vals else (None, None)

    # results the subscriber never received, and whether each falls in a broker restart (from the
    # arrivals of its nearest received neighbours)
    windows = [(f["at"], f["at"] + 4 + (f.get("recovered_s") or 10)) for f in faults if f["kind"] == "broker"]
    lost, lost_outside = 0, 0
    for name in cams:
        got = collector.seqs.get(name, set())
        results = accounts[name]["results"] or 0
        for k in range(1, results + 1):
            if k in got:
                continue
            lost += 1
            before = next((collector.seq_at[(name, j)] for j in range(k - 1, 0, -1) if j in got), 0.0)
            after = next((collector.seq_at[(name, j)] for j in range(k + 1, results + 1) if j in got), float("inf"))
            lo, hi = before, after
            if not any(lo <= w_hi and hi >= w_lo for w_lo, w_hi in windows):
                lost_outside += 1
    unaccounted = sum(abs(a["decode_gap"] or 0) > 1 or abs(a["dispatch_gap"] or 0) > 0 or abs(a["result_gap"] or 0) > 0
                      for a in accounts.values())
    out = {
        "cameras": cameras,
        "minutes": minutes,
        "exit_code": rc,
        "faults": faults,
        "faults_recovered_in_bound": sum(1 for f in faults if f.get("ok")),
        "faults_total": len(faults),
        "accounts": accounts,
        "streams_with_unaccounted_frames": unaccounted,
        "results": total_results,
        "published": published,
        "dropped_overflow": dropped,
        "received": total_received,
        "published_minus_received": None if published is None else published - total_received,
        "not_received": lost,
        "not_received_outside_broker_restarts": lost_outside,
        "rss_growth_after_warmup": None if rss_growth is None else round(rss_growth, 4),
        "rss_growth_after_each_fault_kind_once": None
        if rss_growth_each_once is None
        else round(rss_growth_each_once, 4),
        "rss_from_each_fault_kind_once_s": None if all_seen_at is None else round(all_seen_at),
        "rss_slope_mb_per_hour_second_half": None if slope is None else round(slope, 1),
        "fds_min_max": spread("fds"),
        "threads_min_max": spread("threads"),
        "tasks_min_max": spread("tasks"),
        "samples": samples,
    }
    out["targets"] = {
        "zero_unaccounted_frames": unaccounted == 0 and published is not None and published + dropped == total_results,
        "published_equals_received": published is not None and published == total_received,
        "received_all_but_across_broker_restarts": lost_outside == 0,
        "rss_growth_below_5pct": rss_growth is not None and rss_growth < 0.05,
        "fds_flat": _no_growth(warm, "fds"),
        "threads_flat": _no_growth(warm, "threads"),
        "every_fault_recovered_in_bound": all(f.get("ok") for f in faults),
        "clean_exit": rc == 0,
    }
    return out


def rss_diagnostics(
    warm: list[dict[str, Any]], faults: list[dict[str, Any]], t_start: float
) -> tuple[float | None, float | None, float | None]:
    """Beside the target's growth after warm-up: (seconds into the run when every fault kind of the
    run had happened once and recovered, RSS growth from then to the end, RSS trend over the second
    half of the warm samples in MB/h). The first of each kind does its recovery path's first
    allocations; a plateau's trend is about 0, a leak's is not."""
    kinds = {f["kind"] for f in faults}
    seen: set[str] = set()
    all_seen_at = None
    for f in faults:
        seen.add(f["kind"])
        if seen == kinds:
            all_seen_at = f["at"] + 10 - t_start
            break
    after = [x for x in warm if all_seen_at is not None and x["t"] >= all_seen_at]
    growth = (after[-1]["rss_mb"] / after[0]["rss_mb"] - 1) if len(after) >= 2 else None
    half = warm[len(warm) // 2 :]
    slope = None
    if len(half) >= 3:
        hours = np.array([x["t"] for x in half]) / 3600
        slope = float(np.polyfit(hours, np.array([x["rss_mb"] for x in half]), 1)[0])
    return all_seen_at, growth, slope


def _no_growth(warm: list[dict[str, Any]], key: str, slack: int = 8) -> bool:
    """The count's level (the maximum of each quarter of the run) does not climb by more than
    `slack`. Samples taken while a slot is being replaced read lower (its threads are gone, the new
    ones not yet there); those dips are not growth, so a min-max span would misread them."""
    vals = [x[key] for x in warm if x.get(key) is not None]
    if len(vals) < 4:
        return _flat((min(vals), max(vals)) if vals else (None, None), slack)
    q = len(vals) // 4
    levels = [max(vals[i * q : (i + 1) * q if i < 3 else None]) for i in range(4)]
    return max(levels) - min(levels) <= slack


def _flat(span: tuple[Any, Any], slack: int = 8) -> bool:
    lo, hi = span
    return lo is not None and hi - lo <= slack


def summary(r: dict[str, Any]) -> str:
    rows = [
        f"soak: {r['cameras']} cameras, {r['minutes']:g} min, {r['faults_total']} faults",
        "",
        "| fault | recovered (s) | bound (s) | ok |",
        "|---|---|---|---|",
    ]
    for f in r["faults"]:
        rows.append(
            f"| {f['kind']}{' ' + f['slot'] if 'slot' in f else ''} | {f.get('recovered_s')} | "
            f"{f.get('bound_s')} | {'yes' if f.get('ok') else 'NO'} |"
        )
    rows += [
        "",
        "| figure | value |",
        "|---|---|",
        f"| results / published / dropped / received | {r['results']} / {r['published']} / "
        f"{r['dropped_overflow']} / {r['received']} |",
        f"| streams with unaccounted frames | {r['streams_with_unaccounted_frames']} |",
        f"| published but not received (of which outside broker restarts) | {r['not_received']} "
        f"({r['not_received_outside_broker_restarts']}) |",
        f"| RSS growth after warm-up | {r['rss_growth_after_warmup']} |",
        f"| RSS growth after each fault kind once (from {r['rss_from_each_fault_kind_once_s']} s) | "
        f"{r['rss_growth_after_each_fault_kind_once']} |",
        f"| RSS trend over the second half (MB/h) | {r['rss_slope_mb_per_hour_second_half']} |",
        f"| descriptors / threads / tasks (min-max) | {r['fds_min_max']} / {r['threads_min_max']} / "
        f"{r['tasks_min_max']} |",
        "",
        "| target | holds |",
        "|---|---|",
    ]
    rows += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in r["targets"].items()]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-fps", type=float, default=4.0)
    ap.add_argument("--gap", type=float, help="seconds between faults (default: the run's length / 40, 15-60 s)")
    ap.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        help="the faults to draw from (to find which one a figure follows)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    r = run(args.cameras, args.minutes, args.seed, args.max_fps, args.gap, tuple(args.kinds))
    print(summary(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0 if all(r["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
