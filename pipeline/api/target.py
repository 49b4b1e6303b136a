"""What the control plane's shared routes need of whatever runs the streams and sessions: one typed
interface, `ControlTarget`, with two implementations, the local pipeline (`LocalTarget`, here) and
the cluster head (`pipeline.cluster.api.ClusterTarget`).

The routes (`pipeline.api.routes`) are written once against it; a deployment shape adds only what is
its own (a process's devices and live views; a cluster's nodes).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pipeline.config import Config, TalkConfig
from pipeline.errors import Conflict, NotFound, PlacementError
from pipeline.payloads import ClusterStatsPayload, StatsPayload
from streams import redact_text

from .schemas import ClipInfo, DeviceOut, EventInfo, ModelInfo, Move, RecordingInfo, SessionInfo, SlotInfo
from .views import main_jpeg

if TYPE_CHECKING:
    from pipeline.app import Pipeline
    from pipeline.core.devices import DeviceInfo

    from .metrics import LatencyMetrics
    from .views import LatestResults


class EventMedia(Protocol):
    """Stored events, their pictures and clips, and continuous recording, as the routes see them (this
    process's store and files, or every node's on a cluster)."""

    async def events(self, stream: str | None, label: str | None, since: float | None,
                     limit: int) -> list[EventInfo]:
        """Stored events, newest first (merged from every node on a cluster)."""
        ...

    async def event_snapshot(self, event_id: str, crop: bool) -> bytes | None: ...

    async def event_clip(self, event_id: str) -> Path | bytes | None:
        """An event's clip: its file here, or its bytes from the node that has it."""
        ...

    async def recordings(self, stream: str | None, since: float | None, until: float | None,
                         limit: int) -> list[RecordingInfo]:
        """Continuous-recording segments overlapping [since, until], oldest first (every node's)."""
        ...

    async def recording(self, segment: str) -> Path | bytes | None:
        """One segment: its file here, or its bytes from the node that has it."""
        ...


