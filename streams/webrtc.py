"""WebRTC for talking-head sessions, on aiortc: viewers (WHEP-style) and a microphone (WHIP-style).

`WebRtcOut` is a session sink. The session's thread hands it each frame with its 40 ms of audio
(`write`); on the event loop every viewer gets both, stamped from one counter (video pts in
90 kHz, audio pts in 16 kHz: frame i is at i/25 s on both tracks), into its own bounded queues,
so a slow or gone viewer only loses its own frames and never slows the session. Viewers join and
leave at any time (`offer` -> SDP answer, `drop`); the session does not notice.

`MicIn` takes one browser microphone (an SDP offer with an audio track): its frames are resampled
to 16 kHz mono s16 and pushed into the session's `PushAudio`, like MQTT audio chunks.

Signalling is one HTTP request per peer (offer in, complete answer out: aiortc gathers its
candidates before answering, no trickle). `restrict_host_addresses(["127.0.0.1"])` makes aiortc
offer only those local addresses (aioice otherwise offers every interface but loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from .extras import MissingExtra, require
from .handoff import Handoff

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
QUEUE_FRAMES = 25  # per viewer and track: 1 s; beyond it the oldest frame is dropped
MAX_VIEWERS = 16

_original_host_addresses: Any = None


class WebRtcError(Exception):
    """A refused or failed peer connection; the message says why."""


def require_aiortc() -> None:
    """aiortc importable, else a WebRtcError whose one line names the pip install (`streams.extras`)."""
    try:
        require("aiortc", "webrtc", "WebRTC")
    except MissingExtra as exc:
        raise WebRtcError(str(exc)) from exc


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Offer only these local addresses as ICE host candidates ([] = aioice's default: every
    interface but loopback). Process-wide: aioice reads it when a connection gathers candidates.
    Raises WebRtcError without aiortc."""
    require_aiortc()
    import aioice.ice

    global _original_host_addresses
    if _original_host_addresses is None:
        _original_host_addresses = aioice.ice.get_host_addresses
    if not addresses:
        aioice.ice.get_host_addresses = _original_host_addresses
        return
    chosen = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


def _tracks() -> tuple[type, type]:
    """The two outgoing track classes (aiortc is imported only when WebRTC is used)."""
    import av
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class Out(MediaStreamTrack):
        """A bounded queue of (payload, index, written) items; None ends the track."""

        def __init__(self) -> None:
            super().__init__()
            self.queue: asyncio.Queue[tuple[np.ndarray, int, float] | None] = asyncio.Queue(QUEUE_FRAMES)

        async def recv(self) -> Any:
            item = await self.queue.get()
            if item is None:
                self.stop()
                raise MediaStreamError
            return self.media(*item)

        def media(self, payload: np.ndarray, index: int, written: float) -> Any:
            raise NotImplementedError

    class VideoOut(Out):
        kind = "video"

        def __init__(self, fps: int, delays: deque[float]) -> None:
            super().__init__()
            self.step = VIDEO_CLOCK // fps
            self.delays = delays

        def media(self, frame: np.ndarray, index: int, written: float) -> Any:
            self.delays.append((time.monotonic() - written) * 1000)  # the session's write -> the encoder
            vf = av.VideoFrame.from_ndarray(frame, format="bgr24")
            vf.pts, vf.time_base = index * self.step, Fraction(1, VIDEO_CLOCK)
            return vf

    class AudioOut(Out):
        kind = "audio"

        def __init__(self, sample_rate: int) -> None:
            super().__init__()
            self.rate = sample_rate

        def media(self, samples: np.ndarray, index: int, written: float) -> Any:
            pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").reshape(1, -1)
            af = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            af.sample_rate = self.rate
            af.pts, af.time_base = index * len(samples), Fraction(1, self.rate)
            return af

    return VideoOut, AudioOut


def _put(queue: asyncio.Queue[Any], item: Any) -> bool:
    """Queue `item`, dropping the oldest when full; False when something was dropped."""
    dropped = False
    while True:
        try:
            queue.put_nowait(item)
            return not dropped
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            dropped = True


class _Viewer:
    def __init__(self, pc: Any, video: Any, audio: Any) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.pc = pc
        self.video = video
        self.audio = audio
        self.since = time.time()
        self.frames = 0
        self.dropped = 0
        self.flushed = 0  # frames a barge-in took out of its queue


