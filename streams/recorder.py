"""Event clips by packet copy: a short ring of a camera's demuxed packets, remuxed into MP4 per clip.

Nothing is decoded or encoded: the decode thread hands each demuxed video packet (a copy of its
bytes, its timestamps and when it arrived) to `StreamRecorder.packet`, which keeps the packets from
the last keyframe at or before `pre_s` ago (so memory per stream is `pre_s` plus one GOP of the
camera's bitrate). A clip begins at the newest keyframe at or before its start minus `pre_s` and
runs until its end plus `post_s`; a writer thread per stream remuxes the packets with PyAV into
`<name>.mp4.part` and renames it when done. Timestamps keep their stream's time base; across a
reconnect (or a file's loop) they are shifted so a clip's timeline stays continuous.

The codec parameters come from the connection's video stream: they are copied into a template
stream of an in-memory container at connect time, so a clip written after a reconnect still gets
the parameters of the packets it holds (a camera may change resolution between connections: a
clip never mixes two connections' parameters, it is cut at the change).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from .disk import disk_state

log = logging.getLogger(__name__)

MAX_RING_BYTES = 256 << 20  # a stalled writer cannot hold more than this per stream (then clips are cut)
# kept beyond pre_s: an event is told some time after its start (the tracker confirms a track after a few
# frames, at 5 fps that is most of a second), and its clip still gets its whole pre-roll
RING_MARGIN_S = 3.0
WRITE_EVERY_S = 0.5  # the writer's turn at the latest: packets are written in batches, woken per keyframe
ABANDON_S = 10.0  # a clip whose stream gave no packets this long after its end is closed with what it has


@dataclass(slots=True)
class Packet:
    """One demuxed video packet, copied out of the demuxer."""

    seq: int
    wall: float  # unix s when it arrived
    data: bytes
    pts: int | None
    dts: int | None
    duration: int
    key: bool
    time_base: Fraction
    conn: int  # the connection it came from (its template)


@dataclass
class ClipResult:
    """A finished clip, as the event store keeps it."""

    key: str
    path: Path | None  # None: not written (error says why)
    size: int
    start: float  # wall time of its first packet
    end: float  # wall time of its last packet
    error: str | None = None


@dataclass
class _Clip:
    key: str
    path: Path
    start: float  # the event's start (wall)
    end: float | None = None  # the event's end, once known
    next_seq: int = -1  # the first packet not yet written (-1: not placed in the ring yet)
    out: Any = None
    stream: Any = None
    conn: int = -1
    shift: int = 0  # added to the packets' timestamps of the current connection
    last_dts: int | None = None
    first_wall: float = 0.0
    last_wall: float = 0.0
    written: int = 0
    error: str | None = None
    last_duration: int = 0  # of the last packet written (the next connection's timeline continues after it)
    segment: bool = False  # a piece of continuous recording: ends at the first keyframe after segment_s
    rotate_at: int = -1  # (a segment) the keyframe the next segment starts at


class StreamRecorder:
    """The packet ring of one stream and its clips being written. `packet` and `opened` run on the
    decode thread, `begin`/`finish` on any thread; a writer thread of its own does the file I/O."""

    def __init__(self, stream: str, folder: Path, pre_s: float, post_s: float, max_clip_s: float,
                 on_done: Callable[[ClipResult], None], wall: Callable[[], float],
                 segment_s: float | None = None) -> None:
        """`segment_s`: also record continuously, in segments of about that long (each from a keyframe)."""
        self.stream = stream
        self.folder = folder
        self.pre_s = pre_s
        self.post_s = post_s
        self.max_clip_s = max_clip_s
        self.on_done = on_done
        self.wall = wall
        self.segment_s = segment_s
        self._ring: deque[Packet] = deque()
        self._keys: deque[tuple[int, float]] = deque()  # (seq, wall) of the keyframes from the ring's horizon on
        self._ring_bytes = 0
        self._seq = 0
        self._conn = -1
        self._templates: dict[int, tuple[Any, Any]] = {}  # connection -> (in-memory container, stream)
        self._clips: dict[str, _Clip] = {}
        self._lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"stream[{stream}].record", daemon=True)
        self._thread.start()
        # figures (stats)
        self.clips_written = 0
        self.clips_failed = 0
        self.bytes_written = 0
        self.cut_packets = 0  # packets a stalled writer lost (clips cut short)
        self.last_error: str | None = None
        self.disk_full = False
        self.disk = disk_state("clips")  # every stream's clips: one disk

    # -- the decode thread ------------------------------------------------------------------------
    def opened(self, vstream: Any) -> None:
        """A new connection: its video stream's codec parameters become the template of its packets."""
        holder = av.open(io.BytesIO(), "w", format="mp4")
        template = holder.add_stream_from_template(vstream)
        with self._lock:
            self._conn += 1
            self._templates[self._conn] = (holder, template)
            used = {p.conn for p in self._ring} | {c.conn for c in self._clips.values()} | {self._conn}
            for conn in [c for c in self._templates if c not in used]:
                self._templates.pop(conn)
            if self.segment_s and not any(c.segment for c in self._clips.values()):
                self._new_segment(-1)  # continuous recording starts with the first keyframe

    def packet(self, pkt: Any, wall: float) -> None:
        if pkt.size == 0 or self._conn < 0:
            return
        entry = Packet(self._seq, wall, bytes(pkt), pkt.pts, pkt.dts, pkt.duration or 0, bool(pkt.is_keyframe),
                       pkt.time_base, self._conn)
        with self._lock:
            self._seq += 1
            self._ring.append(entry)
            self._ring_bytes += len(entry.data)
            if entry.key:
                self._keys.append((entry.seq, wall))
            self._trim(wall)
            if entry.key and self._clips:  # not per packet: the writer takes a GOP (or WRITE_EVERY_S) in one go
                self._lock.notify()

    def _trim(self, now: float) -> None:
        """Drop what no clip needs: before the newest keyframe at or before `pre_s` (plus a margin) ago,
        and nothing a clip has yet to write unless the ring is over its byte bound."""
        ring, keys = self._ring, self._keys
        while len(keys) > 1 and keys[1][1] <= now - self.pre_s - RING_MARGIN_S:
            keys.popleft()  # keys[0]: the newest keyframe at or before the ring's horizon (if any)
        keep_from = keys[0][0] if keys and keys[0][1] <= now - self.pre_s - RING_MARGIN_S else None
        needed = min((c.next_seq for c in self._clips.values() if c.next_seq >= 0), default=None)
        while ring and keep_from is not None and ring[0].seq < keep_from and (needed is None or ring[0].seq < needed):
            self._ring_bytes -= len(ring.popleft().data)
        while ring and self._ring_bytes > MAX_RING_BYTES:
            dropped = ring.popleft()
            self._ring_bytes -= len(dropped.data)
            self.cut_packets += 1

    # -- clips ------------------------------------------------------------------------------------
    def begin(self, key: str, start: float, path: Path) -> None:
        """Start a clip of an event that started at `start` (wall)."""
        with self._lock:
            if key not in self._clips:
                self._clips[key] = _Clip(key, path, start)
                self._lock.notify()

    def finish(self, key: str, end: float) -> None:
        """The event ended at `end` (wall): the clip runs to `end + post_s`."""
        with self._lock:
            clip = self._clips.get(key)
            if clip is not None and clip.end is None:
                clip.end = end
                self._lock.notify()

    @property
    def writing(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """End every clip at the newest packet and stop the writer (waits up to `timeout`)."""
        with self._lock:
            for clip in self._clips.values():
                clip.end = min(clip.end if clip.end is not None else float("inf"), self.wall() - self.post_s)
            self._stop = True
            self._lock.notify()
        if timeout > 0:
            self._thread.join(timeout)

    def _place(self, clip: _Clip) -> None:
        """Where a new clip starts: the newest keyframe at or before its start minus `pre_s` (or the
        ring's oldest keyframe)."""
        first_key = None
        for p in self._ring:
            if not p.key:
                continue
            if first_key is None:
                first_key = p.seq
            if p.wall <= clip.start - self.pre_s:
                first_key = p.seq
            else:
                break
        if first_key is not None:
            clip.next_seq = first_key

    # -- the writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait(WRITE_EVERY_S)
                stop = self._stop
                work = []
                if self.segment_s and not stop and not any(c.segment for c in self._clips.values()):
                    self._new_segment(-1)
                ring = list(self._ring) if self._clips else []  # seqs are consecutive: a clip's share is a slice
                for clip in list(self._clips.values()):
                    if clip.next_seq < 0:
                        self._place(clip)
                    if clip.next_seq >= 0:
                        work.append((clip, ring[max(0, clip.next_seq - ring[0].seq):] if ring else []))
                        if work[-1][1]:
                            clip.next_seq = work[-1][1][-1].seq + 1
                    elif stop:
                        work.append((clip, []))
            for clip, packets in work:
                self._write(clip, packets)
                if self._done(clip, stop):
                    with self._lock:
                        self._clips.pop(clip.key, None)
                        if clip.segment and clip.rotate_at >= 0 and not stop:
                            self._new_segment(clip.rotate_at)  # the next one starts where this one stopped
                    self._close(clip)
            if stop:
                return

    def _new_segment(self, from_seq: int) -> None:
        """Open the next continuous segment (under the lock): at `from_seq`, else the newest keyframe."""
        now = self.wall()
        name = time.strftime("%Y-%m-%d/%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}.mp4"
        clip = _Clip(f"segment:{now:.3f}", self.folder / "continuous" / name, now, segment=True)
        if from_seq >= 0:
            clip.next_seq = from_seq
        else:
            keys = [p.seq for p in self._ring if p.key]
            if keys:
                clip.next_seq = keys[-1]
            else:
                clip.start = float("inf")  # placed on the first keyframe (see `_place`)
        self._clips[clip.key] = clip

    def _done(self, clip: _Clip, stopping: bool) -> bool:
        if clip.error is not None or stopping:
            return True
        if clip.segment:
            return clip.rotate_at >= 0
        if clip.end is not None and self.wall() > clip.end + self.post_s + ABANDON_S:
            return True  # the stream stopped giving packets
        if clip.written and clip.last_wall - clip.first_wall >= self.max_clip_s:
            return True
        return clip.end is not None and clip.written > 0 and clip.last_wall >= clip.end + self.post_s

    def _write(self, clip: _Clip, packets: list[Packet]) -> None:
        for p in packets:
            if clip.error is not None or (clip.end is not None and clip.written and
                                          p.wall > clip.end + self.post_s):
                return
            if (clip.segment and self.segment_s and p.key and clip.written
                    and p.wall - clip.first_wall >= self.segment_s):
                clip.rotate_at = p.seq
                return
            try:
                self._mux(clip, p)
            except (OSError, av.error.FFmpegError) as exc:
                clip.error = str(exc)
                if self.disk.failed(exc, str(clip.path)):
                    self.disk_full = True
                return

    def _mux(self, clip: _Clip, p: Packet) -> None:
        if clip.out is not None and p.conn != clip.conn:
            holder_tmpl = self._templates.get(p.conn)
            if holder_tmpl is None or not _same_codec(holder_tmpl[1], clip.stream):
                clip.end = clip.last_wall - self.post_s  # parameters changed: the clip ends here
                return
        if clip.out is None:
            if not p.key:
                return  # a clip starts on a keyframe
            template = self._templates.get(p.conn)
            if template is None:
                return
            clip.path.parent.mkdir(parents=True, exist_ok=True)
            clip.out = av.open(str(clip.path) + ".part", "w", format="mp4", options={"movflags": "+faststart"})
            clip.stream = clip.out.add_stream_from_template(template[1])
            clip.first_wall = p.wall
        if p.conn != clip.conn:  # continue the timeline after the last packet written
            start = 0 if clip.last_dts is None else clip.last_dts + max(1, clip.last_duration)
            clip.shift = start - (p.dts if p.dts is not None else p.pts or 0)
            clip.conn = p.conn
        out = av.Packet(p.data)
        out.pts = None if p.pts is None else p.pts + clip.shift
        out.dts = None if p.dts is None else p.dts + clip.shift
        if out.dts is not None and clip.last_dts is not None and out.dts <= clip.last_dts:
            return  # a camera's timestamp went back within one connection: skip rather than break the file
        out.duration = p.duration
        out.time_base = p.time_base
        out.is_keyframe = p.key
        out.stream = clip.stream
        clip.out.mux(out)
        clip.last_dts = out.dts
        clip.last_duration = p.duration
        clip.last_wall = p.wall
        clip.written += 1

    def _close(self, clip: _Clip) -> None:
        part = Path(str(clip.path) + ".part")
        if clip.out is not None:
            try:
                clip.out.close()
            except (OSError, av.error.FFmpegError) as exc:
                clip.error = clip.error or str(exc)
                self.disk_full = self.disk.failed(exc, str(part)) or self.disk_full
        if clip.error is None and clip.written:
            try:
                part.replace(clip.path)
                size = clip.path.stat().st_size
            except OSError as exc:
                clip.error = str(exc)
                self.disk_full = self.disk.failed(exc, str(clip.path)) or self.disk_full
            else:
                self.clips_written += 1
                self.bytes_written += size
                self.disk_full = False
                self.disk.wrote()
                self._report(ClipResult(clip.key, clip.path, size, clip.first_wall, clip.last_wall))
                return
        part.unlink(missing_ok=True)
        error = clip.error or "no packets (the stream gave none while the event lasted)"
        self.clips_failed += 1
        self.last_error = error
        if not self.disk.full:  # a full disk is said once (streams.disk), not per clip
            log.warning("stream %s: clip %s not kept: %s", self.stream, clip.key, error)
        self._report(ClipResult(clip.key, None, 0, clip.first_wall, clip.last_wall, error))

    def _report(self, result: ClipResult) -> None:
        try:
            self.on_done(result)
        except Exception:
            log.exception("stream %s: clip listener failed", self.stream)

    def figures(self) -> dict[str, Any]:  # (pipeline.payloads.RecorderFigures)
        with self._lock:
            ring_s = (self._ring[-1].wall - self._ring[0].wall) if self._ring else 0.0
            return {"clips_written": self.clips_written, "clips_failed": self.clips_failed,
                    "clips_open": len(self._clips), "bytes_written": self.bytes_written,
                    "ring_packets": len(self._ring), "ring_bytes": self._ring_bytes, "ring_s": round(ring_s, 2),
                    "cut_packets": self.cut_packets, "disk_full": self.disk_full, "last_error": self.last_error}


def _same_codec(a: Any, b: Any) -> bool:
    ca, cb = a.codec_context, b.codec_context
    return bool(ca.name == cb.name and ca.width == cb.width and ca.height == cb.height)
