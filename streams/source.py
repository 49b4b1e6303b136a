"""Video sources: one PyAV decode thread per stream, with reconnect and a state machine.

A `Source` opens any URL FFmpeg understands (RTSP over TCP by default, files, HTTP, lavfi...),
decodes video on its own thread and hands each frame to a callback that must not block (the
stream's mailbox). It never waits for a consumer. Open and reads carry timeouts so nothing
hangs; a stream that goes quiet for `stall_timeout` is reconnected with full-jitter backoff.
A local file can be paced at its native rate and looped, so it behaves like a live camera.

States: connecting -> streaming -> reconnecting -> streaming ...; `failed` when retrying is
pointless (a local file that is missing or not video) or the retry budget is spent; `ended`
when a file that does not loop reaches its end; `stopped` after `stop()`.
Every message that leaves this module is redacted: URLs carry passwords.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

import av
from pydantic import BaseModel, ConfigDict, Field

from .backoff import Backoff
from .clock import SYSTEM_CLOCK, Clock
from .errors import NotVideoError, SourceOpenError, StreamError, StreamStalled
from .frame import Frame, VideoPicture
from .keyframe import Keyframe
from .redact import redact_text, redact_url

log = logging.getLogger(__name__)

class StreamState(StrEnum):
    """The one list of a stream's states. The source moves through the middle ones; the pipeline
    sets `starting` (configured, its model still loading), `refused` (admission control found no
    executor slot with room) and `failed` (also when its model cannot load)."""

    STARTING = "starting"
    CONNECTING = "connecting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    ENDED = "ended"
    STOPPED = "stopped"
    REFUSED = "refused"


CONNECTING = StreamState.CONNECTING
STREAMING = StreamState.STREAMING
RECONNECTING = StreamState.RECONNECTING
FAILED = StreamState.FAILED
ENDED = StreamState.ENDED
STOPPED = StreamState.STOPPED


@dataclass(frozen=True, slots=True)
class SourceState:
    """A snapshot of a source's state, safe to publish (no credentials)."""

    stream: str
    state: StreamState
    since: float
    reconnects: int
    error: str | None = None


class SourceSettings(BaseModel):
    """How a source opens and keeps its stream: the media part of a stream's config.

    The one place these defaults live; the pipeline's per-stream config extends this model, so a
    stream's config is the source's settings as they are.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    transport: Literal["tcp", "udp"] = Field("tcp", description="RTSP transport")
    realtime: bool | None = Field(None, description="pace files at native rate (default: yes for files)")
    loop: bool | None = Field(None, description="restart files at the end (default: yes for files)")
    open_timeout: float = Field(10.0, gt=0, le=600, description="seconds to open before retrying")
    stall_timeout: float = Field(10.0, gt=0, le=600, description="seconds without a frame before reconnecting")
    reconnect_base: float = Field(0.5, gt=0, le=60, description="first reconnect delay ceiling (full jitter)")
    reconnect_cap: float = Field(30.0, gt=0, le=3600, description="max seconds between reconnect attempts")
    max_retries: int | None = Field(None, ge=0, description="consecutive failures before 'failed'")
    ffmpeg_options: dict[str, str] = Field(default_factory=dict, description="extra demuxer options")
    skip_frames: Literal["auto", "none", "nonref", "nonkey"] = Field(
        "auto", description="frames the decoder does not decode at all: nonref (B-frames and other "
        "non-reference frames), nonkey (all but keyframes); auto = nonref when max_fps is at most a third of "
        "the camera's rate, else none")
    hwaccel: str | None = Field(None, pattern=r"^(cuda|vaapi|qsv|drm|vulkan|videotoolbox|d3d11va|d3d12va|dxva2)$",
                                description="hardware decoder device type (FFmpeg's), falling back to "
                                "software when the device or codec is not supported")


def is_local_file(url: str) -> bool:
    if url.startswith("file:"):
        return True
    return "://" not in url and ":" not in url.split("/")[0]


def ffmpeg_options(url: str, opts: SourceSettings) -> dict[str, str]:
    """Demuxer options: low-latency defaults for network streams, user options on top."""
    out: dict[str, str] = {}
    if url.startswith(("rtsp://", "rtsps://")):
        out.update(
            rtsp_transport=opts.transport,
            # socket I/O timeout in microseconds: a dead server raises instead of hanging
            timeout=str(int(opts.stall_timeout * 1_000_000)),
            # measured: cuts av.open from ~1.0 s to ~0.2 s; SPS/PPS come in the SDP anyway
            analyzeduration="100000",
            probesize="32768",
            fflags="nobuffer",
            flags="low_delay",
        )
    elif "://" in url and not url.startswith("file:"):
        out.update(rw_timeout=str(int(opts.stall_timeout * 1_000_000)))
    out.update(opts.ffmpeg_options)
    return out


def hw_accel(opts: SourceSettings) -> Any:
    """FFmpeg's hardware decoder for `opts.hwaccel` (software fallback allowed), or None."""
    if not opts.hwaccel:
        return None
    from av.codec.hwaccel import HWAccel

    return HWAccel(opts.hwaccel, allow_software_fallback=True)


