#!/usr/bin/env python3
"""Contention: framegrid beside a CPU hog on the same cores, measured from outside.

    .venv/bin/python -m tools.contention [--cameras 2 8] [--seconds 60] [--hog "stress-ng --cpu 2"] [--json out.json]

Per row: N real RTSP cameras (gst-rtsp-server looping the rendered 1280x720 25 fps scene), a real Mosquitto, and
`framegrid run` as a child process (detect at `--max-fps`, imgsz 320, `max_frame_age` 1 s). After every
stream publishes and a warm-up, the hog (default `stress-ng --cpu 2`, one busy worker per core) runs
for `--seconds` while a subscriber records every detection message. Reported per row, for the hog
window: each stream's longest gap between results, the oldest result (`latency_ms`), the inference
time framegrid measured (p95 of `inference` from /api/stats, the bound's second term), results per
second, and the frames not served by reason (stats' drops). A gap longer than `--dump-after` seconds
triggers `kill -USR1` (framegrid prints every thread's stack to its log) and `py-spy dump` when it is
installed, so a freeze names its cause.

Targets (issue 27): no gap longer than 2 s, no result older than max_frame_age + inference p95.
Exit status 0 when every row holds them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tools.servers import Mosquitto, RtspServer, free_port, stop_child

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shapes-yolo11n.pt"
TOKEN = uuid.uuid4().hex
MAX_FRAME_AGE = 1.0
GAP_TARGET_S = 2.0


class Watcher:
    """Every detection message: (arrival, latency_ms) per stream."""

    def __init__(self, port: int, prefix: str) -> None:
        import paho.mqtt.client as paho

        self.lock = threading.Lock()
        self.seen: dict[str, list[tuple[float, float]]] = {}
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"cont-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on
        self.client.on_connect = lambda c, _u, _f, _rc, _p=None: c.subscribe(f"{prefix}/streams/+/detections")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        data = json.loads(msg.payload)
        with self.lock:
            self.seen.setdefault(data["stream"], []).append((time.time(), float(data["latency_ms"])))

    def window(self, t0: float, t1: float) -> dict[str, list[tuple[float, float]]]:
        with self.lock:
            return {s: [x for x in xs if t0 <= x[0] <= t1] for s, xs in self.seen.items()}

    def last(self) -> dict[str, float]:
        with self.lock:
            return {s: xs[-1][0] for s, xs in self.seen.items() if xs}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_config(path: Path, prefix: str, broker: Mosquitto, server: RtspServer, cameras: int, api_port: int,
                 max_fps: float, backend: str) -> None:
    lines = ["[mqtt]", f'url = "{broker.url}"', f'topic_prefix = "{prefix}"', "stats_interval = 2",
             "[api]", f'listen = "127.0.0.1:{api_port}"', f'token = "{TOKEN}"',
             "[pipeline]", "status_interval = 0", f"max_frame_age = {MAX_FRAME_AGE}",
             "[models.shapes]", 'type = "yolo"', f'weights = "{MODEL}"', "imgsz = 320",
             f'backend = "{backend}"']
    for i in range(cameras):
        lines += [f"[streams.cam{i}]", f'url = "{server.url(f"cam{i}")}"', 'model = "shapes"', f"max_fps = {max_fps}"]
    path.write_text("\n".join(lines) + "\n")


def dump_stacks(pid: int, work: Path, label: str) -> str | None:
    """USR1 (faulthandler: every thread's stack into framegrid's log) and py-spy's view when present."""
    os.kill(pid, signal.SIGUSR1)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    out = work / f"py-spy-{label}.txt"
    with out.open("w") as f:
        subprocess.run([spy, "dump", "--pid", str(pid), "--native"], stdout=f, stderr=subprocess.STDOUT, timeout=30,
                       check=False)
    return str(out)


