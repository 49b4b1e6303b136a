"""What the control plane's shared routes need of whatever runs the streams and sessions: one typed
interface, `ControlTarget`, with two implementations, the local pipeline (`LocalTarget`, here) and
the cluster head (`pipeline.cluster.api.ClusterTarget`).

The routes (`pipeline.api.routes`) are written once against it; a deployment shape adds only what is
its own (a process's devices and live views; a cluster's nodes).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.config import Config, TalkConfig
from streams import redact_text

from .schemas import ModelInfo, SessionInfo

if TYPE_CHECKING:
    from pipeline.app import Pipeline

    from .metrics import LatencyMetrics
    from .views import LatestResults


class ControlTarget(Protocol):
    """A running framegrid as the routes see it (one process, or a cluster head)."""

    config: Config
    ready: asyncio.Event

    def secret_values(self) -> tuple[str, ...]:
        """Strings never to show (passwords, tokens), for redaction."""
        ...

    async def figures(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The live state and figures (StreamInfo's fields) of the named streams that run."""
        ...

    async def snapshot(self, name: str, boxes: bool) -> tuple[int, bytes] | None:
        """(seq, JPEG) of a stream's newest processed frame; None when it has none yet. Raises
        `Unavailable` when whatever holds it cannot be asked."""
        ...

    def forget(self, name: str) -> None:
        """A stream changed or went away: drop what was cached for it."""
        ...

    def models(self) -> list[ModelInfo]: ...

    def session_names(self) -> list[str]: ...

    def sessions(self) -> list[SessionInfo]: ...

    async def start_session(self, name: str, cfg: TalkConfig) -> SessionInfo: ...

    async def stop_session(self, name: str) -> None: ...


class LocalTarget:
    """The control target of one process: reads the pipeline's services and its live-view cache."""

    def __init__(self, pipeline: Pipeline, latest: LatestResults, latency: LatencyMetrics | None = None) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.ready = pipeline.ready
        self.latest = latest
        self.latency = latency

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
                "device": pool.slots[slot].device if slot is not None and pool is not None else None}

    async def snapshot(self, name: str, boxes: bool) -> tuple[int, bytes] | None:
        return await self.latest.jpeg(name, boxes)

    def forget(self, name: str) -> None:
        self.latest.forget(name)
        if name not in self.pipeline.streams and self.latency is not None:
            self.latency.forget(name)

    def models(self) -> list[ModelInfo]:
        out = []
        for name, loaded in sorted(self.pipeline.models.table.items()):
            pool, cfg, err = loaded.pool, loaded.cfg, loaded.error
            classes: list[str] = []
            if pool is not None:
                classes = next((list(names) for s in pool.slots.values()
                                if (names := getattr(s.model, "class_names", None))), [])
            out.append(ModelInfo(name=name, backend=cfg.backend, imgsz=cfg.imgsz, loaded=pool is not None,
                                 error=redact_text(err, self.secret_values()) if err else None, classes=classes))
        return out

    def session_names(self) -> list[str]:
        return list(self.pipeline.sessions)

    def _session_info(self, name: str, snap: dict[str, Any]) -> SessionInfo:
        figures = {k: v for k, v in snap.items() if k not in ("session", "state", "error", "backend", "slot")}
        return SessionInfo(name=name, state=snap.get("state", "unknown"),
                           error=redact_text(snap["error"], self.secret_values()) if snap.get("error") else None,
                           backend=snap.get("backend"), slot=snap.get("slot"), figures=figures)

    def sessions(self) -> list[SessionInfo]:
        return [self._session_info(n, s) for n, s in sorted(self.pipeline.talk.snapshot().items())]

    async def start_session(self, name: str, cfg: TalkConfig) -> SessionInfo:
        await self.pipeline.start_session(name, cfg)
        return self._session_info(name, self.pipeline.talk.snapshot().get(name, {}))

    async def stop_session(self, name: str) -> None:
        await self.pipeline.stop_session(name)
