"""Side-by-side multi-camera benchmark on camera-grade streams: framegrid vs ultralytics vs hand-written loops.

One run, one machine, one model, the same RTSP cameras for every system:

    .venv/bin/python -m tools.bench_streams --cameras 4 8 16 --imgsz 320 640 --seconds 60 --json bench.json

The cameras: by default a camera-like scene (objects crossing a textured background) rendered at
`--camera-size` (1280x720) and `--camera-fps` (25), H.264 with a `--gop-seconds` (2 s) GOP, or
any H.264 file given with `--video`; the test RTSP server (tools/rtsp_server.py) serves it to N
clients as an endless loop with counting timestamps. What was really served (probed over RTSP)
goes into the JSON. Each system runs in its own process (one inference runtime per process, CPU
time and memory measured per system):

  framegrid         the real pipeline (sources, batchers, slots, MQTT publishing to a local
                    Mosquitto, or the embedded broker when Mosquitto is absent), backend `auto`
  framegrid-torch   the same with backend torch, for reference
  ultralytics       `YOLO(weights).predict(source=<.streams file>, stream=True)`, torch, what most
                    users would run instead (frames timestamped where OpenCV hands them over)
  ultralytics-openvino  the same on ultralytics' own OpenVINO export
  ceiling-decode    PyAV threads decoding the same cameras (newest frame kept, as decoded) and the
                    bare best backend looping over the newest frames: no scheduler, no MQTT,
                    the best a hand-written loop can do
  ceiling           the bare best backend looping over pre-decoded frames at framegrid's batch size
                    (models.batch_size, or --batch-size): no I/O, no decode. The inference limit.
  decode-only       framegrid's own `streams.Source` per camera, with its decoder settings (threads:
                    cores / cameras; frame skipping from --max-fps) and nothing else: every decoded
                    frame counted and dropped. The decode limit.

framegrid / min(decode-only, ceiling) is how near framegrid comes to the machine's limit (`limit`
in the table; target >= 0.9). The two limits share the cores, so min() is an upper bound that a
run doing both cannot quite reach when both are near it.

Per system: processed frames/s in total, per-stream fairness (min/max processed fps),
capture-to-result latency p50/p95/p99/max and how many results were older than framegrid's
`max_frame_age`, CPU seconds per processed frame, peak RSS and its growth after warm-up, and the
share of the cores the camera server (on the same machine) used while the system ran (`server`). Beside
the speeds, the agreement of framegrid's answers with `YOLO.predict` on the same camera
(tools/agreement.py). Ratios against the targets of the README. Table on stdout, everything in
JSON. Latency: from the moment the decoder hands a frame over to the moment its result is
published (framegrid) or yielded (the others). Speeds are not asserted anywhere; the test suite
runs this on a short looped clip to check that every field is produced.
"""

from __future__ import annotations

import argparse
import contextlib
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

MODEL = ROOT / "models" / "shapes-yolo11n.pt"
SYSTEMS = ("framegrid", "framegrid-torch", "ultralytics", "ultralytics-openvino", "ceiling-decode", "ceiling",
           "decode-only")
DEFAULT_SYSTEMS = ("framegrid", "ultralytics-openvino", "decode-only", "ceiling")
MAX_FRAME_AGE = 1.0  # framegrid's default pipeline.max_frame_age, used as configured
WORKER_SLACK = 240  # seconds a worker may take beyond warm-up + measuring (start, export, shutdown)


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
        window = [(t, r) for t, r in self.rss if t >= warm]
        rss_warm = window[0][1] if window else None
        rss_high = max((r for _, r in window), default=None)
        return {
            "processed_fps": round(total / seconds, 2),
            "per_stream_fps": {s: round(f, 2) for s, f in zip(streams, per, strict=True)},
            "fairness": round(min(per) / max(per), 3) if per and max(per) > 0 else None,
            "latency_ms": None if lat is None else {
                **{q: round(float(np.percentile(lat, int(q[1:]))), 1) for q in ("p50", "p95", "p99")},
                "max": round(float(lat.max()), 1)},
            "older_than_max_frame_age": None if lat is None else int((lat > MAX_FRAME_AGE * 1000).sum()),
            "cpu_s_per_frame": round(cpu / total, 4) if total else None,
            "peak_rss_mb": round(max(r for _, r in self.rss) / 2**20, 1) if self.rss else None,
            # the highest sample after warm-up over the first one after it: mostly the swing of frames in flight
            "rss_growth_after_warmup": round((rss_high - rss_warm) / rss_warm, 4) if rss_warm and rss_high else None,
            **rss_growth(window),
            # (seconds since start, MB) every ~10 s, to see whether memory settles or keeps growing
            "rss_timeline_mb": [(round(t), round(r / 2**20, 1)) for t, r in self.rss[::20]],
        }


