"""Events: tracked objects turned into new / update / end messages, zone counts and line crossings.

`EventEngine` is a `ResultSink`. For each stream it keeps one `TrackedObject` per announced track
id and, from each result, decides what changed:

    new      once the track has lasted `events.min_seen_s` (a shorter one, a flicker or a duplicate
             box, starts no event and is not counted); `first_seen` is its first sighting
    update   it entered or left a zone, crossed a line, became (or stopped being) stationary, or
             its best score improved (the last two at most every `events.update_interval` seconds)
    end      unseen for `events.end_after` seconds, or its stream reconnected or stopped

Each event is published on `<prefix>/events` with the object's state `before` and `after` (schema
version `v`), and handed to the store (SQLite, off the loop) and the snapshot keeper. Zone
counts go to `<prefix>/streams/<s>/zones/<zone>/<label>` (and `.../all`), line counts to
`<prefix>/streams/<s>/lines/<line>`, retained, whenever they change.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config import EventsConfig, LineConfig, StreamConfig, ZoneConfig
from pipeline.core.zones import anchor_of, crossing, inside, resolve, side
from pipeline.payloads import Crossing, EventPayload, ObjectState

if TYPE_CHECKING:
    from pipeline.core.results import Result
    from pipeline.mqtt.publisher import Publisher

log = logging.getLogger(__name__)

EVENT_VERSION = 1


@dataclass
class ZoneState:
    inside: bool = False
    streak: int = 0  # consecutive frames on the other side than `inside`


@dataclass
class TrackedObject:
    id: str  # event id: <stream>-<track id>-<first seen, ms>
    stream: str
    track_id: int
    label: str
    score: float
    best_score: float
    box: list[float]
    first_seen: float
    last_seen: float
    frame_size: tuple[int, int]
    zones: dict[str, ZoneState] = field(default_factory=dict)
    entered: list[str] = field(default_factory=list)  # zones ever entered, in order
    crossings: list[Crossing] = field(default_factory=list)
    stationary: bool = False
    seen_mono: float = 0.0  # monotonic time last seen: what ages it (a wall-clock step never ends it)
    last_update: float = 0.0  # monotonic time of its last timed update
    anchors: dict[str, tuple[float, float]] = field(default_factory=dict)  # last point per line's anchor
    path: deque[tuple[float, float, float]] = field(default_factory=lambda: deque(maxlen=256))  # mono t, cx, cy
    snapshot: bool = False  # a snapshot is kept for it
    attributes: dict[str, Any] = field(default_factory=dict)  # secondary models' answers (model -> label, score)
    announced: bool = True  # False while younger than `events.min_seen_s`: no event yet, not counted
    first_mono: float = 0.0  # monotonic time first seen
    held: list[str] = field(default_factory=list)  # what changed before it was announced (its `new` says it)
    scale: tuple[float, float] = (1.0, 1.0)  # detected frame -> published pixels (a camera's main stream)

    def state(self) -> ObjectState:
        return {
            "id": self.id, "track_id": self.track_id, "label": self.label,
            "score": round(self.score, 4), "best_score": round(self.best_score, 4),
            "box": [round(v * self.scale[k % 2], 1) for k, v in enumerate(self.box)],
            "zones": sorted(z for z, s in self.zones.items() if s.inside), "entered_zones": list(self.entered),
            "crossings": list(self.crossings), "first_seen": round(self.first_seen, 3),
            "last_seen": round(self.last_seen, 3), "stationary": self.stationary, "has_snapshot": self.snapshot,
            "attributes": dict(self.attributes),
        }


Listener = Callable[[EventPayload, "TrackedObject", "Result | None"], None]
Emit = Callable[[str, ObjectState | None, ObjectState | None, list[str], "TrackedObject", "Result | None"], None]


class StreamEvents:
    """One stream's objects, zones and lines."""

    def __init__(self, name: str, cfg: StreamConfig, events: EventsConfig,
                 counts: Callable[[str, str, Any], None]) -> None:
        self.name = name
        self.zones: dict[str, ZoneConfig] = dict(cfg.zones)
        self.lines: dict[str, LineConfig] = dict(cfg.lines)
        self.cfg = events
        self.counts = counts  # (kind, topic suffix, payload) -> None
        self.objects: dict[int, TrackedObject] = {}
        self.line_counts = {name: {"in": 0, "out": 0} for name in self.lines}
        self._counted: dict[tuple[str, str], int] = {}  # (kind, topic suffix) -> the count last published
        self._resolved: dict[tuple[int, int], tuple[dict[str, list[Any]], dict[str, list[Any]]]] = {}
        self.discarded = 0  # tracks gone before they lasted `min_seen_s` (no event)

    # -- geometry per frame size -------------------------------------------------------------------
    def _geometry(self, size: tuple[int, int]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        got = self._resolved.get(size)
        if got is None:
            w, h = size
            got = ({n: resolve(z.polygon, w, h) for n, z in self.zones.items()},
                   {n: resolve(ln.points, w, h) for n, ln in self.lines.items()})
            self._resolved[size] = got
        return got

    # -- each result -------------------------------------------------------------------------------
    def on_result(self, result: Result, emit: Emit) -> None:
        ids = result.track_ids
        if ids is None:
            return
        t = result.frame.captured_at  # wall: the stamps published (first/last seen, crossings)
        m = result.frame.captured_mono or t  # monotonic: every duration (unseen, stationary, update rate)
        size = (result.frame.width, result.frame.height)
        main = result.stream.main_scale(*size)
        scale = (main[2], main[3]) if main is not None else (1.0, 1.0)
        polys, segs = self._geometry(size)
        det = result.detections
        seen = set()
        for i, tid in enumerate(ids):
            tid = int(tid)
            if tid == 0:
                continue
            seen.add(tid)
            box = [float(v) for v in det.boxes[i]]
            score, label = float(det.confidences[i]), det.labels[i]
            obj = self.objects.get(tid)
            if obj is None:
                obj = TrackedObject(f"{self.name}-{tid}-{int(t * 1000)}", self.name, tid, label, score, score, box,
                                    t, t, size, seen_mono=m, first_mono=m, announced=self.cfg.min_seen_s <= 0,
                                    scale=scale)
                self.objects[tid] = obj
                reasons = self._move(obj, box, score, t, m, polys, segs)
                if obj.announced:
                    emit("new", None, obj.state(), reasons, obj, result)
                else:
                    obj.held = reasons
                continue
            before = obj.state()
            improved = score > obj.best_score + 1e-6
            obj.score, obj.box, obj.last_seen, obj.seen_mono, obj.frame_size = score, box, t, m, size
            obj.scale = scale
            if improved:
                obj.best_score = score
            reasons = self._move(obj, box, score, t, m, polys, segs)
            attrs = result.attributes[i] if result.attributes is not None else None
            if attrs and attrs != obj.attributes:  # a secondary model answered (or changed its mind)
                obj.attributes = dict(attrs)
                reasons.append("attributes")
            if not obj.announced:
                self._hold(obj, reasons, m, result, emit)
                continue
            timed = [r for r in reasons if r in ("stationary", "moving")]
            if improved and obj.best_score - before["best_score"] >= 0.01:
                timed.append("best_score")
            urgent = [r for r in reasons if r not in ("stationary", "moving")]
            due = m - obj.last_update >= self.cfg.update_interval
            if urgent or (timed and due):
                obj.last_update = m
                emit("update", before, obj.state(), urgent + timed, obj,
                     result)
            elif improved:
                emit("_best", before, obj.state(), [], obj, result)
        self._end_unseen(m, emit)
        self._publish_counts()

    def _move(self, obj: TrackedObject, box: list[float], score: float, t: float, m: float,
              polys: dict[str, list[Any]], segs: dict[str, list[Any]]) -> list[str]:
        """Update zones, lines and the stationary flag; what changed, as reasons."""
        reasons: list[str] = []
        for name, zone in self.zones.items():
            st = obj.zones.setdefault(name, ZoneState())
            eligible = (zone.objects is None or obj.label in zone.objects) and score >= zone.min_confidence
            now_in = eligible and inside(anchor_of(box, zone.anchor), polys[name])
            if now_in == st.inside:
                st.streak = 0
                continue
            st.streak += 1
            if st.streak >= zone.min_frames:
                st.inside, st.streak = now_in, 0
                if now_in:
                    reasons.append(f"entered:{name}")
                    if name not in obj.entered:
                        obj.entered.append(name)
                else:
                    reasons.append(f"left:{name}")
        for name, line in self.lines.items():
            point = anchor_of(box, line.anchor)
            prev = obj.anchors.get(name)
            a, b = segs[name]
            eligible = (line.objects is None or obj.label in line.objects) and score >= line.min_confidence
            if prev is not None and eligible:
                direction = crossing(prev, point, a, b)
                if direction is not None:
                    self.line_counts[name][direction] += 1
                    obj.crossings.append({"line": name, "direction": direction, "at": round(t, 3)})
                    reasons.append(f"crossed:{name}:{direction}")
                    self.counts("lines", name, {"v": EVENT_VERSION, **self.line_counts[name]})
            if side(point, a, b) != 0:  # a point on the line waits for the side it leaves to
                obj.anchors[name] = point
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        obj.path.append((m, cx, cy))
        limit = self.cfg.stationary_fraction * obj.frame_size[0]
        window = [(pt, x, y) for pt, x, y in obj.path if m - pt <= self.cfg.stationary_after]
        spanned = bool(obj.path) and m - obj.path[0][0] >= self.cfg.stationary_after
        still = spanned and all(math.hypot(x - cx, y - cy) <= limit for _, x, y in window)
        if still != obj.stationary:
            obj.stationary = still
            reasons.append("stationary" if still else "moving")
        return reasons

    def _hold(self, obj: TrackedObject, reasons: list[str], m: float, result: Result, emit: Emit) -> None:
        """A track younger than `min_seen_s`: its changes wait; once it has lasted that long its
        event starts (`first_seen` is still its first sighting, so a clip gets its whole pre-roll)."""
        obj.held += [r for r in reasons if r not in ("stationary", "moving")]  # `attributes` too: a classifier's
        if m - obj.first_mono >= self.cfg.min_seen_s:
            obj.announced, obj.last_update = True, m
            emit("new", None, obj.state(), list(dict.fromkeys(obj.held)), obj, result)
            obj.held = []

    def _end_unseen(self, now: float, emit: Emit) -> None:
        """`now`: monotonic seconds."""
        for tid in [k for k, o in self.objects.items() if now - o.seen_mono >= self.cfg.end_after]:
            self.end(tid, emit)

    def end(self, tid: int, emit: Emit) -> None:
        obj = self.objects.pop(tid)
        if not obj.announced:  # gone before it lasted `min_seen_s`: a flicker, never an event
            self.discarded += 1
            return
        before = obj.state()
        for st in obj.zones.values():
            st.inside = False
        after = obj.state()
        emit("end", before, after, [], obj, None)

    def end_all(self, emit: Emit) -> None:
        for tid in list(self.objects):
            self.end(tid, emit)
        self._publish_counts()

    def _publish_counts(self) -> None:
        """The retained counts that changed: objects tracked now (per label and all), per zone the same."""
        counts: dict[tuple[str, str], int] = {("objects", "all"): 0}
        for name in self.zones:
            counts[("zones", f"{name}/all")] = 0
        for obj in self.objects.values():
            if not obj.announced:
                continue
            counts[("objects", obj.label)] = counts.get(("objects", obj.label), 0) + 1
            counts[("objects", "all")] += 1
            for name, st in obj.zones.items():
                if st.inside:
                    key = ("zones", f"{name}/{obj.label}")
                    counts[key] = counts.get(key, 0) + 1
                    counts[("zones", f"{name}/all")] += 1
        for key in set(counts) | set(self._counted):
            n = counts.get(key, 0)
            if self._counted.get(key) != n:
                self.counts(key[0], key[1], n)
        self._counted = counts


class EventEngine:
    """The events of every stream (a ResultSink); `listeners` get each event (store, snapshots)."""

    def __init__(self, cfg: EventsConfig, publisher: Publisher | None) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.streams: dict[str, StreamEvents] = {}
        self.listeners: list[Listener] = []
        self.published = 0
        self.by_type: dict[tuple[str, str], int] = {}  # (stream, type) -> events published

    def add_stream(self, name: str, cfg: StreamConfig) -> None:
        self.streams[name] = StreamEvents(name, cfg, self.cfg,
                                          lambda kind, suffix, payload: self._counts(name, kind, suffix, payload))

    def remove_stream(self, name: str) -> None:
        ev = self.streams.pop(name, None)
        if ev is not None:
            ev.end_all(self._emit_for(name))

    def restart_stream(self, name: str) -> None:
        """The stream reconnected: its objects' events end (the tracker starts new ids)."""
        ev = self.streams.get(name)
        if ev is not None:
            ev.end_all(self._emit_for(name))

    def emit(self, result: Result) -> None:
        ev = self.streams.get(result.stream.name)
        if ev is not None:
            ev.on_result(result, self._emit_for(result.stream.name))

    def sweep(self, now: float) -> None:
        """End objects of streams that stopped producing results (called periodically)."""
        for name, ev in self.streams.items():
            ev._end_unseen(now, self._emit_for(name))
            ev._publish_counts()

    def close(self) -> None:
        for name in list(self.streams):
            self.remove_stream(name)

    def _emit_for(self, stream: str) -> Emit:
        def emit(kind: str, before: ObjectState | None, after: ObjectState | None, changed: list[str],
                 obj: TrackedObject, result: Result | None) -> None:
            payload: EventPayload = {"v": EVENT_VERSION, "stream": stream, "type": kind, "before": before,
                                     "after": after, "changed": changed}
            for listener in self.listeners:
                try:
                    listener(payload, obj, result)
                except Exception:
                    log.exception("event listener failed on %s", obj.id)
            if kind.startswith("_"):
                return  # internal (a better frame for the snapshot): not published
            if payload["after"] is not None:
                payload["after"]["has_snapshot"] = obj.snapshot  # a listener may have kept one just now
            if self.publisher is not None:
                self.publisher.publish(self.publisher.topics.events, payload)
            self.published += 1
            key = (stream, kind)
            self.by_type[key] = self.by_type.get(key, 0) + 1

        return emit

    def _counts(self, stream: str, kind: str, suffix: str, payload: Any) -> None:
        if self.publisher is None:
            return
        body = payload if isinstance(payload, dict) else str(payload).encode()
        self.publisher.publish(self.publisher.topics.stream_count(stream, kind, suffix), body, retain=True)
