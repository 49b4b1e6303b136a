"""Test media and scoring: a face photo, tones, WAV files, probing written files, box IoU, reading
detections off a subscriber, a process's RSS, an event record, a sink that keeps frames."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from talkinghead import SAMPLE_RATE

from .procs import Subscriber


def write_face_image(folder: Path) -> Path:
    """A real photo with a frontal face, shipped inside scikit-image (no download)."""
    from skimage import data

    path = folder / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    return path


def tone_on_off(pattern: list[tuple[float, bool]], rate: int = SAMPLE_RATE) -> np.ndarray:
    """A 220 Hz tone switched on and off: [(seconds, on), ...]."""
    parts = []
    for seconds, on in pattern:
        n = round(seconds * rate)
        t = np.arange(n) / rate
        parts.append((0.5 * np.sin(2 * np.pi * 220 * t) if on else np.zeros(n)).astype(np.float32))
    return np.concatenate(parts)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def probe_output(path: Path) -> tuple[int, float, float, list[np.ndarray]]:
    """(video frames, video fps, audio seconds, decoded frames) of a written file."""
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        fps = float(v.average_rate)
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(v)]
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(c.streams.audio[0]))
        rate = c.streams.audio[0].rate
    return len(frames), fps, samples / rate, frames


def wait_until_stable(path: Path, quiet: float = 1.0, timeout: float = 15.0) -> None:
    """Wait until `path` exists and its size has not changed for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else -1
        if size != last:
            last, since = size, time.monotonic()
        elif size > 0 and time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{path} still changing after {timeout}s")


def iou(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detections(sub: Subscriber, stream: str) -> list[dict[str, Any]]:
    return [m.json() for m in sub.of(f"/streams/{stream}/detections")]


def states(sub: Subscriber, stream: str) -> list[str]:
    return [m.json()["state"] for m in sub.of(f"/streams/{stream}/state")]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def event(i: int, t: float, kind: str = "new") -> dict[str, Any]:
    after = {"id": f"cam-{i}-{int(t * 1000)}", "track_id": i, "label": "car", "score": 0.9, "best_score": 0.9,
             "box": [0, 0, 1, 1], "zones": [], "entered_zones": ["left"], "crossings": [], "first_seen": t,
             "last_seen": t + 1, "stationary": False, "has_snapshot": False}
    return {"v": 1, "stream": "cam", "type": kind, "before": None, "after": after, "changed": []}


class FrameSink:
    """Keeps what a session or render writes, uncompressed."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.audio: list[np.ndarray] = []
        self.times: list[float] = []  # time.monotonic() of each write

    def write(self, frame: np.ndarray, audio: np.ndarray) -> None:
        self.frames.append(frame)
        self.audio.append(audio)
        self.times.append(time.monotonic())

    def close(self) -> None:
        pass


def x264_settings(path: Path) -> dict[str, str]:
    """The options x264 wrote into the stream (its SEI text: `... options: cabac=1 ... crf=18.0 ...`)."""
    import av

    with av.open(str(path)) as c:
        data = b"".join(bytes(p) for _, p in zip(range(3), c.demux(c.streams.video[0]), strict=False))
    text = data[data.index(b"options: ") + 9:].split(b"\x00")[0].decode("ascii", "replace")
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)
