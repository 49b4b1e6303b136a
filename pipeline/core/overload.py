"""Is this process overloaded, and by what: read from the figures of each stats interval.

Two ways a machine falls behind its cameras, each with its own sign:

- **decode-bound**: live streams decode fewer frames than their camera sends (below
  `BEHIND_SHARE` of its announced rate, where every frame is decoded) and decoding every frame
  would take nearly all the cores (`DECODE_CORES_SHARE`, from the decoders' own CPU time, which
  waiting for a core does not inflate). More slots do not help; fewer or smaller streams,
  `skip_frames`, or hardware decoding do.
- **inference-bound**: frames wait so long for a slot that they are dropped as too old
  (`max_frame_age`), or a model's slots are busy nearly all the time. Lower `max_fps`, a smaller
  model or `imgsz`, or more devices help.

Dropping frames is how framegrid stays real time under overload (the newest frame wins, old
ones are counted as `too_old` or `stale`); this says so plainly, with the reason and the figures,
in the stats payload, the console status, the log (on each change) and /metrics.

Decode overload is also acted on (`pipeline.shed_decode`, on by default): decoding every frame of
every camera and then dropping nearly all of them starves the model too, so `DecodeShedder` makes
live streams (with `skip_frames = "auto"`) decode keyframes only while the process is
decode-bound, and tries full decoding again after `hold` seconds, doubling the hold each time the
overload comes back. The verdict says so while it lasts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.payloads import ExecutorFigures, LoadVerdict, StreamFigures

if TYPE_CHECKING:
    from streams import Clock

    from .ingest import Ingest

log = logging.getLogger(__name__)

BEHIND_SHARE = 0.85  # a live stream decoding below this share of its camera's rate is behind
# ... and decoding every frame of every camera would take at least this share of the cores: decode-bound.
# Keyframes only (what shedding decodes) gives a camera one frame a GOP (0.5 fps at 2 s); below this
# share, the cores full decoding leaves the model serve more than that (32 720p cameras at 25 fps take
# 1.3 of 2 cores here, and the other 0.7 run YOLO11n at 320 at ~100 frames/s where shedding gave 14).
# Wall time in decode calls is no measure of it: under contention it counts waiting for a core (1.7
# "cores" of wall time for 1.3 of CPU), and a 0.6 share of that shed 32 such cameras to keyframes.
DECODE_CORES_SHARE = 0.9
BUSY_SHARE = 0.9  # a model's slots busy this share of the time: inference-bound


@dataclass(frozen=True)
class Camera:
    """What a stream's source knows of its camera."""

    fps: float | None  # announced rate
    skipping: str  # "none" when every frame is decoded
    live: bool  # a network stream (a file is paced by framegrid itself)
    decode_cpu_s: float = 0.0  # CPU seconds its decoder spent decoding so far (`streams.Source.decode_cpu_s`)


@dataclass(frozen=True)
class Verdict:
    status: Literal["ok", "overloaded"]
    reasons: tuple[str, ...] = ()  # decode-bound, inference-bound
    detail: str = ""

    def payload(self) -> LoadVerdict:
        return {"status": self.status, "reasons": list(self.reasons), "detail": self.detail or None}

    def shedding(self, streams: int) -> Verdict:
        """This verdict while `streams` live streams decode keyframes only: still overloaded, decode-bound."""
        note = f"{streams} live stream(s) decode keyframes only (shedding decode load)"
        reasons = self.reasons if "decode-bound" in self.reasons else ("decode-bound", *self.reasons)
        return Verdict("overloaded", reasons, "; ".join(d for d in (note, self.detail) if d))