def open_container(url: str, opts: SourceSettings, hardware: bool = True) -> Any:
    """av.open with timeouts (and the hardware decoder when configured and `hardware`); errors
    mapped to ours with the URL redacted.

    Reads are timed out by FFmpeg's own socket options (`ffmpeg_options`: `timeout`, `rw_timeout`),
    not by PyAV's read timeout: that one is an interrupt callback taking the GIL at every poll of
    every demuxer (FFmpeg calls it in its I/O loops), and 32 cameras' main and substreams had the
    reading threads queue for the GIL (measured with py-spy: most waits were in that callback).
    `open_timeout` stays PyAV's (a callback during the open only)."""
    try:
        return av.open(
            url,
            options=ffmpeg_options(url, opts),
            timeout=(opts.open_timeout, None),
            **({"hwaccel": hw_accel(opts)} if opts.hwaccel and hardware else {}),
        )
    except av.error.FFmpegError as exc:
        raise SourceOpenError(f"cannot open {redact_url(url)}: {_describe(exc)}") from exc
    except (OSError, ValueError) as exc:
        raise SourceOpenError(f"cannot open {redact_url(url)}: {redact_text(str(exc))}") from exc


def first_video_stream(container: Any, url: str) -> Any:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise NotVideoError(f"{redact_url(url)} has no video stream (found: {', '.join(kinds)})")
    return container.streams.video[0]


def _describe(exc: BaseException) -> str:
    """A short, redacted description of an FFmpeg/OS error (no filenames with passwords)."""
    if isinstance(exc, av.error.FFmpegError):
        text = exc.strerror or type(exc).__name__
    else:
        text = str(exc) or type(exc).__name__
    return redact_text(text)


class PacketSink(Protocol):
    """What takes a source's packets before they are decoded (see `streams.recorder`)."""

    def opened(self, vstream: Any) -> None: ...

    def packet(self, pkt: Any, wall: float) -> None: ...


