#!/usr/bin/env python3
"""Render the demo camera video used by the default config.toml (media/demo-shapes.mp4).

    .venv/bin/python -m tools.make_demo_video [--seconds 30] [--out media/demo-shapes.mp4]

Deterministic (seed 7): moving coloured shapes, 640x360 at 15 fps, H.264 with no B-frames and a
one-second GOP. Its per-frame ground truth is `streams.synthetic.MovingScene(seed=7).truth_at(i)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streams.synthetic import MovingScene, write_video

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "media" / "demo-shapes.mp4")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n = write_video(args.out, MovingScene(seed=args.seed), args.seconds, crf=28)
    print(f"{args.out}: {n} frames, {args.out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
