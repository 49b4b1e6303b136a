#!/usr/bin/env python3
"""framegrid end to end while its wall clock steps an hour forward and two back (libfaketime).

    apt-get install faketime
    .venv/bin/python -m tools.clock_steps [--seconds 20]

One RTSP camera (the rendered scene looped), a real Mosquitto, and `framegrid run` under
libfaketime with its offset read from a file at every call (`FAKETIME_TIMESTAMP_FILE`,
`FAKETIME_NO_CACHE`) and the monotonic clock left alone (`FAKETIME_DONT_FAKE_MONOTONIC`): as an
NTP step or a manual change does. Three phases of `--seconds`: the real time, +1 h, -1 h (a step back
of two hours). From a subscriber: the longest gap between results (target <= 2 s), every
`latency_ms` (target: within 0..1000 ms, i.e. not an hour), the stamps' offset in each phase (they
follow the wall clock), and the events that ended within 2 s after each step against the phases'
own rate (a step must not end every object).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tools.servers import Mosquitto, RtspServer, stop_child

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shapes-yolo11n.pt"
LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def main() -> int:
    import paho.mqtt.client as paho

    from tools.bench_streams import annexb, make_camera

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    if not LIB.exists():
        print(f"clock_steps: {LIB} is missing (apt-get install faketime)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fg-clock-"))
    video = annexb(make_camera(work, (1280, 720), 25.0, 2.0, seconds=20.0), work)
    broker = Mosquitto(work)
    broker.start()
    server = RtspServer({"cam": video})
    server.start()
    prefix = f"clock-{uuid.uuid4().hex[:6]}"
    config = work / "clock.toml"
    config.write_text("\n".join([
        "[mqtt]", f'url = "{broker.url}"', f'topic_prefix = "{prefix}"', "[api]", "enabled = false",
        "[pipeline]", "status_interval = 0", "max_frame_age = 1.0",
        "[models.shapes]", 'type = "yolo"', f'weights = "{MODEL}"', "imgsz = 320",
        "[streams.cam]", f'url = "{server.url("cam")}"', 'model = "shapes"', "max_fps = 5"]) + "\n")
    offset = work / "faketime"
    offset.write_text("+0\n")
    lock = threading.Lock()
    got: list[tuple[float, dict[str, Any]]] = []
    events: list[tuple[float, dict[str, Any]]] = []

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        data = json.loads(msg.payload)
        with lock:
            (got if msg.topic.endswith("/detections") else events).append((time.time(), data))

    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"clock-{uuid.uuid4().hex[:6]}")
    sub.on_message = on_message
    sub.on_connect = lambda c, _u, _f, _rc, _p=None: (c.subscribe(f"{prefix}/streams/+/detections"),
                                                       c.subscribe(f"{prefix}/events"))
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    env = {**os.environ, "LD_PRELOAD": str(LIB), "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_NO_CACHE": "1",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONUNBUFFERED": "1"}
    log = (work / "framegrid.log").open("w")
    fg = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
    steps: list[float] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not got:
            time.sleep(0.5)
        if not got:
            raise RuntimeError("no result within 120 s:\n" + (work / "framegrid.log").read_text()[-3000:])
        t0 = time.time()
        time.sleep(a.seconds)
        for shift in ("+3600", "-3600"):
            offset.write_text(shift + "\n")
            steps.append(time.time())
            time.sleep(a.seconds)
        t1 = time.time()
    finally:
        stop_child(fg)
        log.close()
        sub.loop_stop()
        server.kill()
        broker.stop()
    with lock:
        window = [(at, d) for at, d in got if t0 <= at <= t1]
        ends = [at for at, e in events if e["type"] == "end" and t0 <= at <= t1]
    arrivals = [t0] + [at for at, _ in window] + [t1]
    gap = max(b - x for x, b in itertools.pairwise(arrivals))
    latencies = [d["latency_ms"] for _, d in window]
    phases = [(t0, steps[0]), (steps[0], steps[1]), (steps[1], t1)]
    offsets = [round(sum(d["captured_at"] - at for at, d in window if lo + 2 <= at < hi)
                     / max(1, sum(1 for at, _ in window if lo + 2 <= at < hi))) for lo, hi in phases]
    rate = len(ends) / (t1 - t0)
    after_steps = [sum(1 for e in ends if s <= e < s + 2) for s in steps]
    ok = gap <= 2.0 and all(0 <= x <= 1000 for x in latencies) and all(n <= max(2, 4 * rate * 2) for n in after_steps)
    print(f"{len(window)} results over {t1 - t0:.0f} s with the wall clock stepped +1 h then -2 h: longest gap "
          f"{gap:.2f} s, latency_ms {min(latencies):.0f}-{max(latencies):.0f}, stamps' offset per phase "
          f"{offsets} s (wall follows the steps), events ended {len(ends)} ({rate:.2f}/s), within 2 s after each "
          f"step {after_steps} -> {'holds' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