class DecodeShedder:
    """Whether live streams should decode keyframes only: from decode-bound until `hold` seconds have
    passed and the last verdict is no longer decode-bound; a relapse within twice the hold doubles it
    (at most `max_hold`), so the process does not flap between the two."""

    def __init__(self, hold: float = 60.0, max_hold: float = 900.0) -> None:
        self.hold = hold
        self.max_hold = max_hold
        self.active = False
        self.since = 0.0
        self._ended: float | None = None

    def update(self, now: float, verdict: Verdict) -> bool | None:
        """-> True to start shedding, False to stop, None for no change."""
        decode_bound = "decode-bound" in verdict.reasons
        if not self.active and decode_bound:
            if self._ended is not None and now - self._ended < 2 * self.hold:
                self.hold = min(self.max_hold, 2 * self.hold)
            self.active, self.since = True, now
            return True
        if self.active and not decode_bound and now - self.since >= self.hold:
            self.active, self._ended = False, now
            return False
        return None


class DecodePacer:
    """While shedding: which live camera may decode its next keyframe, so that what is decoded
    follows what the slots can serve, shared alike by the cameras.

    A 1080p keyframe costs ~40-90 ms of CPU: 32 cameras' keyframes alone (32/s) would fill two
    cores and starve the model. Two rules, both checked when a camera's keyframe arrives (from its
    decoder thread, and only when its previous frame was taken):

    - **Rounds.** A camera may decode only when it has had no more turns than any other active
      camera in this shedding period: each camera gets one per round, so the cameras' counts never
      differ by more than one, whatever the rate. A turn whose frame aged out before a slot took
      it (`too_old`) is given back. A camera is active while its keyframes keep
      asking (within `ACTIVE_S`); one that stalls stops holding the round back, and one that joins
      or comes back starts one turn behind the least served, not with a debt the others must wait out.
    - **Rate.** All cameras together decode at most `cameras / interval` keyframes per second, from
      a token bucket holding `BURST_S` seconds' worth (cameras whose keyframes come together, as
      from one recorder or started at once, would otherwise be turned away at each burst but one).
      The interval adapts every check: longer by half when frames aged out waiting for a slot
      (`too_old`: decoding more than is served, or starving the model of CPU), shorter by a fifth
      when none did. It starts at `start_per_core` keyframes per second per core over all cameras.
    """

    MAX_INTERVAL = 30.0
    ACTIVE_S = 5.0  # a camera whose keyframes stopped asking this long no longer holds a round back
    BURST_S = 2.0  # seconds of the rate that may be decoded back to back (a keyframe period or two)

    def __init__(self, start_per_core: float = 4.0) -> None:
        self.start_per_core = start_per_core
        self.interval = 0.0
        self._granted: dict[str, int] = {}  # keyframes each camera decoded in this shedding period
        self._asked: dict[str, float] = {}  # when each camera last asked
        self._aged_base: dict[str, int] = {}  # each camera's too_old count when it first asked
        self._lost: dict[str, int] = {}  # frames it aged out since (at its last ask)
        self._tokens = 1.0
        self._at: float | None = None  # when the tokens were last counted
        self._too_old: int | None = None
        self._lock = threading.Lock()  # decoder threads ask, the event loop adapts

    def start(self, cameras: int, cores: int, too_old: int) -> None:
        with self._lock:
            self.interval = min(self.MAX_INTERVAL, cameras / (self.start_per_core * max(1, cores)))
            self._granted.clear()
            self._asked.clear()
            self._aged_base.clear()
            self._lost.clear()
            self._tokens, self._at = self._bucket(cameras), None
            self._too_old = too_old

    def update(self, too_old: int) -> None:
        """From the shedding cameras' `too_old` drops (summed) since the last check."""
        with self._lock:
            aged = self._too_old is not None and too_old > self._too_old
            self._too_old = too_old
            if aged:
                self.interval = min(self.MAX_INTERVAL, max(self.interval, 0.25) * 1.5)
            else:
                self.interval *= 0.8

    def turns(self, now: float) -> str:
        """For the log: how many keyframes the active cameras decoded in this period (fewest-most)."""
        with self._lock:
            counts = [self._turns(c) for c, t in self._asked.items() if now - t <= self.ACTIVE_S]
        return f"{min(counts)}-{max(counts)} keyframes each of {len(counts)} active" if counts else "none active"

    def may_decode(self, camera: str, now: float, aged: int = 0) -> bool:
        """Whether `camera` may decode the keyframe that just came; `aged` is its `too_old` count
        (a frame that aged out waiting for a slot was not served: its turn is given back)."""
        with self._lock:
            base = self._aged_base.get(camera)
            if base is None or aged < base:  # first ask in this period, or a new stream of that name
                base = self._aged_base[camera] = aged
            self._lost[camera] = aged - base
            active = {c: self._turns(c) for c, t in self._asked.items() if now - t <= self.ACTIVE_S and c != camera}
            last = self._asked.get(camera)
            self._asked[camera] = now
            mine = self._turns(camera)
            if active and (last is None or now - last > self.ACTIVE_S):
                # joins (or comes back) one turn behind the least served: its turn comes next
                mine = max(mine, min(active.values()) - 1)
                self._granted[camera] = mine + self._lost[camera]
            if active and mine > min(active.values()):
                return False  # had its turn this round
            if self._at is not None:
                rate = (len(active) + 1) / max(self.interval, 1e-3)
                self._tokens = min(self._bucket(len(active) + 1), self._tokens + (now - self._at) * rate)
            self._at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            self._granted[camera] = self._granted.get(camera, 0) + 1
            return True

    def _bucket(self, cameras: int) -> float:
        """The most tokens held: `BURST_S` seconds of `cameras` keyframes per interval (at least one)."""
        return max(1.0, cameras / max(self.interval, 1e-3) * self.BURST_S)

    def _turns(self, camera: str) -> int:
        """Keyframes `camera` decoded in this period and did not lose to age."""
        return self._granted.get(camera, 0) - self._lost.get(camera, 0)


