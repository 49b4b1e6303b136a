"""Hostile cameras for tests: MPEG-TS over TCP (`tcp://127.0.0.1:<port>`), built from clips this
module encodes itself and then damages.

Each `FuzzCamera` serves one case to every connection, paced in real time (or faster), and closes
when its bytes are out (framegrid reconnects, as to a camera that hung up):

- `bitflips`: H.264 whose packets have random bits flipped (1 in 2000 bytes);
- `truncated`: H.264 whose packets are cut short at random (a third of them);
- `garbage`: H.264 with random NAL units (valid start codes, random types and bodies) between frames;
- `hevc_garbage`: H.265 with flipped bits and garbage NAL units;
- `timestamps`: H.264 whose timestamps jump back 5 s and then forward 60 s (segments muxed apart
  and joined, as a camera whose clock is reset);
- `codec_change`: H.264, then H.265 on the same programme (a camera reconfigured while streaming);
- `resolution`: 320x240, then 16x16, then 7680x4320 (3 frames), then 640x360, in one connection;
- `fast`: a 10 fps stream sent at 4x its rate (40 frames/s of wall clock);
- `stall`: sends the stream's first bytes, then nothing, keeping the connection open forever.

Clips are the synthetic camera scene (`streams.synthetic.camera_scene`), so detections exist
wherever a frame survives.
"""

from __future__ import annotations

import io
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

CASES = ("bitflips", "truncated", "garbage", "hevc_garbage", "timestamps", "codec_change", "resolution", "fast",
         "stall")
TS_PACKET = 188


@dataclass
class Packet:
    data: bytes
    pts: int
    key: bool


def encode(codec: str, width: int, height: int, frames: int, fps: int = 10, seed: int = 7) -> tuple[list[Packet], Any]:
    """`frames` of the synthetic scene encoded with `codec` (libx264 / libx265): packets in Annex B
    (in-band parameter sets), and the codec context (for muxing)."""
    import av

    from streams.synthetic import camera_scene

    scene = camera_scene(min(max(width, 32), 640), min(max(height, 32), 360), fps=fps, seed=seed)  # then scaled
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base = Fraction(1, fps)
    ctx.framerate = Fraction(fps, 1)
    ctx.gop_size = fps
    opts = {"preset": "ultrafast", "tune": "zerolatency"}
    if codec == "libx265":
        opts["x265-params"] = "log-level=none:repeat-headers=1"  # x265's banner goes to stderr regardless
    else:
        opts["x264-params"] = "repeat-headers=1"
    ctx.options = opts
    out: list[Packet] = []
    for i, (image, _truth) in enumerate(scene.frames(frames)):
        if image.shape[1] != width or image.shape[0] != height:
            import cv2

            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24").reformat(format="yuv420p")
        frame.pts = i
        out += [Packet(bytes(p), int(p.pts), bool(p.is_keyframe)) for p in ctx.encode(frame)]
    out += [Packet(bytes(p), int(p.pts), bool(p.is_keyframe)) for p in ctx.encode(None)]
    return out, ctx