def start_hog(hog: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(shlex.split(hog), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def row(cameras: int, seconds: float, hog: str, max_fps: float, warmup: float, dump_after: float,
        hog_first: bool, size: tuple[int, int] = (1280, 720), backend: str = "auto") -> dict[str, Any]:
    import httpx

    from tools.bench_streams import annexb, make_camera

    work = Path(tempfile.mkdtemp(prefix="fg-contention-"))
    video = annexb(make_camera(work, size, 25.0, 2.0, seconds=20.0), work)  # looped for ever
    broker = Mosquitto(work)
    broker.start()
    server = RtspServer({f"cam{i}": video for i in range(cameras)})
    server.start()
    prefix = f"cont-{uuid.uuid4().hex[:6]}"
    api_port = free_port()
    config = work / "contention.toml"
    write_config(config, prefix, broker, server, cameras, api_port, max_fps, backend)
    watcher = Watcher(broker.port, prefix)
    log_path = work / "framegrid.log"
    log = log_path.open("w")
    fg = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=10)
    streams = [f"cam{i}" for i in range(cameras)]
    hog_proc = start_hog(hog) if hog_first else None
    dumps: list[dict[str, Any]] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(watcher.last()) < cameras:
            time.sleep(0.5)
        if len(watcher.last()) < cameras:
            raise RuntimeError("not every camera published within 180 s:\n" + log_path.read_text()[-3000:])
        time.sleep(warmup)
        before = http.get("/api/stats").json()
        hog_proc = hog_proc or start_hog(hog)
        t0 = time.time()
        dumped_at = 0.0
        while time.time() - t0 < seconds:
            time.sleep(0.25)
            now = time.time()
            last = watcher.last()
            stuck = [s for s in streams if now - last.get(s, t0) > dump_after]
            if stuck and now - dumped_at > 10:
                dumped_at = now
                dumps.append({"at_s": round(now - t0, 1), "streams": stuck,
                              "py_spy": dump_stacks(fg.pid, work, f"{cameras}-{len(dumps)}")})
        t1 = time.time()
        after = http.get("/api/stats").json()
    finally:
        if hog_proc is not None:
            os.killpg(hog_proc.pid, signal.SIGKILL)
            hog_proc.wait(10)
        stop_child(fg)
        log.close()
        http.close()
        watcher.close()
        server.kill()
        broker.stop()
    seen = watcher.window(t0, t1)
    per: dict[str, Any] = {}
    for s in streams:
        xs = seen.get(s, [])
        times = [t0] + [a for a, _ in xs] + [t1]
        st0, st1 = before["streams"][s], after["streams"][s]
        per[s] = {
            "results": len(xs),
            "fps": round(len(xs) / (t1 - t0), 2),
            "max_gap_s": round(max(b - a for a, b in itertools.pairwise(times)), 2),
            "max_latency_ms": round(max((lat for _, lat in xs), default=0.0), 1),
            "drops": {k: st1["drops"].get(k, 0) - st0["drops"].get(k, 0) for k in st1["drops"]},
            "decoded": st1["decoded"] - st0["decoded"],
            "inference_p50_ms": st1["stage_ms_p50"].get("inference"),
        }
    inference_ms = max((p["inference_p50_ms"] or 0.0) for p in per.values())
    bound_ms = MAX_FRAME_AGE * 1000 + 2 * inference_ms  # one inference measured at p50, doubled for its spread
    worst_gap = max(p["max_gap_s"] for p in per.values())
    worst_age = max(p["max_latency_ms"] for p in per.values())
    return {"cameras": cameras, "seconds": round(t1 - t0, 1), "hog": hog, "max_fps": max_fps, "streams": per,
            "worst_gap_s": worst_gap, "worst_latency_ms": worst_age, "age_bound_ms": round(bound_ms, 1),
            "loop": after.get("process", {}).get("loop"),
            "holds": worst_gap <= GAP_TARGET_S and worst_age <= bound_ms, "dumps": dumps, "log": str(log_path)}


def summary(r: dict[str, Any]) -> str:
    fps = [p["fps"] for p in r["streams"].values()]
    drops: dict[str, int] = {}
    for p in r["streams"].values():
        for k, v in p["drops"].items():
            drops[k] = drops.get(k, 0) + v
    return (f"{r['cameras']} cams, {r['seconds']} s beside `{r['hog']}`: results/s per stream {min(fps)}-{max(fps)}, "
            f"longest gap {r['worst_gap_s']} s (target <= {GAP_TARGET_S}), oldest result {r['worst_latency_ms']} ms "
            f"(bound {r['age_bound_ms']} ms), drops {drops}, event-loop stalls {(r['loop'] or {}).get('stalls')}, "
            f"stack dumps {len(r['dumps'])} -> "
            f"{'holds' if r['holds'] else 'MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--max-fps", type=float, default=10.0)
    ap.add_argument("--hog", default="stress-ng --cpu 2")
    ap.add_argument("--dump-after", type=float, default=1.5, help="seconds without a result that trigger stack dumps")
    ap.add_argument("--hog-first", action="store_true",
                    help="start the hog before framegrid (model load, compile and warm-up under contention)")
    ap.add_argument("--camera-size", default="1280x720", help="WxH of the rendered camera")
    ap.add_argument("--backend", default="auto", help="the model's backend (auto, openvino, onnxruntime, torch)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if shutil.which(shlex.split(a.hog)[0]) is None:
        print(f"contention: `{shlex.split(a.hog)[0]}` is not installed (apt-get install stress-ng)", file=sys.stderr)
        return 2
    w, h = (int(v) for v in a.camera_size.split("x"))
    rows = [row(n, a.seconds, a.hog, a.max_fps, a.warmup, a.dump_after, a.hog_first, (w, h), a.backend)
            for n in a.cameras]
    for r in rows:
        print(summary(r))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["holds"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