class OverloadMonitor:
    """Judges each stats interval from its rates and the growth of the `too_old` counters."""

    def __init__(self) -> None:
        self._too_old: dict[str, int] = {}
        self._frames: dict[str, int] = {}  # frames each slot served, at the previous interval
        # each decoder's CPU seconds and what it skipped, at the previous interval
        self._decode_cpu: dict[str, tuple[float, str]] = {}
        self._at: float | None = None
        self.verdict = Verdict("ok")

    def assess(self, now: float, streams: Mapping[str, StreamFigures], cameras: dict[str, Camera],
               executors: Mapping[str, ExecutorFigures], cores: int) -> Verdict:
        dt = now - self._at if self._at is not None else None
        if dt is not None and dt < 1.0:  # several readers ask; a rate over a sliver of time is noise
            return self.verdict
        too_old = {n: int(s["drops"].get("too_old", 0)) for n, s in streams.items()}
        old_rate = (sum(max(0, v - self._too_old.get(n, v)) for n, v in too_old.items()) / dt) if dt else 0.0
        frames = {slot: int(e.get("frames", 0)) for slot, e in executors.items()}
        slot_fps = {slot: max(0, f - self._frames.get(slot, f)) / dt for slot, f in frames.items()} if dt else {}
        decode_cpu = {n: (c.decode_cpu_s, c.skipping) for n, c in cameras.items()}
        used, needed = self._decode_cores(streams, cameras, dt)
        self._too_old, self._frames, self._decode_cpu, self._at = too_old, frames, decode_cpu, now

        behind = []
        for name, s in streams.items():
            cam = cameras.get(name)
            if (cam is not None and cam.live and cam.fps and cam.skipping == "none" and s.get("state") == "streaming"
                    and s["fps_in"] < BEHIND_SHARE * cam.fps):
                behind.append(name)
        busy = _busiest_model(executors, slot_fps)

        reasons, details = [], []
        if behind and needed >= DECODE_CORES_SHARE * max(1, cores):
            reasons.append("decode-bound")
            details.append(f"{len(behind)} of {len(streams)} stream(s) decode below {BEHIND_SHARE:.0%} of their "
                           f"camera's rate; decoding every frame would take {needed:.1f} of {cores} core(s) "
                           f"(decoders use {used:.1f})")
        if old_rate > 0 or (busy is not None and busy[1] >= BUSY_SHARE):
            reasons.append("inference-bound")
            parts = []
            if old_rate > 0:
                parts.append(f"{old_rate:.1f} frames/s dropped too old")
            if busy is not None:
                parts.append(f"slots of {busy[0]} busy {busy[1]:.0%}")
            details.append("; ".join(parts))
        self.verdict = Verdict("overloaded" if reasons else "ok", tuple(reasons), "; ".join(details))
        return self.verdict

    def _decode_cores(self, streams: Mapping[str, StreamFigures], cameras: dict[str, Camera],
                      dt: float | None) -> tuple[float, float]:
        """(cores the decoders used over the interval, cores decoding every frame would take): a stream
        meant to decode every frame of a live camera but decoding fewer needs its CPU per frame times
        the camera's rate; one that skips on purpose, sheds, or did either during the interval (its
        CPU per frame is then that of other frames: keyframes cost several P-frames) needs what it uses."""
        used = needed = 0.0
        for name, cam in cameras.items():
            cpu, skipped = self._decode_cpu.get(name, (None, ""))
            if not dt or cpu is None or cam.decode_cpu_s < cpu:  # new, or a new source of that name
                continue
            cores = (cam.decode_cpu_s - cpu) / dt
            used += cores
            fps_in = streams[name]["fps_in"] if name in streams else 0.0
            if cam.live and cam.fps and cam.skipping == skipped == "none" and 0 < fps_in < cam.fps:
                cores *= cam.fps / fps_in
            needed += cores
        return used, needed


