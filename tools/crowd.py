#!/usr/bin/env python3
"""A crowd of HTTP clients against a running framegrid, measured beside the same run without them.

    .venv/bin/python -m tools.crowd [--cameras 4] [--clients 200] [--viewers 20] [--live 20] [--seconds 120]

framegrid runs as `framegrid run` (N RTSP cameras looping the rendered 1280x720 25 fps scene, detect
at 5 fps, imgsz 320, a real Mosquitto). Three windows of `--seconds`, back to back: **quiet** (no
clients: the baseline of processed frames per second and RSS), **crowd** (`--clients` concurrent
clients: `--viewers` MJPEG viewers and `--live` server-sent-event readers held open, the rest looping
over the stream list, a stream, a snapshot and the stats, each request timed; plus `--stuck` viewers
that open an MJPEG stream and never read it), and **after** (the clients gone: RSS back to the
baseline?). Reported: requests, 5xx and failures, API p50/p95/max, MJPEG frames received, processed
fps per window and its ratio crowd/quiet, RSS per window, whether the stuck viewers were cut.

Targets (issue 27): no 5xx, API p95 < 500 ms, processed fps >= 0.9x quiet, RSS after within 5% of
quiet's (or 20 MB), stuck viewers cut. Exit status 0 when every target holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tools.servers import Mosquitto, RtspServer, free_port, stop_child

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shapes-yolo11n.pt"
TOKEN = uuid.uuid4().hex


def write_config(path: Path, broker: Mosquitto, server: RtspServer, cameras: int, api_port: int) -> None:
    lines = ["[mqtt]", f'url = "{broker.url}"', f'topic_prefix = "crowd-{uuid.uuid4().hex[:6]}"', "stats_interval = 2",
             "[api]", f'listen = "127.0.0.1:{api_port}"', f'token = "{TOKEN}"',
             "[pipeline]", "status_interval = 0",
             "[models.shapes]", 'type = "yolo"', f'weights = "{MODEL}"', "imgsz = 320"]
    for i in range(cameras):
        lines += [f"[streams.cam{i}]", f'url = "{server.url(f"cam{i}")}"', 'model = "shapes"', "max_fps = 5"]
    path.write_text("\n".join(lines) + "\n")


class Tally:
    def __init__(self) -> None:
        self.ms: list[float] = []
        self.by_kind: dict[str, list[float]] = {}
        self.status: dict[int, int] = {}
        self.failures: list[str] = []
        self.mjpeg_bytes = 0
        self.mjpeg_frames = 0
        self.live_events = 0


def kind_of(path: str) -> str:
    return path.rsplit("/", 1)[-1] if path.endswith((".jpg", "stats", "health", "streams")) else "stream"


def p95(xs: list[float]) -> float | None:
    return round(sorted(xs)[int(len(xs) * 0.95) - 1], 1) if xs else None


async def looping_client(client: Any, paths: list[str], until: float, tally: Tally, rng: random.Random) -> None:
    while time.monotonic() < until:
        path = rng.choice(paths)
        t = time.perf_counter()
        try:
            r = await client.get(path)
            tally.status[r.status_code] = tally.status.get(r.status_code, 0) + 1
            took = (time.perf_counter() - t) * 1000
            tally.ms.append(took)
            tally.by_kind.setdefault(kind_of(path), []).append(took)
        except Exception as exc:
            tally.failures.append(f"{path}: {type(exc).__name__}: {exc}"[:200])
        await asyncio.sleep(rng.uniform(0.05, 0.3))


async def streaming_client(client: Any, path: str, until: float, tally: Tally, kind: str) -> None:
    try:
        async with client.stream("GET", path, timeout=None) as r:
            tally.status[r.status_code] = tally.status.get(r.status_code, 0) + 1
            async for chunk in r.aiter_bytes():
                if kind == "mjpeg":
                    tally.mjpeg_bytes += len(chunk)
                    tally.mjpeg_frames += chunk.count(b"--frame")
                else:
                    tally.live_events += chunk.count(b"data: ")
                if time.monotonic() >= until:
                    return
    except Exception as exc:
        tally.failures.append(f"{path}: {type(exc).__name__}: {exc}"[:200])


def stuck_viewer(port: int, path: str) -> socket.socket:
    """An MJPEG viewer that asks and never reads (its receive buffer as small as the kernel allows)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    return s


