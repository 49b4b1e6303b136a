"""What the decoder options cost: CPU per second of camera video for each setting, side by side.

    .venv/bin/python -m tools.bench_decode [--camera-size 1280x720] [--camera-fps 25] [--seconds 8]

Renders two camera clips (H.264, 2 s GOP): one with only I and P frames (most cameras) and one
with two B-frames between references (cameras in "smart"/high-compression modes). Each setting
decodes the whole clip through `streams.Source` (not paced), as framegrid would, and reports the
frames handed over and the CPU seconds spent per second of video (the median of `--repeats`
runs, after a warm-up run): how much of a core one such camera costs. `hwaccel` is tried with every
device type FFmpeg was built with; where the device
is missing, the source falls back to software decoding and the row says so.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def decode_cost(path: Path, seconds: float, **settings: Any) -> dict[str, Any]:
    """Decode the clip once through a Source; CPU seconds per second of video, frames handed over."""
    from streams import Source, SourceSettings

    frames = []
    wanted = settings.pop("wanted_fps", None)
    threads = settings.pop("threads", 1)
    src = Source(
        "bench",
        str(path),
        frames.append,
        options=SourceSettings(realtime=False, loop=False, **settings),
        decode_threads=threads,
        wanted_fps=wanted,
    )
    c0, t0 = time.process_time(), time.perf_counter()
    src.start()
    while src.state.state not in ("ended", "failed") and time.perf_counter() - t0 < 120:
        time.sleep(0.01)
    src.stop(5)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {
        "frames": len(frames),
        "fps_delivered": round(len(frames) / seconds, 1),
        "cpu_per_video_second": round(cpu / seconds, 3),
        "wall_s": round(wall, 2),
        "skipping": src.skipping,
        "hw_decoding": src.hw_decoding,
        "state": str(src.state.state),
        "error": src.state.error,
    }


def main() -> int:
    from tools.bench_streams import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--camera-size", type=parse_size, default=(1280, 720))
    ap.add_argument("--camera-fps", type=float, default=25.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting (the median is reported)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from av.codec.hwaccel import hwdevices_available

    from streams.synthetic import camera_scene, write_video

    work = Path(tempfile.mkdtemp(prefix="framegrid-decode-"))
    w, h = args.camera_size
    scene = camera_scene(w, h, args.camera_fps)
    clips = {"IP": work / "ip.mp4", "IBBP": work / "ibbp.mp4"}
    write_video(clips["IP"], scene, args.seconds, gop_seconds=2.0)
    write_video(clips["IBBP"], scene, args.seconds, gop_seconds=2.0, b_frames=2)
    rows = []
    settings: list[tuple[str, dict[str, Any]]] = [
        ("1 thread", {"threads": 1, "skip_frames": "none"}),
        ("2 threads", {"threads": 2, "skip_frames": "none"}),
        ("skip_frames=nonref", {"threads": 1, "skip_frames": "nonref"}),
        ("skip_frames=nonkey", {"threads": 1, "skip_frames": "nonkey"}),
        (f"skip_frames=auto, max_fps={args.camera_fps / 5:g}", {"threads": 1, "wanted_fps": args.camera_fps / 5}),
    ]
    settings += [
        (f"hwaccel={d}", {"threads": 1, "skip_frames": "none", "hwaccel": d})
        for d in hwdevices_available()
        if d in ("cuda", "vaapi", "qsv", "drm", "vulkan")
    ]
    decode_cost(clips["IP"], args.seconds, threads=1)  # warm-up: libraries, caches
    for clip, path in clips.items():
        for name, s in settings:
            runs = [decode_cost(path, args.seconds, **dict(s)) for _ in range(args.repeats)]
            row = {
                "clip": clip,
                "setting": name,
                **sorted(runs, key=lambda r: r["cpu_per_video_second"])[len(runs) // 2],
                "cpu_per_video_second_runs": [r["cpu_per_video_second"] for r in runs],
            }
            rows.append(row)
            print(
                f"{clip:<5} {name:<32} {row['fps_delivered']:>6} fps delivered  "
                f"{row['cpu_per_video_second']:>6.3f} CPU s per video s  skipping {row['skipping']:<6} "
                f"hw {row['hw_decoding']}{'  ' + row['error'] if row['error'] else ''}",
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps({"camera": f"{w}x{h}@{args.camera_fps:g}", "seconds": args.seconds, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