def _busiest_model(executors: Mapping[str, ExecutorFigures], slot_fps: dict[str, float]) -> tuple[str, float] | None:
    """(model, mean share of time its slots spend in model calls) of the busiest model, from each slot's
    frames per second served and measured time per frame."""
    by_model: dict[str, list[float]] = {}
    for slot, e in executors.items():
        fps, ms = slot_fps.get(slot), e.get("service_ms_per_frame")
        if fps is None or ms is None:
            continue
        by_model.setdefault(slot.rsplit(".", 1)[0], []).append(min(1.0, fps * ms / 1000))
    if not by_model:
        return None
    model, shares = max(by_model.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    return model, sum(shares) / len(shares)


class LoadWatch:
    """Judges the load every `every` seconds (`judge` builds the stats payload, which carries the
    verdict) and, while the process is decode-bound, lets live streams decode keyframes only, in
    paced turns (`pipeline.shed_decode`)."""

    def __init__(self, shedder: DecodeShedder, ingest: Ingest, clock: Clock, judge: Callable[[], Verdict],
                 cores: Callable[[], int], every: float) -> None:
        self.shedder = shedder
        self.ingest = ingest
        self.clock = clock
        self.judge = judge
        self.cores = cores
        self.every = every

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            verdict = self.judge()
            now = self.clock.mono()
            change = self.shedder.update(now, verdict)
            live = [r for r in self.ingest.records.values() if r.source is not None and not r.source.local
                    and r.source.options.skip_frames == "auto"]
            aged = sum(r.stats.drops["too_old"] for r in live)
            pacer = self.ingest.pacer
            if change is None:
                if self.shedder.active:
                    pacer.update(aged)
                    log.debug("decode pacing: a keyframe per camera every %.2f s (%d aged out so far; %s)",
                              pacer.interval, aged, pacer.turns(now))
                continue
            if change:
                pacer.start(len(live), self.cores(), aged)
            for r in live:
                r.source.shed = change  # type: ignore[union-attr]
            if change:
                log.warning("decode-bound: %d live stream(s) decode keyframes only for at least %.0f s",
                            len(live), self.shedder.hold)
            else:
                log.info("decoding every frame again (%d live stream(s))", len(live))

