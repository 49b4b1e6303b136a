"""Talking-head benchmark: per-frame cost by stage, live sessions per lipsync slot at 25 fps, and the
speed-up of offline segment splitting across 1, 2 and 4 slots.

    .venv/bin/python tools/bench_talkinghead.py [--weights DIR] [--json bench-talkinghead.json]

Without `--weights` it builds tiny random MuseTalk-shaped models (tools/make_tiny_musetalk.py):
their figures measure framegrid's plumbing (batching, blending, encoding, scheduling) around a
model that costs a fraction of the real one, not MuseTalk's own speed. With the real weights in
the official layout, the same script measures the real thing. The report says which.

Stages, per generated frame, at the configured batch size: `features` (Whisper over a live
block's window, as a live session computes it), `unet` (one step at timestep 0), `decode` (VAE),
`blend` (paste-back through the mask), `encode` (H.264 + AAC into a file).
Sessions per slot: K live, real-time sessions (voiced audio, file sinks) on one slot; K is
sustainable when at most 1% of frames are late (repeated because generation fell behind).
Offline: one `render` of the same audio on pools of 1, 2 and 4 slots (torch threads per slot =
cores / slots), frames per second and the ratio to one slot.
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
sys.path.insert(0, str(ROOT))


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
    window = voiced_audio(1.0 + (block + 2) / 25)
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
    return {"features": features, "unet": unet, "decode": decode, "blend": blend, "encode": encode,
            "total": features + unet + decode + blend + encode}


def live_sessions(weights: Path, avatar: Any, k: int, seconds: float, batch: int, block: int,
                  workdir: Path) -> dict[str, Any]:
    from pipeline.devices import DeviceInfo
    from pipeline.config import LipSyncConfig
    from pipeline.lipsync import musetalk_pool
    from streams.sinks import AVSink
    from talkinghead import TalkSession
    from talkinghead.live import MuseTalkLive
    from talkinghead.musetalk import MuseTalk

    cores = os.cpu_count() or 1
    frontend = MuseTalk(weights, parts={"vae", "whisper"})
    frontend.load()
    faces = frontend.prepare_faces(avatar)
    facts = [DeviceInfo("cpu", "cpu", "CPU", 0, 0, cores=cores)]
    pool = musetalk_pool(LipSyncConfig(weights=weights, slots=1, batch_size=batch, batch_timeout_ms=20),
                         device_facts=facts)
    pool.start_in_thread()
    audio = voiced_audio(seconds)
    sessions = []
    try:
        for i in range(k):
            backend = MuseTalkLive(frontend, faces, lambda jobs, n=f"s{i}": pool.submit(n, jobs), block=block,
                                   timeout=LipSyncConfig().timeout)
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
    return {"sessions": k, "frames": frames, "late": late, "late_share": round(late / max(frames, 1), 4),
            "generated_fps_per_session": round(inferred / max(k, 1) / seconds, 2),
            "mean_batch": snap["mean_batch"], "sustainable": late <= 0.01 * frames}


def offline(weights: Path, avatar: Any, slots: int, seconds: float, batch: int) -> dict[str, Any]:
    from pipeline.devices import DeviceInfo
    from pipeline.config import LipSyncConfig
    from pipeline.lipsync import musetalk_pool
    from talkinghead.musetalk import MuseTalk
    from talkinghead.offline import render

    cores = os.cpu_count() or 1
    frontend = MuseTalk(weights, parts={"vae", "whisper"})
    frontend.load()
    facts = [DeviceInfo("cpu", "cpu", "CPU", 0, 0, cores=cores)]
    pool = musetalk_pool(LipSyncConfig(weights=weights, slots=slots, batch_size=batch), device_facts=facts
                         ).start_in_thread()
    audio = voiced_audio(seconds)
    try:
        t0 = time.perf_counter()
        counts = render(frontend, avatar, audio, NullSink(), batch_size=batch, in_flight=2 * slots,
                        submit=lambda jobs, k: pool.submit("job", jobs, slot=k))
        took = time.perf_counter() - t0
    finally:
        pool.shutdown()
    return {"slots": slots, "threads_per_slot": max(1, cores // slots), "frames": counts["frames"],
            "seconds": round(took, 2), "fps": round(counts["frames"] / took, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, help="MuseTalk folder (official layout); default: tiny random models")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=4, help="frames per live session request")
    ap.add_argument("--live-seconds", type=float, default=8.0)
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--offline-seconds", type=float, default=8.0)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4])
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

    stages = stage_costs(weights, avatar, args.batch, args.block, work)
    print("per generated frame (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), flush=True)

    live = []
    k = 1
    while k <= args.max_sessions:
        r = live_sessions(weights, avatar, k, args.live_seconds, args.batch, args.block, work)
        live.append(r)
        print(f"live: {k} session(s) on one slot: late {r['late_share']:.1%}, generated "
              f"{r['generated_fps_per_session']} fps per session, mean batch {r['mean_batch']}", flush=True)
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
        print(f"{r['slots']:>5} {r['threads_per_slot']:>7} {r['frames']:>6} {r['seconds']:>7} {r['fps']:>7} "
              f"{r['speedup']:>8}")
    report = {"models": kind, "cores": os.cpu_count(), "torch": torch.__version__, "batch": args.batch,
              "block": args.block, "stages_ms_per_frame": {k: round(v, 3) for k, v in stages.items()},
              "live": live, "sessions_per_slot_at_25fps": sustainable, "offline": off}
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
