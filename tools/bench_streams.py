"""Side-by-side multi-camera benchmark: framegrid vs ultralytics' multi-stream predict vs the bare backend.

One run, one machine, one model, the same RTSP cameras for every system:

    .venv/bin/python tools/bench_streams.py --cameras 4 8 --imgsz 320 640 --seconds 60 --json bench.json

For each (cameras, imgsz) it starts the test RTSP server (tools/rtsp_server.py) with N cameras
playing a synthetic shapes video (640x360 at 15 fps), and runs each system in its own process
(one inference runtime per process, CPU time and memory measured per system):

  framegrid         the real pipeline (sources, batchers, slots, MQTT publishing to a local
                    Mosquitto, or the embedded broker when Mosquitto is absent), backend `auto`
  framegrid-torch   the same with backend torch, for reference
  ultralytics       `YOLO(weights).predict(source=<.streams file>, stream=True)`, torch, what most
                    users would run instead (frames timestamped where OpenCV hands them over)
  ultralytics-openvino  the same on ultralytics' own OpenVINO export
  ceiling           the bare best backend looping over pre-decoded frames: no I/O, no decode

Per system: processed frames/s in total, per-stream fairness (min/max processed fps),
capture-to-result latency p50/p95/p99, CPU seconds per processed frame, peak RSS and its growth
after warm-up; and the ratios framegrid/ultralytics and framegrid/ceiling. Table on stdout,
everything in JSON. Latency: from the moment the decoder hands a frame over to the moment its
result is published (framegrid) or yielded (ultralytics). Speeds are not asserted anywhere; the
test suite runs this on a short clip to check that every field is produced.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "models" / "shapes-yolo11n.pt"
SYSTEMS = ("framegrid", "framegrid-torch", "ultralytics", "ultralytics-openvino", "ceiling")
FPS = 15.0


# -- measurement helpers (run inside each worker) ----------------------------------------------------
class Recorder:
    """Results per stream with their latency, CPU time and RSS over the measured window."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.t_start = time.monotonic()
        self.warm_at = self.t_start + warmup
        self.end_at = self.warm_at + seconds
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.latencies: list[float] = []
        self.cpu0: float | None = None
        self.rss: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True, name="bench-rss")
        self._sampler.start()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.5):
            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * page
            self.rss.append((time.monotonic() - self.t_start, rss))
            if self.cpu0 is None and time.monotonic() >= self.warm_at:
                self.cpu0 = time.process_time()

    @property
    def measuring(self) -> bool:
        now = time.monotonic()
        return self.warm_at <= now < self.end_at

    @property
    def done(self) -> bool:
        return time.monotonic() >= self.end_at

    def record(self, stream: str, latency_s: float | None) -> None:
        if not self.measuring:
            return
        with self.lock:
            self.counts[stream] = self.counts.get(stream, 0) + 1
            if latency_s is not None:
                self.latencies.append(latency_s * 1000)

    def summary(self, streams: list[str], seconds: float) -> dict[str, Any]:
        import numpy as np

        self._stop.set()
        cpu = time.process_time() - (self.cpu0 or 0.0)
        total = sum(self.counts.values())
        per = [self.counts.get(s, 0) / seconds for s in streams]
        lat = np.asarray(self.latencies) if self.latencies else None
        warm = self.warm_at - self.t_start
        after = [r for t, r in self.rss if t >= warm]
        rss_warm = after[0] if after else None
        return {
            "processed_fps": round(total / seconds, 2),
            "per_stream_fps": {s: round(f, 2) for s, f in zip(streams, per, strict=True)},
            "fairness": round(min(per) / max(per), 3) if per and max(per) > 0 else None,
            "latency_ms": None if lat is None else {
                q: round(float(np.percentile(lat, int(q[1:]))), 1) for q in ("p50", "p95", "p99")},
            "cpu_s_per_frame": round(cpu / total, 4) if total else None,
            "peak_rss_mb": round(max(r for _, r in self.rss) / 2**20, 1) if self.rss else None,
            "rss_growth_after_warmup": round((max(after) - rss_warm) / rss_warm, 4) if rss_warm else None,
            # (seconds since start, MB) every ~10 s, to see whether memory settles or keeps growing
            "rss_timeline_mb": [(round(t), round(r / 2**20, 1)) for t, r in self.rss[::20]],
        }