class WebRtcOut:
    """A session's WebRTC output (the session's sink); `offer` adds a viewer, `drop` removes one."""

    def __init__(self, handoff: Handoff, name: str, fps: int = 25, sample_rate: int = 16_000,
                 max_viewers: int = MAX_VIEWERS) -> None:
        self.handoff = handoff  # the session's thread reaches the loop only through it
        self.name = name
        self.fps = fps
        self.sample_rate = sample_rate
        self.max_viewers = max_viewers
        self.viewers: dict[str, _Viewer] = {}
        self.frames = 0  # written by the session (its clock)
        self.closed = False
        self.served = 0  # viewers that ever connected
        self._closing: asyncio.Task[None] | None = None
        self.delays: deque[float] = deque(maxlen=250)  # ms from the session's write to a viewer's encoder

    # -- the sink side (the session's thread) -----------------------------------------------------
    def write(self, frame: np.ndarray, audio: np.ndarray) -> None:
        index = self.frames
        self.frames += 1
        if self.viewers:  # read without the loop: at worst one frame more or less for a joining viewer
            self.handoff.call(self._fan_out, frame, audio, index, time.monotonic())

    def cut(self) -> None:
        """Barge-in: what every viewer has queued and not yet encoded was said before the cut: it goes
        (on the loop, before the frames written after this)."""
        self.handoff.call(self._flush)

    def close(self) -> None:
        self.closed = True
        self.handoff.call(self._start_closing)  # dropped when the loop is gone at exit

    # -- the loop side ----------------------------------------------------------------------------
    def _start_closing(self) -> None:
        self._closing = asyncio.get_running_loop().create_task(self.close_all())

    def _flush(self) -> None:
        for v in self.viewers.values():
            flushed = 0
            for track in (v.video, v.audio):
                while not track.queue.empty():
                    item = track.queue.get_nowait()
                    if item is None:  # the viewer is leaving: its end stays
                        track.queue.put_nowait(None)
                        break
                    flushed += track is v.video
            v.flushed += flushed

    def _fan_out(self, frame: np.ndarray, audio: np.ndarray, index: int, written: float) -> None:
        for v in list(self.viewers.values()):
            ok = _put(v.video.queue, (frame, index, written)) & _put(v.audio.queue, (audio, index, written))
            v.frames += 1
            v.dropped += 0 if ok else 1

    async def offer(self, sdp: str) -> tuple[str, str]:
        """A viewer's SDP offer -> (viewer id, SDP answer). Raises WebRtcError."""
        from aiortc import RTCPeerConnection, RTCSessionDescription

        if self.closed:
            raise WebRtcError(f"session {self.name} has ended")
        if len(self.viewers) >= self.max_viewers:
            raise WebRtcError(f"session {self.name} has {len(self.viewers)} viewers, the most it serves")
        video_cls, audio_cls = _tracks()
        pc = RTCPeerConnection()
        viewer = _Viewer(pc, video_cls(self.fps, self.delays), audio_cls(self.sample_rate))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            kinds = {t.kind for t in pc.getTransceivers()}
            if not {"video", "audio"} <= kinds:
                raise WebRtcError(f"the offer asks for {sorted(kinds) or 'no media'}; a viewer receives video and "
                                  "audio")
            pc.addTrack(viewer.video)  # onto the offer's (recvonly) transceivers: sendonly here
            pc.addTrack(viewer.audio)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # a malformed offer, no common codec, ...
            await pc.close()
            if isinstance(exc, WebRtcError):
                raise
            raise WebRtcError(f"session {self.name}: cannot answer the offer: {exc}") from exc

        @pc.on("connectionstatechange")
        async def state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.drop(viewer.id)

        self.viewers[viewer.id] = viewer
        self.served += 1
        log.info("session %s: viewer %s joined (%d watching)", self.name, viewer.id, len(self.viewers))
        return viewer.id, pc.localDescription.sdp

    async def drop(self, viewer_id: str) -> bool:
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        for track in (viewer.video, viewer.audio):
            _put(track.queue, None)
        await viewer.pc.close()
        log.info("session %s: viewer %s left (%d watching)", self.name, viewer_id, len(self.viewers))
        return True

    async def close_all(self) -> None:
        await asyncio.gather(*(self.drop(v) for v in list(self.viewers)), return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        d = list(self.delays)
        return {"viewers": len(self.viewers), "viewers_served": self.served,
                "viewer_frames_dropped": sum(v.dropped for v in self.viewers.values()),
                "viewer_frames_cut": sum(v.flushed for v in self.viewers.values()),
                "webrtc_send_ms_p95": round(float(np.percentile(d, 95)), 1) if d else None}


class MicIn:
    """One browser microphone feeding a session's PushAudio (a new one replaces the previous)."""

    def __init__(self, name: str, push: Any, sample_rate: int = 16_000) -> None:
        self.name = name
        self.push = push
        self.rate = sample_rate
        self.pc: Any = None
        self._task: asyncio.Task[None] | None = None
        self.frames = 0

    async def offer(self, sdp: str) -> str:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        await self.close()
        pc = RTCPeerConnection()
        self.pc = pc

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                self._task = asyncio.ensure_future(self._read(track))

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await self.close()
            raise WebRtcError(f"session {self.name}: cannot answer the microphone's offer: {exc}") from exc
        log.info("session %s: microphone connected", self.name)
        return str(pc.localDescription.sdp)

    async def _read(self, track: Any) -> None:
        import av
        from aiortc.mediastreams import MediaStreamError

        resampler = av.AudioResampler(format="s16", layout="mono", rate=self.rate)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            for out in resampler.resample(frame):
                pcm = out.to_ndarray().astype("<i2").tobytes()
                self.frames += 1
                try:
                    # chunks of any length are cut into 40 ms frame chunks by the session's audio queue
                    self.push.push_pcm16(pcm)
                except Exception as exc:
                    log.debug("session %s: microphone chunk refused: %s", self.name, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.pc is not None:
            pc, self.pc = self.pc, None
            await pc.close()