def still_open(s: socket.socket) -> bool:
    """False once the server closed the connection (what is waiting is read and dropped)."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False


PROBE = """
import sys, time, httpx
c = httpx.Client(headers={"Authorization": "Bearer %s"}, timeout=30)
while True:
    t = time.perf_counter()
    c.get("http://127.0.0.1:%d/api/health")
    print(round((time.perf_counter() - t) * 1000, 2), flush=True)
    time.sleep(0.25)
"""


def probe(port: int) -> subprocess.Popen[str]:
    """/api/health every 0.25 s from a process of its own: the server's latency, not the crowd's client's."""
    return subprocess.Popen([sys.executable, "-c", PROBE % (TOKEN, port)], stdout=subprocess.PIPE, text=True)


def probed(proc: subprocess.Popen[str]) -> list[float]:
    proc.terminate()
    out, _ = proc.communicate(10)
    return [float(x) for x in out.split()]


def sample(port: int) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"http://127.0.0.1:{port}/api/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    s = r.json()
    return {"processed": sum(v["processed"] for v in s["streams"].values()), "rss_mb": s["process"]["rss_mb"],
            "t": time.monotonic()}


async def crowd(port: int, cameras: int, clients: int, viewers: int, live: int, seconds: float, seed: int,
                tally: Tally) -> None:
    import httpx

    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        until = time.monotonic() + seconds
        names = [f"cam{i}" for i in range(cameras)]
        paths = ["/api/streams", "/api/stats", "/api/health"] + [f"/api/streams/{n}" for n in names] + \
                [f"/api/streams/{n}/snapshot.jpg" for n in names]
        rng = random.Random(seed)
        tasks = [streaming_client(client, f"/api/streams/{names[(seed + i) % cameras]}/mjpeg", until, tally, "mjpeg")
                 for i in range(viewers)]
        tasks += [streaming_client(client, "/api/live", until, tally, "live") for _ in range(live)]
        tasks += [looping_client(client, paths, until, tally, random.Random(rng.random()))
                  for _ in range(clients - viewers - live)]
        await asyncio.gather(*tasks)


def crowd_part(args: tuple[int, int, int, int, int, float, int, str]) -> dict[str, Any]:
    """One process's share of the crowd (a single Python client process for 200 clients measures its own
    queueing: 3-4 s p95 while the server answered in 11 ms)."""
    global TOKEN
    *rest, TOKEN = args
    tally = Tally()
    asyncio.run(crowd(*rest, tally))  # type: ignore[arg-type]
    return vars(tally)


def crowd_processes(port: int, cameras: int, clients: int, viewers: int, live: int, seconds: float,
                    processes: int) -> Tally:
    from concurrent.futures import ProcessPoolExecutor

    def share(n: int, i: int) -> int:
        return n // processes + (1 if i < n % processes else 0)

    parts = [(port, cameras, share(clients, i), share(viewers, i), share(live, i), seconds, i, TOKEN)
             for i in range(processes)]
    tally = Tally()
    with ProcessPoolExecutor(processes) as pool:
        for got in pool.map(crowd_part, parts):
            tally.ms += got["ms"]
            for k, v in got["by_kind"].items():
                tally.by_kind.setdefault(k, []).extend(v)
            for code, n in got["status"].items():
                tally.status[code] = tally.status.get(code, 0) + n
            tally.failures += got["failures"]
            tally.mjpeg_bytes += got["mjpeg_bytes"]
            tally.mjpeg_frames += got["mjpeg_frames"]
            tally.live_events += got["live_events"]
    return tally