# -- workers ------------------------------------------------------------------------------------------
def run_framegrid(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    import asyncio

    from pipeline import Pipeline, parse_config

    streams = {f"cam{i}": url for i, url in enumerate(args.urls)}
    mqtt_url = args.mqtt or "embedded"
    cfg = parse_config({
        "mqtt": {"url": mqtt_url, "topic_prefix": "bench", "stats_interval": 10,
                 **({"embedded_port": 0} if mqtt_url == "embedded" else {})},
        "models": {"m": {"type": "yolo", "weights": str(args.weights), "imgsz": args.imgsz, "backend": backend,
                         "batch_size": min(len(streams), 8)}},
        "streams": {n: {"url": u, "model": "m", "stall_timeout": 20} for n, u in streams.items()},
        "pipeline": {"status_interval": 0, "max_frame_age": 2.0,
                     **({} if args.malloc_mmap_threshold_kb is None
                        else {"malloc_mmap_threshold_kb": args.malloc_mmap_threshold_kb})},
        "devices": {"cpu_slots": args.cpu_slots},
    }, ROOT)
    rec = Recorder(args.warmup, args.seconds)

    class Latency:
        """A result sink: capture-to-publish latency of every result (published to MQTT as well)."""

        def emit(self, result: Any) -> None:
            rec.record(result.stream.name, result.published_at - result.frame.captured_at)

    async def main() -> dict[str, Any]:
        async with Pipeline(cfg, sinks=[Latency()]) as pipeline:
            while not rec.done and not pipeline.done:  # a pipeline that died raises on leaving the block
                await asyncio.sleep(0.2)
            out = rec.summary(list(streams), args.seconds)
            out["runtime"] = next(iter(pipeline.plan.runtimes.values()), "torch")
            out["stages_ms_p50"] = pipeline.stats_payload()["streams"]["cam0"]["stage_ms_p50"]
        return out

    return asyncio.run(main())


def run_ultralytics(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    from detectors import prepare_ultralytics_offline

    prepare_ultralytics_offline()
    import ultralytics.data.loaders as loaders
    from ultralytics import YOLO

    captured: dict[int, float] = {}
    real = loaders.cv2.VideoCapture

    class StampedCapture:
        """OpenCV's capture with each frame timestamped when it is handed over (for latency only)."""

        def __init__(self, *a: Any) -> None:
            self._cap = real(*a)

        def read(self) -> tuple[bool, Any]:
            ok, im = self._cap.read()
            if ok and im is not None:
                captured[id(im)] = time.time()
            return ok, im

        def retrieve(self) -> tuple[bool, Any]:
            ok, im = self._cap.retrieve()
            if ok and im is not None:
                captured[id(im)] = time.time()
            return ok, im

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cap, name)

    class _CV2:
        def __getattr__(self, name: str) -> Any:
            return StampedCapture if name == "VideoCapture" else getattr(real_cv2, name)

    real_cv2 = loaders.cv2
    loaders.cv2 = _CV2()
    weights = str(args.weights)
    if fmt == "openvino":
        from detectors.export import ensure_export

        weights = str(ensure_export(Path(args.weights), args.imgsz, "openvino"))
    streams_file = Path(tempfile.mkdtemp()) / "cams.streams"
    streams_file.write_text("\n".join(args.urls) + "\n")
    model = YOLO(weights, task="detect")
    rec = Recorder(args.warmup, args.seconds)
    names = [f"cam{i}" for i in range(len(args.urls))]
    for r in model.predict(source=str(streams_file), stream=True, imgsz=args.imgsz, verbose=False):
        t = captured.pop(id(r.orig_img), None)
        rec.record(_stream_of(r.path, args.urls, names), None if t is None else time.time() - t)
        if rec.done:
            break
    out = rec.summary(names, args.seconds)
    out["runtime"] = "openvino" if fmt == "openvino" else "torch"
    return out


def _stream_of(path: str, urls: list[str], names: list[str]) -> str:
    from ultralytics.utils import ops

    for url, name in zip(urls, names, strict=True):
        if ops.clean_str(url).replace(os.sep, "_") == path:
            return name
    return path


def run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """The best backend alone on pre-decoded frames (converted as framegrid's decoders do)."""
    import av

    from detectors.runtimes import build_detector, resolve_backend
    from streams.frame import fit_size

    frames = []
    with av.open(str(args.video)) as c:
        for vf in c.decode(video=0):
            w, h = fit_size(vf.width, vf.height, args.imgsz)
            frames.append(vf.to_ndarray(format="bgr24", width=w, height=h, interpolation="FAST_BILINEAR"))
            if len(frames) >= 64:
                break
    runtime = resolve_backend("auto", "cpu")
    batch = min(len(args.urls), 8)
    det = build_detector(runtime, "m", args.weights, imgsz=args.imgsz, confidence=0.25, iou=0.45, device="cpu",
                         threads=os.cpu_count(), max_batch=batch)
    det.load()
    det.warmup()
    rec = Recorder(args.warmup, args.seconds)
    i = 0
    while not rec.done:
        imgs = [frames[(i + k) % len(frames)] for k in range(batch)]
        t0 = time.time()
        det.infer(imgs)
        for k in range(batch):
            rec.record(f"cam{(i + k) % len(args.urls)}", time.time() - t0)
        i += batch
    out = rec.summary([f"cam{k}" for k in range(len(args.urls))], args.seconds)
    out["runtime"] = runtime
    return out


def worker(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    system = args.worker
    if system == "framegrid":
        out = run_framegrid(args, "auto")
    elif system == "framegrid-torch":
        out = run_framegrid(args, "torch")
    elif system == "ultralytics":
        out = run_ultralytics(args, "pt")
    elif system == "ultralytics-openvino":
        out = run_ultralytics(args, "openvino")
    elif system == "ceiling":
        out = run_ceiling(args)
    else:
        raise SystemExit(f"unknown system {system}")
    Path(args.out).write_text(json.dumps(out))


# -- the driver -----------------------------------------------------------------------------------------
def make_video(path: Path, seconds: float) -> None:
    from streams.synthetic import MovingScene, write_video

    if not path.exists():
        write_video(path, MovingScene(seed=7, fps=FPS), seconds=seconds)


def run_system(system: str, urls: list[str], imgsz: int, args: argparse.Namespace, video: Path,
               mqtt: str | None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--out", str(out),
           "--imgsz", str(imgsz), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
           "--weights", str(args.weights), "--video", str(video), "--cpu-slots", str(args.cpu_slots),
           *(["--malloc-mmap-threshold-kb", str(args.malloc_mmap_threshold_kb)]
             if args.malloc_mmap_threshold_kb is not None else []),
           "--urls", *urls]
    if mqtt:
        cmd += ["--mqtt", mqtt]
    timeout = args.seconds + args.warmup + 240
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0 or not out.stat().st_size:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(out.read_text())
    out.unlink()
    # what the system warned about while it ran (reconnects, stalls): helps read a bad row
    result["warnings"] = [line for line in (proc.stderr or "").splitlines() if "WARNING" in line or "ERROR" in line][-20:]
    return result


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    fg, ul, ce = rows.get("framegrid", {}), rows.get("ultralytics", {}), rows.get("ceiling", {})
    out: dict[str, Any] = {}

    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if a and b else None

    out["framegrid_over_ultralytics_fps"] = ratio(fg.get("processed_fps"), ul.get("processed_fps"))
    fg_p95 = (fg.get("latency_ms") or {}).get("p95")
    ul_p95 = (ul.get("latency_ms") or {}).get("p95")
    out["framegrid_over_ultralytics_p95"] = ratio(fg_p95, ul_p95)
    out["framegrid_over_ceiling_fps"] = ratio(fg.get("processed_fps"), ce.get("processed_fps"))
    offered = FPS * rows.get("_cameras", 0)
    if ce.get("processed_fps"):
        # when the cameras offer fewer frames than the backend could take, that is the real ceiling
        out["framegrid_over_attainable_fps"] = ratio(fg.get("processed_fps"), min(offered, ce["processed_fps"]))
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    head = (f"{'cams':>4} {'imgsz':>5} {'system':<21} {'runtime':<11} {'fps':>7} {'fair':>5} {'p50':>7} {'p95':>7} "
            f"{'p99':>7} {'cpu ms/f':>8} {'rss MB':>7} {'rss +%':>6}")
    print(head)
    print("-" * len(head))
    for res in results:
        for system, row in res["systems"].items():
            if "error" in row:
                print(f"{res['cameras']:>4} {res['imgsz']:>5} {system:<21} ERROR {row['error'][:80]}")
                continue
            lat = row.get("latency_ms") or {}

            def f(v: Any, spec: str = ".1f") -> str:
                return "-" if v is None else format(v, spec)

            cpu = row.get("cpu_s_per_frame")
            growth = row.get("rss_growth_after_warmup")
            print(f"{res['cameras']:>4} {res['imgsz']:>5} {system:<21} {row.get('runtime', ''):<11} "
                  f"{f(row['processed_fps']):>7} {f(row.get('fairness'), '.2f'):>5} {f(lat.get('p50')):>7} "
                  f"{f(lat.get('p95')):>7} {f(lat.get('p99')):>7} {f(cpu * 1000 if cpu else None):>8} "
                  f"{f(row.get('peak_rss_mb'), '.0f'):>7} {f(growth * 100 if growth is not None else None):>6}")
        r = res["ratios"]
        print(f"{'':>11} framegrid/ultralytics fps x{r.get('framegrid_over_ultralytics_fps')}, "
              f"p95 x{r.get('framegrid_over_ultralytics_p95')}; framegrid/ceiling x{r.get('framegrid_over_ceiling_fps')}"
              f" (of attainable x{r.get('framegrid_over_attainable_fps')})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window per system")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--weights", type=Path, default=MODEL)
    ap.add_argument("--json", type=Path, default=Path("bench-streams.json"))
    ap.add_argument("--video", type=Path, help="camera video (default: a synthetic one, made once)")
    ap.add_argument("--cpu-slots", type=int, default=1, help="framegrid's CPU executor slots (devices.cpu_slots)")
    ap.add_argument("--malloc-mmap-threshold-kb", type=int, help="framegrid's pipeline.malloc_mmap_threshold_kb "
                    "(default: the config default; 0 = glibc's dynamic threshold)")
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--urls", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--mqtt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.imgsz = args.imgsz[0]
        worker(args)
        return 0

    from tools.servers import Mosquitto, RtspServer

    work = Path(tempfile.mkdtemp(prefix="framegrid-bench-"))
    video = args.video or work / "cam.mp4"
    length = args.warmup + args.seconds + 45  # every system connects afresh; the clip must outlast each run
    make_video(video, length)
    mosq: Mosquitto | None = None
    try:
        mosq = Mosquitto(work)
        mosq.start()
    except (OSError, FileNotFoundError):
        mosq = None
    results = []
    try:
        for cams in args.cameras:
            server = RtspServer({f"cam{i}": video for i in range(cams)})
            server.start()
            try:
                urls = [server.url(f"cam{i}") for i in range(cams)]
                for imgsz in args.imgsz:
                    rows: dict[str, Any] = {}
                    for system in args.systems:
                        print(f"-- {cams} cameras, imgsz {imgsz}: {system}", file=sys.stderr, flush=True)
                        rows[system] = run_system(system, urls, imgsz, args, video, mosq.url if mosq else None)
                    results.append({"cameras": cams, "imgsz": imgsz, "systems": rows,
                                    "ratios": ratios({**rows, "_cameras": cams})})
            finally:
                server.kill()
    finally:
        if mosq is not None:
            mosq.stop()
    report = {
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {"seconds": args.seconds, "warmup": args.warmup, "camera_fps": FPS, "camera_size": "640x360",
                     "weights": args.weights.name, "mqtt": "mosquitto" if mosq else "embedded"},
        "results": results,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print_table(results)
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