class ControlTarget(Protocol):
    """A running framegrid as the routes see it (one process, or a cluster head)."""

    config: Config

    @property
    def media(self) -> EventMedia:
        """Its stored events and recordings."""
        ...
    ready: asyncio.Event

    def secret_values(self) -> tuple[str, ...]:
        """Strings never to show (passwords, tokens), for redaction."""
        ...

    async def figures(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The live state and figures (StreamInfo's fields) of the named streams that run."""
        ...

    async def snapshot(self, name: str, boxes: bool, main: bool = False) -> tuple[int, bytes] | None:
        """(seq, JPEG) of a stream's newest processed frame; None when it has none yet. `main`: the
        camera's main stream's newest keyframe instead (`views.main_jpeg`). Raises `Unavailable` when
        whatever holds it cannot be asked."""
        ...

    def forget(self, name: str) -> None:
        """A stream changed or went away: drop what was cached for it."""
        ...

    def models(self) -> list[ModelInfo]: ...

    def session_names(self) -> list[str]: ...

    def sessions(self) -> list[SessionInfo]: ...

    async def start_session(self, name: str, cfg: TalkConfig) -> SessionInfo: ...

    async def stop_session(self, name: str) -> None: ...

    async def webrtc_offer(self, session: str, kind: str, sdp: str) -> tuple[str | None, str]:
        """A browser's SDP offer to a session (`whep`: watch it, `whip`: its microphone), answered where
        the session runs -> (viewer id or None, SDP answer). NotFound, Conflict, Unavailable."""
        ...

    async def webrtc_leave(self, session: str, viewer: str) -> None: ...

    async def say(self, session: str, text: str, voice: str | None, interrupt: bool) -> str:
        """Speak `text` in a session with pushed audio, where it runs (after what waits, or cutting it:
        `interrupt`) -> the utterance's id. NotFound, Conflict, Invalid."""
        ...

    async def interrupt(self, session: str) -> str:
        """Cut what a session is saying -> the utterance's id. NotFound (no session, saying nothing)."""
        ...

    async def talk_events(self, session: str, after: int) -> list[dict[str, Any]]:
        """A session's utterance events after sequence number `after`, where it runs. NotFound."""
        ...

    async def devices(self) -> list[DeviceOut]:
        """Every device (of every node) with its memory, load and executor slots."""
        ...

    async def device_moves(self, device: str, node: str | None, drain: bool) -> list[Move]:
        """Drain a device (move its streams to the others; nothing is placed there until resumed) or
        resume it -> the moves made. On a cluster `node` names the device's node. NotFound, Conflict."""
        ...

    async def stats(self) -> StatsPayload | ClusterStatsPayload:
        """The stats payload (`<prefix>/stats`, or every node's on a cluster), redacted."""
        ...

    def mqtt(self) -> dict[str, Any]:
        """The publisher's connection figures the page shows (connected, buffered, published)."""
        ...


P = TypeVar("P")


def redacted(payload: P, secrets: tuple[str, ...]) -> P:
    """A payload with every secret masked wherever it appears (nested too): the same type, a new copy."""
    result: P = json.loads(redact_text(json.dumps(payload), secrets))
    return result


def event_info(row: dict[str, Any], live_snapshot: bool) -> EventInfo:
    return EventInfo(**{k: row[k] for k in ("id", "stream", "label", "track_id", "start_time", "end_time",
                                            "best_score", "zones")},
                     has_snapshot=row["crop_path"] is not None or live_snapshot, state=row["data"],
                     clip=ClipInfo(size=row["clip_size"], start=row["clip_start"], end=row["clip_end"])
                     if row.get("clip_path") else None)


class LocalTarget:
    """The control target of one process: reads the pipeline's services and its live-view cache."""

    def __init__(self, pipeline: Pipeline, latest: LatestResults, latency: LatencyMetrics | None = None) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.ready = pipeline.ready
        self.latest = latest
        self.latency = latency
        self._facts: tuple[float, list[DeviceInfo]] | None = None  # NVML is asked at most once a second
        self.media = LocalMedia(pipeline)

    def secret_values(self) -> tuple[str, ...]:
        return tuple(self.pipeline.secrets)

    async def figures(self, names: list[str]) -> dict[str, dict[str, Any]]:
        return {n: f for n in names if (f := self.stream_figures(n))}

    def stream_figures(self, name: str) -> dict[str, Any]:
        """A running stream's state and figures, from its record and slot pool; {} when it does not run."""
        r = self.pipeline.streams.get(name)
        if r is None:
            return {}
        secrets = self.secret_values()
        snap = r.stats.snapshot()
        pool = self.pipeline.models.pool(r.model)
        slot = pool.slot_of(name) if pool is not None else None
        return {"state": r.state.value, "since": round(r.since, 3),
                "error": redact_text(r.error, secrets) if r.error else None, "reconnects": r.reconnects,
                "fps_in": snap["fps_in"], "fps_out": snap["fps_processed"], "decoded": snap["decoded"],
                "dispatched": snap["dispatched"], "published": r.seq, "drops": snap["drops"],
                "latency_ms": snap["latency_ms"], "slot": slot, "objects": self.latest.objects(name),
                "device": pool.slots[slot].device if slot is not None and pool is not None else None,
                **({"main": r.main.figures()} if r.main is not None else {})}

    async def snapshot(self, name: str, boxes: bool, main: bool = False) -> tuple[int, bytes] | None:
        if main:
            record = self.pipeline.streams.get(name)
            return None if record is None else await main_jpeg(record)
        return await self.latest.jpeg(name, boxes)

    def forget(self, name: str) -> None:
        self.latest.forget(name)
        if name not in self.pipeline.streams and self.latency is not None:
            self.latency.forget(name)

    def models(self) -> list[ModelInfo]:
        out = []
        for name, loaded in sorted(self.pipeline.models.table.items()):
            pool, cfg, err = loaded.pool, loaded.cfg, loaded.error
            out.append(ModelInfo(name=name, backend=cfg.backend, imgsz=cfg.imgsz, loaded=pool is not None,
                                 error=redact_text(err, self.secret_values()) if err else None,
                                 classes=self.pipeline.models.class_names(name)))
        return out

    def session_names(self) -> list[str]:
        return list(self.pipeline.talk.sessions)

    def _session_info(self, name: str, snap: dict[str, Any]) -> SessionInfo:
        figures = {k: v for k, v in snap.items() if k not in ("session", "state", "error", "backend", "slot")}
        return SessionInfo(name=name, state=snap.get("state", "unknown"),
                           error=redact_text(snap["error"], self.secret_values()) if snap.get("error") else None,
                           backend=snap.get("backend"), slot=snap.get("slot"), figures=figures)

    def sessions(self) -> list[SessionInfo]:
        return [self._session_info(n, s) for n, s in sorted(self.pipeline.talk.snapshot().items())]

    async def start_session(self, name: str, cfg: TalkConfig) -> SessionInfo:
        await self.pipeline.talk.start(name, cfg)
        return self._session_info(name, self.pipeline.talk.snapshot().get(name, {}))

    async def stop_session(self, name: str) -> None:
        await self.pipeline.talk.stop(name)

    async def webrtc_offer(self, session: str, kind: str, sdp: str) -> tuple[str | None, str]:
        return await self.pipeline.talk.webrtc_offer(session, kind, sdp)

    async def webrtc_leave(self, session: str, viewer: str) -> None:
        await self.pipeline.talk.webrtc_leave(session, viewer)

    async def say(self, session: str, text: str, voice: str | None, interrupt: bool) -> str:
        return self.pipeline.talk.say(session, text, voice, interrupt)

    async def interrupt(self, session: str) -> str:
        return self.pipeline.talk.interrupt(session)

    async def talk_events(self, session: str, after: int) -> list[dict[str, Any]]:
        return self.pipeline.talk.utterance_events(session, after)

    # -- devices, stats, events ------------------------------------------------------------------------
    async def device_facts(self) -> list[DeviceInfo]:
        now = time.monotonic()
        if self._facts is None or now - self._facts[0] >= 1.0:
            self._facts = (now, await asyncio.to_thread(self.pipeline.devices.now))
        return self._facts[1]

    async def devices(self) -> list[DeviceOut]:
        secrets = self.secret_values()
        slots: dict[str, list[SlotInfo]] = {}
        for model, pool in self.pipeline.all_pools().items():
            for name, snap in pool.snapshot().items():
                slots.setdefault(snap["device"], []).append(SlotInfo(
                    name=name, model=model, state=snap["state"], healthy=snap["state"] == "healthy",
                    restarts=snap["restarts"], errors=snap["errors"], streams=snap.get("streams", []),
                    service_ms_per_frame=snap["service_ms_per_frame"],
                    last_error=redact_text(snap["last_error"], secrets) if snap["last_error"] else None))
        return [DeviceOut(id=d.id, kind=d.kind, name=d.name, memory_total_bytes=d.total_bytes,
                          memory_used_bytes=max(0, d.total_bytes - d.free_bytes), utilization_percent=d.utilization,
                          temperature_c=d.temperature_c, drained=d.id in self.pipeline.models.drained,
                          slots=slots.get(d.id, [])) for d in await self.device_facts()]

    async def device_moves(self, device: str, node: str | None, drain: bool) -> list[Move]:
        if node is not None and node != self.pipeline.node:
            raise NotFound(f"no node {node}")
        models = self.pipeline.models
        try:
            moves = models.drain(device) if drain else models.resume(device)
        except KeyError:
            raise NotFound(f"no device {device}") from None
        except PlacementError as exc:
            raise Conflict(str(exc)) from None
        return [Move(stream=m.stream, source=m.source, target=m.target) for m in moves]

    async def stats(self) -> StatsPayload | ClusterStatsPayload:
        return redacted(self.pipeline.stats_payload(), self.secret_values())

    def mqtt(self) -> dict[str, Any]:
        counters = self.pipeline.publisher.counters()
        return {k: counters[k] for k in ("connected", "buffered", "published")}


class LocalMedia:
    """This process's event store, snapshots, clips and continuous segments (`EventMedia`)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.analytics = pipeline.analytics

    async def events(self, stream: str | None, label: str | None, since: float | None,
                     limit: int) -> list[EventInfo]:
        from pipeline.analytics.eventstore import query

        rows = await asyncio.to_thread(query, self.analytics.db, stream, label, since, limit)
        snaps = self.analytics.snapshots
        return [event_info(r, snaps is not None and snaps.live(r["id"]) is not None) for r in rows]

    async def event_snapshot(self, event_id: str, crop: bool) -> bytes | None:
        from pipeline.analytics.eventstore import query

        snaps = self.analytics.snapshots
        live = snaps.live(event_id) if snaps is not None else None
        if live is not None:
            return bytes(live[0] if crop else live[1])
        rows = await asyncio.to_thread(query, self.analytics.db, None, None, None, 1, event_id)
        path = rows[0]["crop_path" if crop else "frame_path"] if rows else None
        if not path or not Path(path).is_file():
            return None
        return await asyncio.to_thread(Path(path).read_bytes)

    async def event_clip(self, event_id: str) -> Path | bytes | None:
        from pipeline.analytics.eventstore import query

        rows = await asyncio.to_thread(query, self.analytics.db, None, None, None, 1, event_id)
        path = rows[0]["clip_path"] if rows else None
        return Path(path) if path and Path(path).is_file() else None

    async def recordings(self, stream: str | None, since: float | None, until: float | None,
                         limit: int) -> list[RecordingInfo]:
        from pipeline.analytics.eventstore import segments

        rows = await asyncio.to_thread(segments, self.analytics.db, stream, since, until, limit)
        return [RecordingInfo(**{k: r[k] for k in ("id", "stream", "start_time", "end_time", "size")})
                for r in rows]

    async def recording(self, segment: str) -> Path | bytes | None:
        from pipeline.analytics.eventstore import segments

        rows = await asyncio.to_thread(segments, self.analytics.db, None, None, None, 1, segment)
        path = rows[0]["path"] if rows else None
        return Path(path) if path and Path(path).is_file() else None