def run(cameras: int, clients: int, viewers: int, live: int, stuck: int, seconds: float,
        processes: int) -> dict[str, Any]:
    from tools.bench_streams import annexb, make_camera

    work = Path(tempfile.mkdtemp(prefix="fg-crowd-"))
    video = annexb(make_camera(work, (1280, 720), 25.0, 2.0, seconds=20.0), work)
    broker = Mosquitto(work)
    broker.start()
    server = RtspServer({f"cam{i}": video for i in range(cameras)})
    server.start()
    port = free_port()
    config = work / "crowd.toml"
    write_config(config, broker, server, cameras, port)
    log = (work / "framegrid.log").open("w")
    fg = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if sample(port)["processed"] > cameras * 10:
                    break
            except Exception:
                pass
            time.sleep(1)
        time.sleep(10)  # warm-up
        q0 = sample(port)
        time.sleep(seconds)
        q1 = sample(port)
        stuck_socks = [stuck_viewer(port, f"/api/streams/cam{i % cameras}/mjpeg") for i in range(stuck)]
        c0 = sample(port)
        time.sleep(1)
        opened = sum(still_open(s) for s in stuck_socks)  # (reads what waits: they start as viewers)
        prober = probe(port)
        tally = crowd_processes(port, cameras, clients, viewers, live, seconds, processes)
        c1 = sample(port)
        server_ms = probed(prober)
        still = sum(still_open(s) for s in stuck_socks)
        for s in stuck_socks:
            s.close()
        time.sleep(5)  # the server notices the closed connections
        a0 = sample(port)
        time.sleep(seconds)
        a1 = sample(port)
    finally:
        stop_child(fg)
        log.close()
        server.kill()
        broker.stop()

    def fps(a: dict[str, Any], b: dict[str, Any]) -> float:
        return round((b["processed"] - a["processed"]) / (b["t"] - a["t"]), 2)

    ms = sorted(tally.ms)
    five = sum(n for code, n in tally.status.items() if code >= 500)
    quiet, during, after = fps(q0, q1), fps(c0, c1), fps(a0, a1)
    rss_quiet, rss_after = q1["rss_mb"], a1["rss_mb"]
    out = {
        "cameras": cameras, "clients": clients, "processes": processes, "viewers": viewers, "live": live,
        "stuck": stuck, "seconds": seconds,
        "requests": len(ms), "status": tally.status, "failures": len(tally.failures),
        "failure_examples": tally.failures[:5], "status_5xx": five,
        "api_ms": {"p50": round(statistics.median(ms), 1) if ms else None,
                   "p95": p95(ms),
                   "max": round(ms[-1], 1) if ms else None},
        "probe_ms": {"p50": round(statistics.median(server_ms), 1) if server_ms else None, "p95": p95(server_ms),
                     "max": max(server_ms, default=None), "n": len(server_ms)},
        "p95_by_kind": {k: p95(v) for k, v in sorted(tally.by_kind.items())},
        "mjpeg_frames": tally.mjpeg_frames, "mjpeg_mb": round(tally.mjpeg_bytes / 1e6, 1),
        "live_events": tally.live_events,
        "fps": {"quiet": quiet, "crowd": during, "after": after, "ratio": round(during / quiet, 3) if quiet else None},
        "rss_mb": {"quiet": rss_quiet, "crowd": c1["rss_mb"], "after": rss_after},
        "stuck_opened": opened, "stuck_still_open": still, "log": str(work / "framegrid.log"),
    }
    out["holds"] = bool(five == 0 and not tally.failures and ms and out["api_ms"]["p95"] < 500
                        and quiet and during / quiet >= 0.9
                        and rss_after <= max(rss_quiet * 1.05, rss_quiet + 20) and still == 0)
    return out


def summary(r: dict[str, Any]) -> str:
    return (f"{r['cameras']} cams, {r['clients']} clients ({r['viewers']} MJPEG, {r['live']} live, {r['stuck']} stuck) "
            f"for {r['seconds']:.0f} s: {r['requests']} requests, 5xx {r['status_5xx']}, failures {r['failures']}, "
            f"API p50/p95/max {r['api_ms']['p50']}/{r['api_ms']['p95']}/{r['api_ms']['max']} ms, "
            f"MJPEG frames {r['mjpeg_frames']}, live events {r['live_events']}; "
            f"processed fps quiet {r['fps']['quiet']} "
            f"crowd {r['fps']['crowd']} (x{r['fps']['ratio']}) after {r['fps']['after']}; RSS MB quiet "
            f"{r['rss_mb']['quiet']} crowd {r['rss_mb']['crowd']} after {r['rss_mb']['after']}; stuck viewers still "
            f"open {r['stuck_still_open']} -> {'holds' if r['holds'] else 'MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--viewers", type=int, default=20)
    ap.add_argument("--live", type=int, default=20)
    ap.add_argument("--stuck", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--processes", type=int, default=4, help="client processes the crowd is spread over")
    ap.add_argument("--json")
    a = ap.parse_args()
    r = run(a.cameras, a.clients, a.viewers, a.live, a.stuck, a.seconds, a.processes)
    print(summary(r))
    print("API p95 by request (the crowd's own client):", r["p95_by_kind"])
    print("server latency (/api/health from a process of its own):", r["probe_ms"])
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0 if r["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
