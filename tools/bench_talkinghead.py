"""Talking-head benchmark: per-frame cost by stage, live sessions per lipsync slot at 25 fps, and the
speed-up of offline segment splitting across 1, 2 and 4 slots.

    .venv/bin/python -m tools.bench_talkinghead [--weights DIR] [--json bench-talkinghead.json]

Without `--weights` it builds tiny random MuseTalk-shaped models (tools/make_tiny_musetalk.py):
their figures measure framegrid's plumbing (batching, blending, encoding, scheduling) around a
model that costs a fraction of the real one, not MuseTalk's own speed. With the real weights in
the official layout, the same script measures the real thing. The report says which.

Stages, per generated frame, at the configured batch size: `features` (Whisper over a live
block's window halfway through a 30 s segment, as a live session computes it), `unet` (one step at
timestep 0), `decode` (VAE),
`blend` (paste-back through the mask), `encode` (H.264 + AAC into a file).
Sessions per slot: K live, real-time sessions (voiced audio, file sinks) on one slot; K is
sustainable when at most 1% of frames are late (repeated because generation fell behind).
Offline: one `render` of the same audio on pools of 1, 2 and 4 slots (torch threads per slot =
cores / slots), frames per second and the ratio to one slot.
WebRTC (`--webrtc [energy] [musetalk]`, `--only-webrtc`): a `framegrid run` with one session whose
audio and output are WebRTC, and headless Chromium speaking tone bursts into it: voice onset at the
microphone -> mouth motion on screen (both on the browser's clock), the server's audio-in ->
frame-out latency, write -> encoder, and the receiver's jitter-buffer delay (getStats).
Cluster (`--cluster-nodes 1 2`, needs `framegrid[cluster]` and Mosquitto): offline jobs of several
lengths (`--job-seconds`) whose segments run as Ray actor tasks on the lipsync slot of every node
of a local Ray cluster (`ray.cluster_utils`, each node declaring `--cluster-cpus` CPUs, so its slot
uses that many threads); this process is the head and computes the audio prompts and blends, as a
cluster head running a talk job does. Speed-up by job length is the ratio to one node. On one
machine the nodes share its cores: N nodes of C CPUs need N x C cores for the figures to mean
N machines (on 2 cores: 1-CPU nodes, at most 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def voiced_audio(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    # a voice-like signal: a 140 Hz buzz with harmonics, its loudness varying at a syllable rate
    buzz = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    return (0.2 * buzz * env).astype(np.float32)


def face_image(workdir: Path) -> Path:
    import cv2
    import skimage.data

    path = workdir / "face.png"
    cv2.imwrite(str(path), skimage.data.astronaut()[..., ::-1])
    return path


class NullSink:
    def write(self, frame: np.ndarray, audio: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


def ms(f: Any, repeat: int) -> float:
    f()  # warm
    t = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - t) * 1000 / repeat


def stage_costs(weights: Path, avatar: Any, batch: int, block: int, workdir: Path) -> dict[str, float]:
    import torch

    from streams.sinks import AVSink
    from talkinghead.musetalk import MuseTalk

    m = MuseTalk(weights)
    m.load()
    face = m.prepare_face(avatar.image, avatar.box)
    # a live block's window halfway through a 30 s segment: 15 s heard, the block, 200 ms ahead
    window = voiced_audio(15.0 + (block + 5) / 25)
    prompts = m.audio_prompts(window)
    audio = torch.cat([prompts] * batch)[:batch].to(m.device, m.dtype) + m._pe
    latents = torch.cat([face.latents] * batch)
    t = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        pred = m.unet(latents, t, encoder_hidden_states=audio).sample
        unet = ms(lambda: m.unet(latents, t, encoder_hidden_states=audio), 3) / batch
        decode = ms(lambda: m.vae.decode(pred / m.scaling), 3) / batch
    features = ms(lambda: m.audio_prompts(window), 3) / block
    generated = m.generate_faces([face.latents], prompts[:1])[0]
    blend = ms(lambda: MuseTalk.paste(face, generated), 20)
    w, h = avatar.size
    sink = AVSink(str(workdir / "stage.mkv"), w, h)
    chunk = window[:640]
    encode = ms(lambda: sink.write(face.frame, chunk), 50)
    sink.close()
    return {
        "features": features,
        "unet": unet,
        "decode": decode,
        "blend": blend,
        "encode": encode,
        "total": features + unet + decode + blend + encode,
    }


def live_sessions(
    weights: Path, avatar: Any, k: int, seconds: float, batch: int, block: int, workdir: Path
) -> dict[str, Any]:
    from pipeline.config import LipSyncConfig
    from pipeline.core.devices import DeviceInfo
    from pipeline.talk.lipsync import musetalk_pool
    from streams.sinks import AVSink
    from talkinghead import TalkSession
    from talkinghead.live import MuseTalkLive
    from talkinghead.musetalk import MuseTalk

    cores = os.cpu_count() or 1
    frontend = MuseTalk(weights, parts={"vae", "whisper"})
    frontend.load()
    faces = frontend.prepare_faces(avatar)
    facts = [DeviceInfo("cpu", "cpu", "CPU", 0, 0, cores=cores)]
    pool = musetalk_pool(
        LipSyncConfig(weights=weights, slots=1, batch_size=batch, batch_timeout_ms=20), device_facts=facts
    )
    pool.start_in_thread()
    audio = voiced_audio(seconds)
    sessions = []
    try:
        for i in range(k):
            backend = MuseTalkLive(
                frontend,
                faces,
                lambda jobs, n=f"s{i}": pool.submit(n, jobs),
                block=block,
                timeout=LipSyncConfig().timeout,
            )
            w, h = avatar.size
            sink = AVSink(str(workdir / f"live{k}-{i}.mkv"), w, h)
            sessions.append(TalkSession(f"s{i}", backend, [audio], sink, realtime=True))
        for s in sessions:
            s.start()
        for s in sessions:
            s.wait(seconds * 4 + 60)
        snap = pool.snapshot()
    finally:
        pool.shutdown()
    frames = sum(s.stats.frames for s in sessions)
    late = sum(s.stats.late for s in sessions)
    inferred = sum(s.stats.inferred for s in sessions)
    return {
        "sessions": k,
        "frames": frames,
        "late": late,
        "late_share": round(late / max(frames, 1), 4),
        "generated_fps_per_session": round(inferred / max(k, 1) / seconds, 2),
        "mean_batch": snap["mean_batch"],
        "sustainable": late <= 0.01 * frames,
    }


def offline(weights: Path, avatar: Any, slots: int, seconds: float, batch: int) -> dict[str, Any]:
    from pipeline.config import LipSyncConfig
    from pipeline.core.devices import DeviceInfo
    from pipeline.talk.lipsync import musetalk_pool
    from talkinghead.musetalk import MuseTalk
    from talkinghead.offline import render

    cores = os.cpu_count() or 1
    frontend = MuseTalk(weights, parts={"vae", "whisper"})
    frontend.load()
    facts = [DeviceInfo("cpu", "cpu", "CPU", 0, 0, cores=cores)]
    pool = musetalk_pool(
        LipSyncConfig(weights=weights, slots=slots, batch_size=batch), device_facts=facts
    ).start_in_thread()
    audio = voiced_audio(seconds)
    try:
        t0 = time.perf_counter()
        counts = render(
            frontend,
            avatar,
            audio,
            NullSink(),
            batch_size=batch,
            in_flight=2 * slots,
            submit=lambda jobs, k: pool.submit("job", jobs, slot=k),
        )
        took = time.perf_counter() - t0
    finally:
        pool.shutdown()
    return {
        "slots": slots,
        "threads_per_slot": max(1, cores // slots),
        "frames": counts["frames"],
        "seconds": round(took, 2),
        "fps": round(counts["frames"] / took, 2),
    }


async def _cluster_jobs(
    weights: Path, avatar: Any, nodes: int, cpus: int, lengths: list[float], batch: int, work: Path
) -> list[dict[str, Any]]:
    import asyncio

    import ray
    from ray.cluster_utils import Cluster

    from pipeline import parse_config
    from pipeline.cluster.head import ClusterHead
    from talkinghead.musetalk import MuseTalk
    from talkinghead.offline import render
    from tools.servers import Mosquitto

    broker = Mosquitto(work)
    broker.start()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus, resources={"framegrid": 1})
    config = parse_config(
        {
            "mqtt": {"url": f"mqtt://127.0.0.1:{broker.port}", "topic_prefix": f"bench-{os.getpid()}"},
            "lipsync": {"weights": str(weights), "batch_size": batch},
            "api": {"enabled": False},
            "pipeline": {"status_interval": 0},
            "cluster": {"backend": "ray", "address": cluster.address},
        },
        work,
    )
    head, stop = ClusterHead(config), asyncio.Event()
    task = asyncio.create_task(head.run(stop))
    frontend = MuseTalk(weights, parts={"vae", "whisper"})
    frontend.load()
    out = []
    try:
        while not head.ready.is_set():
            if task.done():
                task.result()
            await asyncio.sleep(0.2)
        segments = head.segments()

        def job(seconds: float, key: str) -> tuple[int, float]:
            t0 = time.perf_counter()
            counts = render(
                frontend,
                avatar,
                voiced_audio(seconds),
                NullSink(),
                batch_size=batch,
                in_flight=2 * segments.n,
                submit=lambda jobs, k: segments.submit(key, jobs, slot=k),
            )
            return counts["frames"], time.perf_counter() - t0

        await asyncio.to_thread(job, 2 * batch * segments.n / 25, "warm-up")  # every node loads its slot
        for seconds in lengths:
            frames, took = await asyncio.to_thread(job, seconds, f"job-{seconds:g}")
            out.append(
                {
                    "nodes": nodes,
                    "cpus_per_node": cpus,
                    "job_seconds": seconds,
                    "frames": frames,
                    "seconds": round(took, 2),
                    "fps": round(frames / took, 2),
                }
            )
            print(
                f"cluster: {nodes} node(s), {seconds:g} s job: {frames} frames in {took:.1f} s "
                f"({frames / took:.1f} fps)",
                flush=True,
            )
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        ray.shutdown()
        cluster.shutdown()
        broker.stop()
    return out


def cluster_offline(
    weights: Path, avatar: Any, node_counts: list[int], cpus: int, lengths: list[float], batch: int, work: Path
) -> list[dict[str, Any]]:
    """Offline jobs split across the nodes of a local Ray cluster, by job length and node count."""
    import asyncio

    rows = []
    for nodes in node_counts:
        rows += asyncio.run(_cluster_jobs(weights, avatar, nodes, cpus, lengths, batch, work))
    base = {r["job_seconds"]: r["fps"] for r in rows if r["nodes"] == node_counts[0]}
    for r in rows:
        r["speedup"] = round(r["fps"] / base[r["job_seconds"]], 2) if base.get(r["job_seconds"]) else None
    return rows


def webrtc_latency(backend: str, weights: Path, image: Path, seconds: float, work: Path) -> dict[str, Any]:
    """A `framegrid run` with one session (`audio`/`out` = webrtc) and a headless Chromium speaking into
    it (tone bursts: 1 s on, 1 s off): voice onset -> mouth motion on screen (the browser's clock),
    the session's audio-in -> frame-out latency, write -> encoder, and the receiver's jitter buffer."""
    import subprocess
    import wave

    import httpx

    from tools.servers import Mosquitto, free_port
    from tools.webrtc_probe import chromium, jitter_buffer_ms, onset_lags, open_session, speak, until

    rate = 16_000
    t = np.arange(rate) / rate
    tone = np.concatenate([0.5 * np.sin(2 * np.pi * 220 * t), np.zeros(rate)] * int(seconds))
    wav = work / "voice.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((tone * 32767).astype("<i2").tobytes())
    broker = Mosquitto(work)
    broker.start()
    port = free_port()
    lines = [
        "[mqtt]",
        f'url = "{broker.url}"',
        f'topic_prefix = "bench-rtc-{os.getpid()}"',
        "[api]",
        f'listen = "127.0.0.1:{port}"',
        "[pipeline]",
        "status_interval = 0",
        "[webrtc]",
        'addresses = ["127.0.0.1"]',
        "[talk.bench]",
        f'avatar = "{image}"',
        'audio = "webrtc"',
        'out = "webrtc"',
        f'backend = "{backend}"',
    ]
    if backend == "musetalk":
        lines += ["[lipsync]", f'weights = "{weights}"']
    cfg = work / f"webrtc-{backend}.toml"
    cfg.write_text("\n".join(lines) + "\n")
    log = (work / f"webrtc-{backend}.log").open("w")
    env = {**os.environ, "FRAMEGRID_STATE_DIR": str(work / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=10)
    driver = chromium(wav)
    try:

        def figures() -> dict[str, Any]:
            got = [x for x in client.get("/api/talk/sessions").json() if x["name"] == "bench"]
            return {"state": got[0]["state"], **got[0]["figures"]} if got else {}

        until("the session live", lambda: figures().get("state") == "live", 180)
        open_session(driver, base, "bench", None)
        before, t0 = cpu_seconds(proc.pid), time.monotonic()
        state = speak(driver, seconds * 2)
        after, wall = cpu_seconds(proc.pid), time.monotonic() - t0
        session = figures()
    finally:
        driver.quit()
        client.close()
        proc.send_signal(2)
        proc.wait(30)
        log.close()
        broker.stop()
    lags = onset_lags(state["micOnsets"], state["motionOnsets"])
    return {
        "backend": backend,
        "onsets": len(state["micOnsets"]),
        "matched": len(lags),
        "e2e_ms_p50": round(float(np.percentile(lags, 50)), 1) if lags else None,
        "e2e_ms_p95": round(float(np.percentile(lags, 95)), 1) if lags else None,
        "server_ms_p50": session.get("latency_ms_p50"),
        "server_ms_p95": session.get("latency_ms_p95"),
        "send_ms_p95": session.get("webrtc_send_ms_p95"),
        "jitter_buffer_ms": jitter_buffer_ms(state["stats"]),
        "late": session.get("late"),
        "frames": session.get("frames"),
        # cores busy while speaking: the server, and the browser on the same machine
        "cores_framegrid": round((after["framegrid"] - before["framegrid"]) / wall, 2),
        "cores_browser": round((after["browser"] - before["browser"]) / wall, 2),
    }


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the framegrid process and of every Chromium process on the machine."""
    import psutil

    out = {"framegrid": 0.0, "browser": 0.0}
    for p in psutil.process_iter(["pid", "name", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is None:
            continue
        if p.info["pid"] == server_pid:
            out["framegrid"] += t.user + t.system
        elif "chrom" in (p.info["name"] or ""):
            out["browser"] += t.user + t.system
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, help="MuseTalk folder (official layout); default: tiny random models")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=4, help="frames per live session request")
    ap.add_argument("--live-seconds", type=float, default=8.0)
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--offline-seconds", type=float, default=8.0)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument(
        "--cluster-nodes",
        type=int,
        nargs="*",
        default=[],
        help="also split offline jobs over local Ray clusters of these node counts (e.g. 1 2)",
    )
    ap.add_argument("--cluster-cpus", type=int, default=1, help="CPUs each cluster node declares")
    ap.add_argument("--job-seconds", type=float, nargs="+", default=[4.0, 16.0, 48.0])
    ap.add_argument("--only-cluster", action="store_true", help="skip the stage, live and slot figures")
    ap.add_argument(
        "--webrtc",
        nargs="*",
        choices=["energy", "musetalk"],
        default=None,
        help="also measure latency through WebRTC in headless Chromium for these backends "
        "(default when given without names: both)",
    )
    ap.add_argument("--webrtc-seconds", type=float, default=10.0, help="seconds of speaking (tone on/off pairs / 2)")
    ap.add_argument("--only-webrtc", action="store_true", help="skip everything but the WebRTC latency")
    ap.add_argument("--json", type=Path, default=Path("bench-talkinghead.json"))
    args = ap.parse_args()

    import torch

    from talkinghead import prepare_avatar

    work = Path(tempfile.mkdtemp(prefix="framegrid-bench-talk-"))
    if args.weights is None:
        from tools.make_tiny_musetalk import make

        weights, kind = make(work / "tiny"), "tiny random models (plumbing cost; not MuseTalk's own speed)"
    else:
        weights, kind = args.weights, f"MuseTalk weights from {args.weights.name}/"
    avatar = prepare_avatar(face_image(work), cache_dir=work)
    print(f"models: {kind}; device: CPU, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)

    rtc: list[dict[str, Any]] = []
    if args.webrtc is not None or args.only_webrtc:
        for backend in args.webrtc or ["energy", "musetalk"]:
            rtc.append(webrtc_latency(backend, weights, face_image(work), args.webrtc_seconds / 2, work))
            print(
                f"webrtc {backend}: " + ", ".join(f"{k} {v}" for k, v in rtc[-1].items() if k != "backend"), flush=True
            )
        print_webrtc(rtc)
        if args.only_webrtc:
            args.json.write_text(json.dumps({"models": kind, "cores": os.cpu_count(), "webrtc": rtc}, indent=2))
            print(f"\nwrote {args.json}")
            return 0
    if args.only_cluster:
        rows = cluster_offline(
            weights, avatar, args.cluster_nodes or [1, 2], args.cluster_cpus, args.job_seconds, args.batch, work
        )
        print_cluster(rows)
        args.json.write_text(json.dumps({"models": kind, "cores": os.cpu_count(), "cluster_offline": rows}, indent=2))
        print(f"\nwrote {args.json}")
        return 0
    stages = stage_costs(weights, avatar, args.batch, args.block, work)
    print("per generated frame (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), flush=True)

    live = []
    k = 1
    while k <= args.max_sessions:
        r = live_sessions(weights, avatar, k, args.live_seconds, args.batch, args.block, work)
        live.append(r)
        print(
            f"live: {k} session(s) on one slot: late {r['late_share']:.1%}, generated "
            f"{r['generated_fps_per_session']} fps per session, mean batch {r['mean_batch']}",
            flush=True,
        )
        if not r["sustainable"]:
            break
        k *= 2
    sustainable = max((r["sessions"] for r in live if r["sustainable"]), default=0)

    off = [offline(weights, avatar, n, args.offline_seconds, args.batch) for n in args.slots]
    base = off[0]["fps"]
    for r in off:
        r["speedup"] = round(r["fps"] / base, 2) if base else None

    print(f"\n{'stage':<10}{'ms/frame':>10}")
    for name, v in stages.items():
        print(f"{name:<10}{v:>10.2f}")
    print(f"\nlive sessions sustainable at 25 fps on one slot: {sustainable}")
    print(f"\n{'slots':>5} {'threads':>7} {'frames':>6} {'s':>7} {'fps':>7} {'speed-up':>8}")
    for r in off:
        print(
            f"{r['slots']:>5} {r['threads_per_slot']:>7} {r['frames']:>6} {r['seconds']:>7} {r['fps']:>7} "
            f"{r['speedup']:>8}"
        )
    cluster = []
    if args.cluster_nodes:
        cluster = cluster_offline(
            weights, avatar, args.cluster_nodes, args.cluster_cpus, args.job_seconds, args.batch, work
        )
        print_cluster(cluster)
    report = {
        "models": kind,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "batch": args.batch,
        "block": args.block,
        "stages_ms_per_frame": {k: round(v, 3) for k, v in stages.items()},
        "live": live,
        "sessions_per_slot_at_25fps": sustainable,
        "offline": off,
        "cluster_offline": cluster,
        "webrtc": rtc,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


def print_webrtc(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'backend':<9} {'e2e p50':>8} {'e2e p95':>8} {'server p50':>10} {'server p95':>10} {'send p95':>8} "
        f"{'jitter buf':>10} {'onsets':>6} {'late':>9} {'cores fg':>8} {'browser':>7}"
    )
    for r in rows:
        print(
            f"{r['backend']:<9} {r['e2e_ms_p50']!s:>8} {r['e2e_ms_p95']!s:>8} {r['server_ms_p50']!s:>10} "
            f"{r['server_ms_p95']!s:>10} {r['send_ms_p95']!s:>8} {r['jitter_buffer_ms']!s:>10} "
            f"{str(r['matched']) + '/' + str(r['onsets']):>6} {str(r['late']) + '/' + str(r['frames']):>9} "
            f"{r['cores_framegrid']!s:>8} {r['cores_browser']!s:>7}"
        )


def print_cluster(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'nodes':>5} {'cpus':>4} {'job s':>6} {'frames':>6} {'s':>7} {'fps':>7} {'speed-up':>8}")
    for r in rows:
        print(
            f"{r['nodes']:>5} {r['cpus_per_node']:>4} {r['job_seconds']:>6g} {r['frames']:>6} {r['seconds']:>7} "
            f"{r['fps']:>7} {r['speedup']:>8}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