def rss_growth(samples: list[tuple[float, int]]) -> dict[str, float | None]:
    """Growth of memory over a window, two ways that the swing of frames in flight does not dominate:
    the peak of its last fifth over the peak of its first fifth (at most two minutes each: does the
    high-water mark rise?) and the least-squares slope, in % of the mean per ten minutes (a trend)."""
    import numpy as np

    if len(samples) < 10:
        return {"rss_peak_growth": None, "rss_trend_per_10min": None}
    t, r = np.array(samples, dtype=float).T
    span = min(120.0, (t[-1] - t[0]) / 5)
    first, last = r[t <= t[0] + span].max(), r[t >= t[-1] - span].max()
    slope = np.polyfit(t, r, 1)[0]
    return {"rss_peak_growth": round(float(last / first - 1), 4),
            "rss_trend_per_10min": round(float(slope * 600 / r.mean()), 4)}


# -- workers ------------------------------------------------------------------------------------------
def run_framegrid(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    import asyncio

    from pipeline import Pipeline, parse_config

    streams = {f"cam{i}": url for i, url in enumerate(args.urls)}
    mqtt_url = args.mqtt or "embedded"
    events = args.events or args.record
    tmp = tempfile.TemporaryDirectory(prefix="framegrid-bench-events-")
    cfg = parse_config({
        "mqtt": {"url": mqtt_url, "topic_prefix": "bench", "stats_interval": 10,
                 **({"embedded_port": 0} if mqtt_url == "embedded" else {})},
        "models": {"m": {"type": "yolo", "weights": str(args.weights), "imgsz": args.imgsz, "backend": backend,
                         **({"batch_size": args.batch_size} if args.batch_size else {}),
                         **({"cpu_batch_ms": args.cpu_batch_ms} if args.cpu_batch_ms else {}),
                         **({"cpu_precision": "int8", "calibration": str(args.calibration)} if args.calibration
                            else {}),
                         # the same work as the other systems (detection only): tracking is measured
                         # by tools/bench_tracking.py (--events / --record turn it on, for their cost)
                         **({} if events else {"tracker": {"type": "none"}})}},
        "streams": {n: {"url": u, "model": "m", "stall_timeout": 20, "record": {"enabled": args.record},
                        **({"max_fps": args.max_fps} if args.max_fps else {}),
                        # --substream: the systems detect on the substreams; framegrid reads the main
                        # stream beside each (packets only: recording, its size), as a user with roles
                        **({"url": args.main_urls[i], "detect_url": u} if args.main_urls else {})}
                    for i, (n, u) in enumerate(streams.items())},
        # events, snapshots and clips go to a temporary folder, never the user's
        "events": {"enabled": events, "store": str(Path(tmp.name) / "events.db")},
        "pipeline": {"status_interval": 0, "max_frame_age": MAX_FRAME_AGE,
                     **({} if args.malloc_mmap_threshold_kb is None
                        else {"malloc_mmap_threshold_kb": args.malloc_mmap_threshold_kb}),
                     **({} if args.malloc_arenas is None else {"malloc_arenas": args.malloc_arenas})},
        "devices": {} if args.cpu_slots is None else {"cpu_slots": args.cpu_slots},
    }, ROOT)
    rec = Recorder(args.warmup, args.seconds)

    class Latency:
        """A result sink: capture-to-publish latency of every result (published to MQTT as well), on the
        monotonic clock, as every system's here and framegrid's own figures (a step of the wall clock in
        between would count in a wall-clock latency)."""

        def emit(self, result: Any) -> None:
            rec.record(result.stream.name, result.latency_ms / 1000)

    def dump_tasks() -> None:  # a shutdown that does not finish says what it waits for
        for task in asyncio.all_tasks():
            print(f"still running: {task!r}", file=sys.stderr)
            task.print_stack(file=sys.stderr)

    async def main() -> dict[str, Any]:
        asyncio.get_running_loop().call_later(args.seconds + args.warmup + 90, dump_tasks)
        async with Pipeline(cfg, sinks=[Latency()]) as pipeline:
            while not rec.done and not pipeline.done:  # a pipeline that died raises on leaving the block
                await asyncio.sleep(0.2)
            out = rec.summary(list(streams), args.seconds)
            out["runtime"] = next(iter(pipeline.models.runtimes()), "torch")
            stats = pipeline.stats_payload()["streams"]
            out["stages_ms_p50"] = stats["cam0"]["stage_ms_p50"]
            # frames each camera delivered (since start): unequal decoding shows up here, not in fairness
            out["decoded_per_stream"] = {n: s["decoded"] for n, s in stats.items()}
            recording = pipeline.stats_payload()["recording"]
            if recording is not None:
                figures = recording["streams"].values()
                out["recording"] = {"clips_written": sum(f["clips_written"] for f in figures),
                                    "clips_failed": sum(f["clips_failed"] for f in figures),
                                    "bytes_written": sum(f["bytes_written"] for f in figures)}
        return out

    try:
        return asyncio.run(main())
    finally:
        tmp.cleanup()


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
                captured[id(im)] = time.monotonic()
            return ok, im

        def retrieve(self) -> tuple[bool, Any]:
            ok, im = self._cap.retrieve()
            if ok and im is not None:
                captured[id(im)] = time.monotonic()
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
        rec.record(_stream_of(r.path, args.urls, names), None if t is None else time.monotonic() - t)
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


def best_detector(args: argparse.Namespace, batch: int) -> Any:
    """The best CPU backend with framegrid's defaults, loaded and warmed up, for the ceilings."""
    from detectors.runtimes import build_detector, resolve_backend

    runtime = resolve_backend("auto", "cpu")
    int8 = {"precision": "int8", "calibration": args.calibration} if args.calibration else {}
    det = build_detector(runtime, "m", args.weights, imgsz=args.imgsz, confidence=0.25, iou=0.7, device="cpu",
                         threads=os.cpu_count(), max_batch=batch, **int8)
    det.load()
    det.warmup()
    return det


def run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """The best backend alone on pre-decoded frames (already BGR): no I/O, no decode, no conversion."""
    import av

    frames = []
    with av.open(str(args.video)) as c:
        for vf in c.decode(video=0):
            frames.append(vf.to_ndarray(format="bgr24"))
            if len(frames) >= 64:
                break
    batch = min(len(args.urls), framegrid_batch(args))
    det = best_detector(args, batch)
    rec = Recorder(args.warmup, args.seconds)
    i = 0
    while not rec.done:
        imgs = [frames[(i + k) % len(frames)] for k in range(batch)]
        t0 = time.monotonic()
        det.infer(imgs)
        for k in range(batch):
            rec.record(f"cam{(i + k) % len(args.urls)}", time.monotonic() - t0)
        i += batch
    out = rec.summary([f"cam{k}" for k in range(len(args.urls))], args.seconds)
    out["runtime"] = det.runtime
    return out


def framegrid_batch(args: argparse.Namespace) -> int:
    """The batch size framegrid's slots use in this run (models.batch_size)."""
    from pipeline.config import ModelConfig, default

    return int(args.batch_size or default(ModelConfig, "batch_size"))


def run_decode_only(args: argparse.Namespace) -> dict[str, Any]:
    """framegrid's sources alone: each camera decoded by a `streams.Source` as the pipeline makes it
    (the stream's settings' defaults, decoder threads as the pipeline gives them, frame skipping from
    max_fps), every frame counted and dropped: the decode limit of this machine for these cameras."""
    from pipeline.config import StreamConfig
    from pipeline.core.devices import decode_threads
    from streams import Source

    names = [f"cam{i}" for i in range(len(args.urls))]
    threads = decode_threads(os.cpu_count() or 1, len(names))
    rec = Recorder(args.warmup, args.seconds)
    sources = []
    for name, url in zip(names, args.urls, strict=True):
        cfg = StreamConfig(url=url, model="m", stall_timeout=20, max_fps=args.max_fps)
        src = Source(name, url, lambda frame: rec.record(frame.stream, None), None, cfg,
                     decode_threads=threads, wanted_fps=args.max_fps)
        src.start()
        sources.append(src)
    while not rec.done:
        time.sleep(0.2)
    out = rec.summary(names, args.seconds)
    for src in sources:
        src.stop(5)
    out["runtime"] = "pyav"
    out["decode_threads"] = threads
    out["skipping"] = sources[0].skipping
    return out


def run_ceiling_decode(args: argparse.Namespace) -> dict[str, Any]:
    """PyAV threads decode every camera into a newest-frame holder; one loop runs the bare backend
    over whatever is newest (round robin, up to a batch): the best a hand-written loop can do."""
    import av

    from streams.frame import VideoPicture

    names = [f"cam{i}" for i in range(len(args.urls))]
    newest: dict[str, tuple[Any, float]] = {}
    lock = threading.Condition()
    stop = threading.Event()
    threads = max(1, (os.cpu_count() or 1) // len(names))

    def decode(name: str, url: str) -> None:
        while not stop.is_set():
            try:
                # reads timed out by FFmpeg's socket option, as framegrid's (PyAV's read timeout takes the GIL)
                with av.open(url, options={"rtsp_transport": "tcp", "fflags": "nobuffer", "flags": "low_delay",
                                           "timeout": "10000000"}, timeout=(10, None)) as c:
                    stream = c.streams.video[0]
                    stream.codec_context.thread_count = threads
                    for vf in c.decode(stream):
                        with lock:
                            newest[name] = (vf, time.monotonic())
                            lock.notify()
                        if stop.is_set():
                            return
            except av.error.FFmpegError:
                time.sleep(0.2)

    workers = [threading.Thread(target=decode, args=(n, u), daemon=True) for n, u in zip(names, args.urls, strict=True)]
    batch = min(len(names), 8)
    det = best_detector(args, batch)
    for w in workers:
        w.start()
    rec = Recorder(args.warmup, args.seconds)
    turn = 0
    while not rec.done:
        with lock:
            while not newest:
                lock.wait(0.5)
            order = names[turn:] + names[:turn]
            taken = [(n, newest.pop(n)) for n in order if n in newest][:batch]
        turn = (turn + len(taken)) % len(names)
        det.infer([VideoPicture(vf) for _, (vf, _) in taken])
        now = time.monotonic()
        for name, (_, at) in taken:
            rec.record(name, now - at)
    stop.set()
    out = rec.summary(names, args.seconds)
    out["runtime"] = det.runtime
    return out


def run_agreement(args: argparse.Namespace) -> dict[str, Any]:
    """framegrid's answers on the benchmark's own camera against `YOLO.predict` (tools/agreement.py)."""
    from tools.agreement import reference, run_framegrid, score

    got = run_framegrid({"cam": Path(args.video)}, args.weights, args.imgsz, "auto", batch_size=4)["cam"]
    ref = reference(Path(args.video), sorted(got), args.weights, args.imgsz)
    ours = {i: boxes for i, (_, boxes) in got.items()}
    return {"frames": len(ref), **{f"at_{t}": score(ours, ref, t) for t in (0.9, 0.7)}}


def worker(args: argparse.Namespace) -> None:
    import faulthandler
    import logging

    # a worker that hangs prints every thread's stack and exits, so the row says where it hung
    faulthandler.dump_traceback_later(args.seconds + args.warmup + WORKER_SLACK - 30, exit=True)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs = {
        "framegrid": lambda: run_framegrid(args, "auto"),
        "framegrid-torch": lambda: run_framegrid(args, "torch"),
        "ultralytics": lambda: run_ultralytics(args, "pt"),
        "ultralytics-openvino": lambda: run_ultralytics(args, "openvino"),
        "ceiling-decode": lambda: run_ceiling_decode(args),
        "ceiling": lambda: run_ceiling(args),
        "decode-only": lambda: run_decode_only(args),
        "agreement": lambda: run_agreement(args),
    }
    if args.worker not in runs:
        raise SystemExit(f"unknown system {args.worker}")
    Path(args.out).write_text(json.dumps(runs[args.worker]()))


# -- the driver -----------------------------------------------------------------------------------------
def calibration_frames(video: Path, folder: Path, count: int = 120) -> Path:
    """`count` frames spread over the camera's clip, as JPEGs: what --int8 calibrates on (as a user
    saves frames from the cameras)."""
    import av
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    with av.open(str(video)) as c:
        frames = [vf.to_ndarray(format="bgr24") for vf in c.decode(video=0)]
    for k in range(count):
        cv2.imwrite(str(folder / f"{k:04d}.jpg"), frames[k * len(frames) // count])
    return folder


def make_camera(folder: Path, size: tuple[int, int], fps: float, gop_seconds: float, seconds: float = 10.0) -> Path:
    """The camera-like clip (mp4: the ceilings and the agreement read it) rendered once."""
    from streams.synthetic import camera_scene, write_video

    w, h = size
    path = folder / f"camera-{w}x{h}-{fps:g}fps-gop{gop_seconds:g}s.mp4"
    if not path.exists():
        write_video(path, camera_scene(w, h, fps), seconds=seconds, gop_seconds=gop_seconds)
    return path


def annexb(video: Path, folder: Path) -> Path:
    """The clip's H.264 as a raw Annex-B stream, which the RTSP server loops for ever."""
    import av

    out = folder / (video.stem + ".h264")
    with av.open(str(video)) as src:
        vstream = src.streams.video[0]
        if vstream.codec_context.name != "h264":
            raise SystemExit(f"--video {video}: the RTSP test server serves H.264; "
                             f"this is {vstream.codec_context.name}")
        with av.open(str(out), "w", format="h264") as dst:
            ostream = dst.add_stream_from_template(vstream)
            for packet in src.demux(vstream):
                if packet.dts is None:
                    continue
                packet.stream = ostream
                dst.mux(packet)
    return out


def served_camera(url: str, video: Path) -> dict[str, Any]:
    """What the cameras really are, probed over RTSP (and the clip's GOP, counted in the file)."""
    import av

    from streams.source import probe

    p = probe(url)
    keys, frames = [], 0
    with av.open(str(video)) as c:
        for packet in c.demux(video=0):
            if packet.dts is None:
                continue
            if packet.is_keyframe:
                keys.append(frames)
            frames += 1
    gop = (keys[1] - keys[0]) if len(keys) > 1 else frames
    return {
        "size": f"{p.width}x{p.height}",
        "fps": p.fps,
        "codec": p.codec,
        "pix_fmt": p.pix_fmt,
        "gop_frames": gop,
        "clip_frames": frames,
        "clip": video.name,
        "looped": True,
    }


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_system(
    system: str, urls: list[str], imgsz: int, args: argparse.Namespace, video: Path, mqtt: str | None,
    main_urls: list[str] | None = None, server_pid: int | None = None,
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    cmd = [
        sys.executable,
        "-m",
        "tools.bench_streams",  # (run from ROOT: the workers import tools.* like this process)
        "--worker",
        system,
        "--out",
        str(out),
        "--imgsz",
        str(imgsz),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        "--weights",
        str(args.weights),
        "--video",
        str(video),
        *(["--cpu-slots", str(args.cpu_slots)] if args.cpu_slots is not None else []),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
        *(["--cpu-batch-ms", str(args.cpu_batch_ms)] if args.cpu_batch_ms else []),
        *(["--calibration", str(args.calibration)] if args.calibration else []),
        *(
            ["--malloc-mmap-threshold-kb", str(args.malloc_mmap_threshold_kb)]
            if args.malloc_mmap_threshold_kb is not None
            else []
        ),
        *(["--malloc-arenas", str(args.malloc_arenas)] if args.malloc_arenas is not None else []),
        *(["--events"] if args.events else []),
        *(["--record"] if args.record else []),
        *(["--max-fps", str(args.max_fps)] if args.max_fps else []),
        *(["--main-urls", *main_urls] if main_urls and system in ("framegrid", "framegrid-torch") else []),
        "--urls",
        *urls,
    ]
    if mqtt:
        cmd += ["--mqtt", mqtt]
    server_cpu = cpu_seconds(server_pid) if server_pid else None
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.seconds + args.warmup + WORKER_SLACK, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out; stderr: {(exc.stderr or b'')[-3000:]!r}"}
    if proc.returncode != 0 or not out.stat().st_size:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-40:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(out.read_text())
    out.unlink()
    if server_pid and server_cpu is not None:
        # the camera server shares the machine: its share of the cores while this system ran
        result["camera_server_cores"] = round((cpu_seconds(server_pid) - server_cpu) / (time.monotonic() - started), 3)
    # what the system warned about while it ran (reconnects, stalls): helps read a bad row
    result["warnings"] = [line for line in (proc.stderr or "").splitlines() if "WARNING" in line or "ERROR" in line][
        -20:
    ]
    return result


def ratios(rows: dict[str, dict[str, Any]], offered: float) -> dict[str, Any]:
    """framegrid against the others, and the README's targets met or not (None: a row is missing)."""
    fg = rows.get("framegrid", {})

    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if a and b else None

    def p95(row: dict[str, Any]) -> float | None:
        return (row.get("latency_ms") or {}).get("p95")

    out: dict[str, Any] = {"offered_fps": offered}
    for other, key in (
        ("ultralytics-openvino", "ultralytics_openvino"),
        ("ultralytics", "ultralytics"),
        ("ceiling-decode", "ceiling_decode"),
        ("ceiling", "ceiling"),
        ("decode-only", "decode_only"),
    ):
        row = rows.get(other, {})
        out[f"framegrid_over_{key}_fps"] = ratio(fg.get("processed_fps"), row.get("processed_fps"))
        if other.startswith("ultralytics"):
            out[f"framegrid_over_{key}_p95"] = ratio(p95(fg), p95(row))
            out[f"framegrid_over_{key}_cpu_per_frame"] = ratio(fg.get("cpu_s_per_frame"), row.get("cpu_s_per_frame"))
    ov = rows.get("ultralytics-openvino", {})
    if ov.get("processed_fps") and fg.get("processed_fps"):
        saturated = ov["processed_fps"] >= 0.95 * offered  # it already takes (almost) every frame
        fps_r, p95_r = out["framegrid_over_ultralytics_openvino_fps"], out["framegrid_over_ultralytics_openvino_p95"]
        cpu_r = out["framegrid_over_ultralytics_openvino_cpu_per_frame"]
        out["targets"] = {
            "vs_ultralytics_openvino": (cpu_r is not None and cpu_r <= 0.7)
            if saturated
            else (fps_r >= 1.3 and cpu_r is not None and cpu_r <= 0.8),
            "p95_half_of_ultralytics_openvino": p95_r is not None and p95_r <= 0.5,
            "ultralytics_openvino_saturated": saturated,
        }
    limits = [rows.get(k, {}).get("processed_fps") for k in ("decode-only", "ceiling")]
    if all(limits):
        # the machine's limit for this row: what decoding alone, or inference alone, reaches
        limit = min(min(limits), offered)  # (no system can process more than the cameras offer)
        out["limit_fps"] = limit
        out["framegrid_over_limit"] = ratio(fg.get("processed_fps"), limit)
        if out["framegrid_over_limit"] is not None:
            out.setdefault("targets", {})["vs_limit"] = out["framegrid_over_limit"] >= 0.9
        # the two limits share the cores: decoding every camera takes D cores (decode-only's CPU) and the
        # camera server S (it serves the cameras from this machine; the ceiling reads no camera), the
        # detector gets the rest, so together they reach ceiling x (cores - D - S) / cores at most
        dec = rows["decode-only"]
        cores = os.cpu_count() or 1
        if dec.get("cpu_s_per_frame"):
            busy = dec["cpu_s_per_frame"] * dec["processed_fps"] + (dec.get("camera_server_cores") or 0.0)
            out["shared_limit_fps"] = round(min(offered, limits[1] * max(0.0, cores - busy) / cores), 1)
            out["framegrid_over_shared_limit"] = ratio(fg.get("processed_fps"), out["shared_limit_fps"])
    if out.get("framegrid_over_ceiling_decode_fps") is not None:
        out.setdefault("targets", {})["vs_ceiling_decode"] = out["framegrid_over_ceiling_decode_fps"] >= 0.9
    if fg.get("fairness") is not None:
        t = out.setdefault("targets", {})
        t["fairness"] = fg["fairness"] >= 0.8
        t["none_older_than_max_frame_age"] = fg.get("older_than_max_frame_age") == 0
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    head = (
        f"{'cams':>4} {'imgsz':>5} {'system':<21} {'runtime':<11} {'fps':>7} {'fair':>5} {'p50':>7} {'p95':>7} "
        f"{'max':>7} {'cpu ms/f':>8} {'rss MB':>7} {'rss +%':>6} {'peak +%':>7} {'/10min':>6} {'server':>6}"
    )
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

            def pct(v: Any) -> float | None:
                return None if v is None else v * 100

            cpu = row.get("cpu_s_per_frame")
            growth = row.get("rss_growth_after_warmup")
            print(
                f"{res['cameras']:>4} {res['imgsz']:>5} {system:<21} {row.get('runtime', ''):<11} "
                f"{f(row['processed_fps']):>7} {f(row.get('fairness'), '.2f'):>5} {f(lat.get('p50')):>7} "
                f"{f(lat.get('p95')):>7} {f(lat.get('max')):>7} {f(cpu * 1000 if cpu else None):>8} "
                f"{f(row.get('peak_rss_mb'), '.0f'):>7} {f(pct(growth)):>6} "
                f"{f(pct(row.get('rss_peak_growth'))):>7} {f(pct(row.get('rss_trend_per_10min'))):>6} "
                f"{f(row.get('camera_server_cores'), '.2f'):>6}"
            )
        r = res["ratios"]
        print(
            f"{'':>11} offered {r['offered_fps']:g} fps; framegrid/ultralytics-openvino fps "
            f"x{r.get('framegrid_over_ultralytics_openvino_fps')}, "
            f"p95 x{r.get('framegrid_over_ultralytics_openvino_p95')}, "
            f"cpu/frame x{r.get('framegrid_over_ultralytics_openvino_cpu_per_frame')}; "
            f"framegrid/ceiling-decode x{r.get('framegrid_over_ceiling_decode_fps')}; "
            f"framegrid/limit x{r.get('framegrid_over_limit')} (limit {r.get('limit_fps')} fps: "
            f"min(decode-only, ceiling, offered)); x{r.get('framegrid_over_shared_limit')} of the shared limit "
            f"({r.get('shared_limit_fps')} fps: the ceiling on the cores decoding and the camera server leave)"
        )
        if r.get("targets"):
            print(
                f"{'':>11} targets: "
                + ", ".join(
                    f"{k} {'met' if v else 'MISSED'}"
                    for k, v in r["targets"].items()
                    if k != "ultralytics_openvino_saturated"
                )
            )
        agr = res.get("agreement")
        if agr and "error" not in agr:
            print(
                f"{'':>11} agreement with YOLO.predict ({agr['frames']} frames): F1 {agr['at_0.9']['f1']} at IoU 0.9, "
                f"{agr['at_0.7']['f1']} at IoU 0.7"
            )


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WxH, e.g. 1280x720") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192) or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be even, 16..8192")
    return w, h


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window per system")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds before measuring")
    ap.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--weights", type=Path, default=MODEL)
    ap.add_argument("--json", type=Path, default=Path("bench-streams.json"))
    ap.add_argument(
        "--video",
        type=Path,
        help="an H.264 file to serve as every camera, looped (default: the "
        "camera-like scene rendered at --camera-size/--camera-fps)",
    )
    ap.add_argument("--camera-size", type=parse_size, default=(1280, 720), help="WxH of the rendered camera")
    ap.add_argument("--camera-fps", type=float, default=25.0, help="frame rate of the rendered camera")
    ap.add_argument("--gop-seconds", type=float, default=2.0, help="keyframe interval of the rendered camera")
    ap.add_argument("--no-agreement", action="store_true", help="skip the agreement measurement")
    ap.add_argument(
        "--cpu-slots",
        type=int,
        help="framegrid's CPU executor slots (devices.cpu_slots; default: the config's default)",
    )
    ap.add_argument("--batch-size", type=int, help="framegrid's models.batch_size (default: the config's)")
    ap.add_argument("--cpu-batch-ms", type=float, help="framegrid's models.cpu_batch_ms (default: the config's)")
    ap.add_argument(
        "--malloc-mmap-threshold-kb",
        type=int,
        help="framegrid's pipeline.malloc_mmap_threshold_kb "
        "(default: the config default; 0 = glibc's dynamic threshold)",
    )
    ap.add_argument(
        "--malloc-arenas",
        type=int,
        help="framegrid's pipeline.malloc_arenas (default: the config default; 0 = glibc's)",
    )
    ap.add_argument("--substream", type=parse_size, help="WxH: each camera also serves this substream (the same "
                    "scene); every system detects on the substreams and framegrid reads the main stream beside "
                    "(detect_url + url)")
    ap.add_argument("--max-fps", type=float, help="each camera's detect rate (streams.max_fps) for framegrid and "
                    "decode-only (its frame skipping); ultralytics cannot limit it per stream and takes what it can")
    ap.add_argument("--int8", action="store_true", help="framegrid (models.cpu_precision = \"int8\") and the "
                    "ceilings run the model quantized, calibrated on 120 frames of the camera; the ultralytics "
                    "systems stay float (their default export)")
    ap.add_argument("--events", action="store_true", help="framegrid tracks and stores events (their cost); "
                    "the store, snapshots and clips go to a temporary folder")
    ap.add_argument("--record", action="store_true", help="--events, plus an event clip of every stream "
                    "(record.enabled): compare with --events alone for the cost of recording")
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--urls", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--main-urls", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--mqtt", help=argparse.SUPPRESS)
    ap.add_argument("--calibration", type=Path, help=argparse.SUPPRESS)  # --int8's frames
    args = ap.parse_args()
    if args.worker:
        args.imgsz = args.imgsz[0]
        worker(args)
        return 0

    from tools.servers import Mosquitto, RtspServer

    work = Path(tempfile.mkdtemp(prefix="framegrid-bench-"))
    if args.video is not None and not args.video.is_file():
        raise SystemExit(f"--video {args.video}: no such file")
    video = args.video or make_camera(work, args.camera_size, args.camera_fps, args.gop_seconds)
    looped = annexb(video, work)
    sub_video = None
    if args.substream is not None:
        if args.video is not None:
            raise SystemExit("--substream renders the scene at both sizes: not with --video")
        sub_video = make_camera(work, args.substream, args.camera_fps, args.gop_seconds)
        sub_looped = annexb(sub_video, work)
    if args.int8:  # quantized once up front, not inside a system's warm-up (the cache serves them all)
        from detectors.export import ensure_export

        args.calibration = calibration_frames(sub_video or video, work / "calibration")
        for imgsz in args.imgsz:
            ensure_export(args.weights, imgsz, "openvino", "int8", calibration=args.calibration)
    mosq: Mosquitto | None = None
    try:
        mosq = Mosquitto(work)
        mosq.start()
    except (OSError, FileNotFoundError):
        mosq = None
    results = []
    camera: dict[str, Any] = {}
    agreement: dict[int, dict[str, Any]] = {}
    try:
        for cams in args.cameras:
            served = {f"cam{i}": looped for i in range(cams)}
            if sub_video is not None:
                served |= {f"sub{i}": sub_looped for i in range(cams)}
            server = RtspServer(served)
            server.start()
            try:
                urls = [server.url(f"cam{i}") for i in range(cams)]
                main_urls: list[str] = []
                if sub_video is not None:  # detection on the substreams; the main streams beside for framegrid
                    main_urls, urls = urls, [server.url(f"sub{i}") for i in range(cams)]
                camera = camera or served_camera((main_urls or urls)[0], video)
                for imgsz in args.imgsz:
                    if not args.no_agreement and imgsz not in agreement:
                        print(f"-- agreement at imgsz {imgsz}", file=sys.stderr, flush=True)
                        agreement[imgsz] = run_system("agreement", [], imgsz, args, video, None)
                    rows: dict[str, Any] = {}
                    for system in args.systems:
                        print(f"-- {cams} cameras, imgsz {imgsz}: {system}", file=sys.stderr, flush=True)
                        rows[system] = run_system(system, urls, imgsz, args, sub_video or video,
                                                  mosq.url if mosq else None, main_urls,
                                                  server.proc.pid if server.proc else None)
                    rate = camera.get("fps") or args.camera_fps
                    offered = min(rate, args.max_fps or rate) * cams
                    results.append(
                        {
                            "cameras": cams,
                            "imgsz": imgsz,
                            "systems": rows,
                            "ratios": ratios(rows, offered),
                            "agreement": agreement.get(imgsz),
                        }
                    )
            finally:
                server.kill()
    finally:
        if mosq is not None:
            mosq.stop()
    report = {
        "machine": {**cpu_facts(), "python": sys.version.split()[0]},
        "settings": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "camera": camera,
            "weights": args.weights.name,
            "mqtt": "mosquitto" if mosq else "embedded",
            "max_frame_age": MAX_FRAME_AGE,
            "substream": f"{args.substream[0]}x{args.substream[1]}" if args.substream else None,
            "max_fps": args.max_fps,
            "int8": args.int8,
        },
        "results": results,
    }
    args.json.write_text(json.dumps(report, indent=2))
    m = report["machine"]
    print(f"machine: {m['model']}, {m['cores']} cores, {' '.join(m['isa']) or 'no AVX2'}")
    print(
        f"cameras: {camera.get('size')} at {camera.get('fps')} fps, {camera.get('codec')}, GOP "
        f"{camera.get('gop_frames')} frames, looped clip of {camera.get('clip_frames')} frames"
    )
    print_table(results)
    print(f"JSON: {args.json}")
    return 0


# What decides the CPU's speed per precision: INT8 convolutions need VNNI (or AMX) to pay, and with
# AMX's bf16 the float model gains as much (figures from two hosts differ by these: print them)
ISA_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_facts() -> dict[str, Any]:
    """The CPU's model name, cores and the instruction sets of ISA_FLAGS it has (Linux; else unknown)."""
    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"model": model, "cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags]}


if __name__ == "__main__":
    raise SystemExit(main())