class Source:
    """A live (or paced file) video source decoded on its own thread."""

    def __init__(
        self,
        stream: str,
        url: str,
        on_frame: Callable[[Frame], None],
        on_state: Callable[[SourceState], None] | None = None,
        options: SourceSettings | None = None,
        backoff: Backoff | None = None,
        decode_threads: int = 0,
        wanted_fps: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        decode: bool = True,
    ) -> None:
        """`decode_threads`: FFmpeg threads (0 = FFmpeg decides). `wanted_fps`: the most frames per
        second anyone will use (the stream's max_fps), for `skip_frames = "auto"`. `decode=False`
        reads packets only (for the `recorder`): a camera's main stream when a substream is detected on."""
        self.stream = stream
        self._url = url
        self.url_redacted = redact_url(url)
        self.options = options or SourceSettings()
        self.decode_threads = decode_threads
        self.wanted_fps = wanted_fps
        self.clock = clock
        self._on_frame = on_frame
        self._on_state = on_state
        self.local = is_local_file(url)
        self.realtime = self.options.realtime if self.options.realtime is not None else self.local
        self.loop = self.options.loop if self.options.loop is not None else self.local
        self._backoff = backoff or Backoff(self.options.reconnect_base, self.options.reconnect_cap)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._state = SourceState(stream, CONNECTING, clock.wall(), 0)
        self.decode_errors = 0  # corrupt packets skipped (published in the stream's stats)
        self.corrupt_frames = 0  # frames the decoder flagged as concealed damage (kept; counted in the stats)
        # CPU seconds this decoder's thread spent in decode calls: what decoding costs, whatever the
        # contention (wall time in a decode call also counts waiting for a core)
        self.decode_cpu_s = 0.0
        self.fps: float | None = None
        self.skipping = "none"  # what the decoder skips now (resolved from skip_frames per connection)
        self.shed = False  # set by the pipeline under decode overload: keyframes only, whatever `skipping` says
        # while shedding, whether a decoded frame would be used now (its mailbox holds none untaken):
        # a keyframe nobody would take is not decoded either, so decoding follows what the slots serve
        self.demand: Callable[[], bool] | None = None
        self.shed_packets = 0  # packets not decoded while shedding (non-key, or keyframes not in demand)
        self.hw_decoding = False  # whether the open decoder really runs on hardware
        self.hw_error: str | None = None  # why hardware decoding was given up (then: software for good)
        self.recorder: PacketSink | None = None  # gets every demuxed video packet (event clips), decoded or not
        self.decode = decode
        self.size: tuple[int, int] | None = None  # the video's (width, height) as last opened
        self.packets = 0  # packets read (a packet-only source's figure of life)
        self.keyframe: Keyframe | None = None  # a packet-only source's latest keyframe (decoded when asked)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"stream {self.stream}: source already started")
        self._thread = threading.Thread(target=self._run, name=f"stream[{self.stream}].decode", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the thread to stop and wait; True when it has ended (reads time out at worst)."""
        self._stop.set()
        if self._thread is None:
            self._set_state(STOPPED)
            return True
        self._thread.join(timeout if timeout is not None else self.options.stall_timeout + 2)
        return not self._thread.is_alive()

    @property
    def state(self) -> SourceState:
        with self._lock:
            return self._state

    def _set_state(self, state: StreamState, error: str | None = None, reconnect: bool = False) -> None:
        with self._lock:
            old = self._state
            if old.state == state and old.error == error and not reconnect:
                return
            if old.state == STOPPED:
                return
            new = SourceState(
                self.stream,
                state,
                self.clock.wall() if state != old.state else old.since,
                old.reconnects + (1 if reconnect else 0),
                error,
            )
            self._state = new
        if state != old.state:
            level = logging.WARNING if state in (RECONNECTING, FAILED) else logging.INFO
            log.log(level, "stream %s: %s%s", self.stream, state, f" ({error})" if error else "")
        if self._on_state is not None:
            try:
                self._on_state(new)
            except Exception:  # a listener's bug must not kill decoding
                log.exception("stream %s: state listener failed", self.stream)

    # -- the decode thread ---------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        pts_offset = 0.0
        index = 0
        first = True
        while not self._stop.is_set():
            if not first:
                self._set_state(RECONNECTING, self._state.error, reconnect=True)
            first = False
            if self._state.state != RECONNECTING:
                self._set_state(CONNECTING)
            error: str | None = None
            permanent = False
            got_frames = False
            packets = self.packets
            try:
                for frame in self._decode_once(pts_offset, index) if self.decode else self._packets_once():
                    got_frames = True
                    index = frame.index + 1
                    if frame.pts is not None:
                        pts_offset = frame.pts + (1.0 / self.fps if self.fps else 0.04)
                    self._on_frame(frame)
                got_frames = got_frames or self.packets > packets  # (a packet-only source: packets came)
                if self._stop.is_set():
                    break
                if self.local and self.loop and got_frames:
                    continue  # seamless loop: reopen at once, pts keep counting
                if self.local:
                    self._set_state(ENDED)
                    return
                error = "end of stream"
            except NotVideoError as exc:
                error, permanent = str(exc), self.local
            except SourceOpenError as exc:
                error = str(exc)
                permanent = self.local  # a missing or unreadable file does not heal by retrying
            except StreamError as exc:
                error = str(exc)
            except av.error.FFmpegError as exc:
                error = f"decode error: {_describe(exc)}"
            except Exception as exc:  # never let one camera take the process down
                log.exception("stream %s: unexpected decoder failure", self.stream)
                error = f"unexpected: {redact_text(repr(exc))}"
            if self._stop.is_set():
                break
            got_frames = got_frames or self.packets > packets  # (a failed read may have had packets first)
            failures = 0 if got_frames else failures + 1
            if got_frames:
                self._backoff.reset()
            limit = self.options.max_retries
            if permanent or (limit is not None and failures > limit):
                self._set_state(FAILED, error)
                return
            delay = self._backoff.next_delay()
            self._set_state(RECONNECTING, error)
            log.debug("stream %s: retry in %.2fs", self.stream, delay)
            self._stop.wait(delay)
        self._set_state(STOPPED)

    @property
    def decoding(self) -> str:
        """What the decoder skips now: `skipping`, or keyframes only (`nonkey`) while shedding."""
        return "nonkey" if self.shed else self.skipping

    def skip_mode(self, fps: float | None) -> str:
        """What the decoder may skip for a camera of `fps` (see `SourceSettings.skip_frames`)."""
        mode = self.options.skip_frames
        if mode != "auto":
            return mode
        wanted = self.wanted_fps
        return "nonref" if wanted and fps and wanted * 3 <= fps else "none"

    def _open(self) -> Any:
        """The container; with `hwaccel`, falls back to software decoding when the device cannot
        be opened (FFmpeg refuses a missing device instead of falling back by itself)."""
        if not self.options.hwaccel or self.hw_error is not None:
            return open_container(self._url, self.options, hardware=False)
        try:
            return open_container(self._url, self.options)
        except SourceOpenError as exc:
            self.hw_error = str(exc)
            log.warning("stream %s: hardware decoding (%s) unavailable: %s; decoding in software", self.stream,
                        self.options.hwaccel, exc)
            return open_container(self._url, self.options, hardware=False)

    def _decode_once(self, pts_offset: float, index: int) -> Iterator[Frame]:
        container = self._open()
        try:
            vstream, ctx = self._decoder(container)
            recorder = self.recorder
            if recorder is not None:
                recorder.opened(vstream)
            applied = self.decoding
            pace_start: float | None = None
            first_pts: float | None = None
            last_frame = self.clock.mono()
            resume_at_key = False  # after shedding, feed the decoder again from a keyframe on
            for packet in container.demux(vstream):
                if self._stop.is_set():
                    return
                if recorder is not None:
                    recorder.packet(packet, self.clock.wall())
                if self.decoding != applied:  # shedding began or ended: the decoder reads it per frame
                    applied = self.decoding
                    ctx.skip_frame = applied.upper()
                if self.shed:
                    # keyframes only, and only those a slot will take: a 1080p keyframe costs ~40 ms
                    # here, so 32 cameras' keyframes alone would fill two cores. Skipped packets never
                    # reach the decoder (no reference is missing: the next one fed is a keyframe)
                    resume_at_key = True
                    if not packet.is_keyframe or (self.demand is not None and not self.demand()):
                        self.shed_packets += 1
                        if packet.is_keyframe:
                            last_frame = self.clock.mono()  # a picture came; not a stall
                        continue
                elif resume_at_key:
                    if not packet.is_keyframe:
                        self.shed_packets += 1
                        continue
                    resume_at_key = False
                now = self.clock.mono()
                if now - last_frame > self.options.stall_timeout:
                    raise StreamStalled(f"no frame for {now - last_frame:.1f}s")
                t0 = time.perf_counter()
                try:
                    frames = self._decode_packet(packet, ctx, vstream)
                except av.error.InvalidDataError:
                    self.decode_errors += 1  # one corrupt packet is not a reason to reconnect
                    continue
                for vf in frames:
                    decode_ms = (time.perf_counter() - t0) * 1000
                    if vf.is_corrupt:
                        self.corrupt_frames += 1
                    pts = float(vf.time) if vf.time is not None else None
                    if pts is not None and first_pts is None:
                        first_pts = pts
                    if self.realtime and pts is not None and first_pts is not None:
                        pace_start = self._pace(pace_start, pts - first_pts)
                        if self._stop.is_set():
                            return
                    wall, mono = self.clock.stamp()  # one moment: a latency on either clock agrees
                    last_frame = mono
                    if self._state.state != STREAMING:
                        self._set_state(STREAMING)
                    rel = (pts - first_pts) if (pts is not None and first_pts is not None) else None
                    if self.local:  # noqa: SIM108 - the comment below says why each branch
                        # files restart at 0 on every loop: keep one continuous clock
                        stream_pts = pts_offset + rel if rel is not None else None
                    else:
                        stream_pts = pts
                    # the picture stays as decoded: converted only if a slot takes it (see streams.frame)
                    yield Frame(self.stream, index, VideoPicture(vf), wall, stream_pts, decode_ms, mono)
                    index += 1
                    t0 = time.perf_counter()
        finally:
            container.close()

    def _decode_packet(self, packet: Any, ctx: Any, vstream: Any) -> list[Any]:
        """The packet's frames, its decoder's CPU time counted in `decode_cpu_s` (whatever it raises)."""
        cpu0 = time.thread_time()
        try:
            frames = list(packet.decode())
            if self.shed:
                # a lone keyframe: a frame-threaded decoder gives its picture only after more
                # packets (seconds away while shedding), so drain it now and reset for the next
                drained = ctx.decode(None)
                for vf in drained:  # the codec context's frames carry no time base of their own
                    vf.time_base = vf.time_base or vstream.time_base
                frames += drained
                ctx.flush_buffers()
            return frames
        finally:
            self.decode_cpu_s += time.thread_time() - cpu0

    def _packets_once(self) -> Iterator[Frame]:
        container = self._open()
        try:
            vstream, _ = self._decoder(container)
            if self.recorder is not None:
                self.recorder.opened(vstream)
            yield from self._read_packets(container, vstream)
        finally:
            container.close()

    def _read_packets(self, container: Any, vstream: Any) -> Iterator[Frame]:
        """Packets to the recorder, nothing decoded (yields no frame; a stall is no packet for
        `stall_timeout`)."""
        last = self.clock.mono()
        pace_start: float | None = None
        first_pts: float | None = None
        for packet in container.demux(vstream):
            if self._stop.is_set():
                return
            if self.realtime and packet.pts is not None and packet.time_base is not None:  # a file, as live
                pts = float(packet.pts * packet.time_base)
                first_pts = pts if first_pts is None else first_pts
                pace_start = self._pace(pace_start, max(0.0, pts - first_pts))
            now = self.clock.mono()
            if packet.size == 0:
                if now - last > self.options.stall_timeout:
                    raise StreamStalled(f"no packet for {now - last:.1f}s")
                continue
            last = now
            self.packets += 1
            if packet.is_keyframe:  # the picture a snapshot of this stream decodes
                self.keyframe = Keyframe.of(vstream, packet, self.clock.wall())
            if self.recorder is not None:
                self.recorder.packet(packet, self.clock.wall())
            if self._state.state != STREAMING:
                self._set_state(STREAMING)
        yield from ()

    def _decoder(self, container: Any) -> tuple[Any, Any]:
        """The video stream and its codec context, set up: threads, the frames it skips (from the
        stream's rate and `max_fps`), hardware decoding as opened."""
        vstream = first_video_stream(container, self._url)
        ctx = vstream.codec_context
        self.size = (int(ctx.width), int(ctx.height)) if ctx.width and ctx.height else None
        ctx.thread_type = "AUTO"
        if self.decode_threads:
            ctx.thread_count = self.decode_threads
        rate = vstream.average_rate or vstream.guessed_rate
        self.fps = float(rate) if rate else None
        self.skipping = self.skip_mode(self.fps)
        ctx.skip_frame = self.decoding.upper()
        self.hw_decoding = bool(getattr(ctx, "is_hwaccel", False))
        return vstream, ctx

    def _pace(self, start: float | None, rel_pts: float) -> float:
        """Sleep until the frame's presentation time; returns the (possibly reset) start."""
        now = self.clock.mono()
        if start is None:
            return now - rel_pts
        target = start + rel_pts
        delay = target - now
        if delay > 0:
            self._stop.wait(delay)
            return start
        if delay < -1.0:  # far behind (machine overloaded): re-anchor instead of bursting
            return now - rel_pts
        return start


@dataclass(frozen=True, slots=True)
class ProbeResult:
    url: str
    codec: str
    width: int
    height: int
    fps: float | None
    pix_fmt: str | None
    open_ms: float
    first_frame_ms: float

    def describe(self) -> str:
        fps = f"{self.fps:.2f} fps" if self.fps else "unknown fps"
        return (f"{self.url}: {self.codec} {self.width}x{self.height} {fps} ({self.pix_fmt or '?'}); "
                f"opened in {self.open_ms:.0f} ms, first frame after {self.first_frame_ms:.0f} ms")


def probe(url: str, options: SourceSettings | None = None) -> ProbeResult:
    """Open a URL, decode one frame and report what it is; raises StreamError subclasses."""
    opts = options or SourceSettings()
    t0 = time.perf_counter()
    container = open_container(url, opts)
    try:
        t_open = time.perf_counter()
        vstream = first_video_stream(container, url)
        for packet in container.demux(vstream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                continue
            if frames:
                vf = frames[0]
                rate = vstream.average_rate or vstream.guessed_rate
                return ProbeResult(
                    redact_url(url), vstream.codec_context.name, vf.width, vf.height,
                    float(rate) if rate else None, vf.format.name if vf.format else None,
                    (t_open - t0) * 1000, (time.perf_counter() - t0) * 1000,
                )
            if time.perf_counter() - t0 > opts.open_timeout + opts.stall_timeout:
                break
        raise NotVideoError(f"{redact_url(url)}: no decodable video frame")
    except av.error.FFmpegError as exc:
        raise SourceOpenError(f"cannot read {redact_url(url)}: {_describe(exc)}") from exc
    finally:
        container.close()


def grab_keyframe(url: str, options: SourceSettings, wall: Callable[[], float] = time.time) -> Keyframe:
    """Open `url`, read up to its first keyframe (at most `stall_timeout` after opening) and close it.
    Raises StreamError subclasses, their messages redacted."""
    container = open_container(url, options, hardware=False)
    try:
        vstream = first_video_stream(container, url)
        deadline = time.monotonic() + options.stall_timeout
        for packet in container.demux(vstream):
            if packet.size and packet.is_keyframe:
                return Keyframe.of(vstream, packet, wall())
            if time.monotonic() > deadline:
                break
        raise StreamStalled(f"{redact_url(url)}: no keyframe within {options.stall_timeout:.0f} s")
    except av.error.FFmpegError as exc:
        raise SourceOpenError(f"cannot read {redact_url(url)}: {_describe(exc)}") from exc
    finally:
        container.close()
