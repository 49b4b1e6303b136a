"""A/V sinks with PyAV: a file, HLS to a directory, or a push to an RTSP (ANNOUNCE/RECORD) or RTMP server.

`AVSink.write(frame, audio)` takes one BGR video frame and the float32 mono audio that belongs
to it (40 ms at 25 fps and 16 kHz), stamps both from one counter, and encodes them into one
container: audio and video share a clock by construction. H.264 and AAC. Live (the default:
`Encoding()`): ultrafast, zerolatency, one keyframe per second so HLS segments and late RTSP
viewers start quickly. Offline files (`OFFLINE`): x264 at CRF 18, preset medium, its own keyframe
placement, as MuseTalk's published inference writes its results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StreamError
from .redact import redact_text

log = logging.getLogger(__name__)


class SinkError(StreamError):
    """The sink cannot be opened or written (server gone, disk full, ...)."""


def container_for(target: str) -> tuple[str, str | None, dict[str, str]]:
    """(URL or path, FFmpeg muxer, muxer options) for a sink target."""
    if target.startswith(("rtsp://", "rtsps://")):
        return target, "rtsp", {"rtsp_transport": "tcp"}
    if target.startswith(("rtmp://", "rtmps://")):
        return target, "flv", {}
    if target.endswith(".m3u8"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        # a live window of 10 one-second segments; older segments are deleted (bounded disk)
        return target, "hls", {"hls_time": "1", "hls_list_size": "10",
                               "hls_flags": "independent_segments+delete_segments"}
    return target, None, {}


@dataclass(frozen=True)
class Encoding:
    """x264 settings of a sink: `crf` None is x264's default rate control for `preset`; `live`
    adds zerolatency and a keyframe every second."""

    preset: str = "ultrafast"
    crf: int | None = None
    live: bool = True

    def options(self, fps: int) -> dict[str, str]:
        opts = {"preset": self.preset}
        if self.crf is not None:
            opts["crf"] = str(self.crf)
        if self.live:
            opts.update({"tune": "zerolatency", "g": str(fps), "keyint_min": str(fps), "sc_threshold": "0"})
        return opts


LIVE = Encoding()
OFFLINE = Encoding(preset="medium", crf=18, live=False)  # MuseTalk's published inference: -crf 18, medium
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


class AVSink:
    """One output stream; not thread-safe (one writer)."""

    def __init__(self, target: str, width: int, height: int, fps: int = 25, sample_rate: int = 16_000,
                 timeout: float = 10.0, encoding: Encoding = LIVE, audio_source: str | Path | None = None) -> None:
        """`audio_source`: a file whose own audio (its rate and channels) goes into the output instead of
        the 16 kHz mono given to `write` (offline renders, as MuseTalk's published inference muxes it)."""
        import av

        self.target = target
        self.name = redact_text(target)
        self.fps = fps
        self.sample_rate = sample_rate
        url, fmt, options = container_for(target)
        try:
            self._out: Any = av.open(url, mode="w", format=fmt, options=options, timeout=timeout)
            v = self._out.add_stream("libx264", rate=fps)
            v.width, v.height, v.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
            v.codec_context.options = encoding.options(fps)
            v.codec_context.time_base = Fraction(1, fps)
            self._given = _GivenAudio(audio_source) if audio_source is not None else None
            rate, layout = (self._given.rate, self._given.layout) if self._given else (sample_rate, "mono")
            a = self._out.add_stream("aac", rate=rate)
            a.codec_context.layout = layout
            a.codec_context.time_base = Fraction(1, rate)
            if fmt in ("rtsp", "flv"):
                self._out.start_encoding()  # connect now (ANNOUNCE/RECORD), so a dead server fails here
        except (av.error.FFmpegError, OSError) as exc:
            raise SinkError(f"sink {self.name}: cannot open: {exc}") from exc
        self._v, self._a = v, a
        self._network = fmt in ("rtsp", "flv")
        self.linger = 0.5
        self.frames = 0
        self.samples = 0
        self._closed = False

    def write(self, frame: np.ndarray, audio: np.ndarray) -> None:
        import av

        if self._closed:
            raise SinkError(f"sink {self.name}: closed")
        try:
            if frame.shape[1] != self._v.width or frame.shape[0] != self._v.height:
                frame = frame[: self._v.height, : self._v.width]
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")
            vf.pts = self.frames
            vf.time_base = Fraction(1, self.fps)
            self._mux(self._v.encode(vf))
            if self._given is not None:  # the source's own audio, up to the end of this frame
                for af in self._given.until((self.frames + 1) / self.fps):
                    self._mux(self._a.encode(af))
            else:
                af = av.AudioFrame.from_ndarray(audio.astype(np.float32).reshape(1, -1), format="fltp",
                                                layout="mono")
                af.sample_rate = self.sample_rate
                af.pts = self.samples
                af.time_base = Fraction(1, self.sample_rate)
                self._mux(self._a.encode(af))
        except (av.error.FFmpegError, OSError) as exc:
            raise SinkError(f"sink {self.name}: write failed: {exc}") from exc
        self.frames += 1
        self.samples += len(audio)

    def _mux(self, packets: list[Any]) -> None:
        for p in packets:
            self._out.mux(p)

    def close(self) -> None:
        import av

        if self._closed:
            return
        self._closed = True
        try:
            self._mux(self._v.encode(None))
            if self._given is not None:  # the rest of the source's audio, all of it
                for af in self._given.until(float("inf")):
                    self._mux(self._a.encode(af))
                self._given.close()
            self._mux(self._a.encode(None))
        except (av.error.FFmpegError, OSError) as exc:
            log.warning("sink %s: flush failed: %s", self.name, exc)
        finally:
            if self._network:
                # the TEARDOWN follows at once: give the server a moment to take in the last packets
                # (a receiver that tears its pipeline down drops what it still buffers)
                time.sleep(self.linger)
            try:
                self._out.close()
            except (av.error.FFmpegError, OSError) as exc:
                log.warning("sink %s: close failed: %s", self.name, exc)


class _GivenAudio:
    """A file's audio decoded in order and handed out by time, at its own rate and channels (as
    float planes, what the AAC encoder takes)."""

    def __init__(self, path: str | Path) -> None:
        import av

        try:
            self._in: Any = av.open(str(path))
            stream = self._in.streams.audio[0]
        except (av.error.FFmpegError, OSError, IndexError) as exc:
            raise SinkError(f"audio {redact_text(str(path))}: cannot read its audio: {exc}") from exc
        self.rate = int(stream.codec_context.sample_rate or stream.rate)
        channels = stream.codec_context.channels
        self.layout = "mono" if channels == 1 else "stereo" if channels == 2 else stream.codec_context.layout.name
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        self._frames: Iterator[Any] | None = self._in.decode(stream)
        self._written = 0  # samples handed out

    def until(self, t: float) -> list[Any]:
        """The next frames of the source, up to `t` seconds (stamped consecutively)."""
        out: list[Any] = []
        while self._frames is not None and self._written < t * self.rate:
            frame = next(self._frames, None)
            for af in self._resampler.resample(frame):  # None flushes the resampler at the end
                af.pts, af.time_base = self._written, Fraction(1, self.rate)
                self._written += af.samples
                out.append(af)
            if frame is None:
                self._frames = None
        return out

    def close(self) -> None:
        self._in.close()