def mux_ts(packets: list[Packet], codec: str, width: int, height: int, fps: int = 10, offset_s: float = 0.0) -> bytes:
    """Packets into an MPEG-TS byte stream (timestamps shifted by `offset_s`)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as out:
        stream = out.add_stream("hevc" if "265" in codec or codec == "hevc" else "h264", rate=fps)
        stream.width, stream.height = width, height
        stream.time_base = Fraction(1, 90_000)
        step = 90_000 // fps
        shift = int(offset_s * 90_000)
        for p in packets:
            pkt = av.Packet(p.data)
            pkt.stream = stream
            pkt.pts = pkt.dts = p.pts * step + shift + 90_000  # muxers want dts >= 0 with room for B-frames
            pkt.time_base = stream.time_base
            pkt.is_keyframe = p.key
            out.mux(pkt)
    return buf.getvalue()


def flip_bits(packets: list[Packet], rng: random.Random, per_bytes: int = 2000) -> list[Packet]:
    out = []
    for p in packets:
        data = bytearray(p.data)
        for _ in range(max(1, len(data) // per_bytes)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        out.append(Packet(bytes(data), p.pts, p.key))
    return out


def truncate(packets: list[Packet], rng: random.Random, share: float = 0.33) -> list[Packet]:
    return [Packet(p.data[:rng.randrange(1, max(2, len(p.data)))] if rng.random() < share else p.data, p.pts, p.key)
            for p in packets]


def add_garbage_nals(packets: list[Packet], rng: random.Random) -> list[Packet]:
    out = []
    for p in packets:
        junk = b"".join(b"\x00\x00\x00\x01" + bytes(rng.randrange(256) for _ in range(rng.randrange(2, 64)))
                        for _ in range(rng.randrange(1, 4)))
        out.append(Packet(p.data + junk if rng.random() < 0.5 else junk + p.data, p.pts, p.key))
    return out


@dataclass
class Segment:
    """Bytes sent at `speed` x real time for `seconds` of stream."""

    data: bytes
    seconds: float
    speed: float = 1.0


def build(case: str, seed: int = 1) -> list[Segment]:
    """The segments one connection of `case` receives."""
    rng = random.Random(seed)
    fps, seconds = 10, 6.0
    n = int(fps * seconds)

    def h264(w: int = 320, h: int = 240, frames: int = n, s: int = seed) -> list[Packet]:
        return encode("libx264", w, h, frames, fps, s)[0]

    if case == "bitflips":
        return [Segment(mux_ts(flip_bits(h264(), rng), "h264", 320, 240), seconds)]
    if case == "truncated":
        return [Segment(mux_ts(truncate(h264(), rng), "h264", 320, 240), seconds)]
    if case == "garbage":
        return [Segment(mux_ts(add_garbage_nals(h264(), rng), "h264", 320, 240), seconds)]
    if case == "hevc_garbage":
        pk = encode("libx265", 320, 240, n, fps, seed)[0]
        return [Segment(mux_ts(add_garbage_nals(flip_bits(pk, rng), rng), "hevc", 320, 240), seconds)]
    if case == "timestamps":
        third = n // 3
        pk = h264()
        return [Segment(mux_ts(pk[:third], "h264", 320, 240, fps, 10.0), seconds / 3),
                Segment(mux_ts(pk[third:2 * third], "h264", 320, 240, fps, 5.0), seconds / 3),  # back 5 s
                Segment(mux_ts(pk[2 * third:], "h264", 320, 240, fps, 70.0), seconds / 3)]  # forward 60 s
    if case == "codec_change":
        return [Segment(mux_ts(h264(frames=n // 2), "h264", 320, 240), seconds / 2),
                Segment(mux_ts(encode("libx265", 320, 240, n // 2, fps, seed)[0], "hevc", 320, 240), seconds / 2)]
    if case == "resolution":
        return [Segment(mux_ts(h264(320, 240, 20), "h264", 320, 240), 2.0),
                Segment(mux_ts(h264(16, 16, 20), "h264", 16, 16), 2.0),
                Segment(mux_ts(h264(7680, 4320, 2), "h264", 7680, 4320), 0.2),
                Segment(mux_ts(h264(640, 360, 20), "h264", 640, 360), 2.0)]
    if case == "fast":
        return [Segment(mux_ts(h264(frames=4 * n), "h264", 320, 240), 4 * seconds, speed=4.0)]
    if case == "stall":
        return [Segment(mux_ts(h264(frames=10), "h264", 320, 240)[:TS_PACKET * 20], 0.1)]
    raise ValueError(f"unknown case {case!r} (cases: {', '.join(CASES)})")


class FuzzCamera:
    """A TCP server serving one case's bytes to each connection, paced; `url` is what framegrid opens."""

    def __init__(self, case: str, seed: int = 1) -> None:
        self.case = case
        self.segments = build(case, seed)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> FuzzCamera:
        self._spawn(self._accept)
        return self

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=f"fuzz-{self.case}")
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            for seg in self.segments:
                chunks = [seg.data[i:i + TS_PACKET * 7] for i in range(0, len(seg.data), TS_PACKET * 7)]
                interval = seg.seconds / seg.speed / max(1, len(chunks))
                start = time.monotonic()
                for i, chunk in enumerate(chunks):
                    if self._stop.is_set():
                        return
                    conn.sendall(chunk)
                    delay = start + (i + 1) * interval - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
            if self.case == "stall":
                self._stop.wait()  # the connection stays open and silent
        except OSError:
            pass  # framegrid hung up (a reconnect): fine
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        for t in self._threads:
            t.join(5)
