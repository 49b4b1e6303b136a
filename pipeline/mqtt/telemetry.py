"""Telemetry: what the pipeline says about itself, built from the one record of each fact.

Stream state (retained, `<prefix>/streams/<name>/state`) from the stream records; slot state
(retained, `<prefix>/devices`) and the stats' executors from the pools' placers and slots;
periodic stats (`<prefix>/stats`) from the records, pools, sessions and the publisher. Nothing
here keeps a copy of a state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import MqttConfig
from pipeline.core.ingest import StreamRecord
from pipeline.core.overload import Camera, OverloadMonitor, Verdict
from pipeline.core.slots import SlotPool
from pipeline.payloads import (
    DevicesPayload,
    ExecutorFigures,
    ProcessFigures,
    RecordingFigures,
    SlotFacts,
    StatsPayload,
    StreamFigures,
    StreamStatePayload,
    TalkStatePayload,
    WebhookFigures,
)
from pipeline.topics import PAYLOAD_VERSION
from streams import Clock, StreamState, redact_text
from streams.disk import disk_figures
from streams.loopwatch import loop_figures

from .publisher import Publisher

log = logging.getLogger(__name__)


def process_figures() -> ProcessFigures:
    """This process's resident memory, open descriptors, threads and asyncio tasks (Linux /proc;
    None where unknown): what a soak watches for creep."""
    out: ProcessFigures = {"rss_mb": None, "fds": None, "threads": threading.active_count(), "tasks": None,
                           "loop": loop_figures()}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])  # native threads (decoders' and runtimes' too)
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    with contextlib.suppress(RuntimeError):
        out["tasks"] = len(asyncio.all_tasks())
    return out


class Telemetry:
    def __init__(self, publisher: Publisher, mqtt: MqttConfig, clock: Clock, secrets: Sequence[str]) -> None:
        self.publisher = publisher
        self.mqtt = mqtt
        self.clock = clock
        self.secrets = secrets
        self.started_at = clock.wall()
        self.last_stats: StatsPayload | None = None  # the last one published
        self._built: tuple[float, StatsPayload] | None = None  # the last one built, and when (monotonic)
        self.overload = OverloadMonitor()
        self.published_verdict = Verdict("ok")  # the monitor's, plus what shedding changes
        self._load_logged = -1e9

    def _redact(self, text: str | None) -> str | None:
        return redact_text(text, tuple(self.secrets)) if text else None

    # -- streams ---------------------------------------------------------------------------------
    def stream_state_payload(self, record: StreamRecord) -> StreamStatePayload:
        payload: StreamStatePayload = {
            "v": PAYLOAD_VERSION,
            "stream": record.name,
            "state": record.state.value,
            "since": round(record.since, 3),
            "reconnects": record.reconnects,
            "error": self._redact(record.error),
            "model": record.model,
            "url": self._redact(record.cfg.url),
        }
        if self.publisher.node:
            payload["node"] = self.publisher.node  # on a cluster: where it runs now
        return payload

    def stream_state(self, record: StreamRecord) -> None:
        if record.state is StreamState.STARTING:
            return  # nothing to tell yet
        self.publisher.publish(self.publisher.topics.stream_state(record.name),
                               self.stream_state_payload(record), qos=self.mqtt.state_qos, retain=True)

    def stream_removed(self, name: str) -> None:
        """An empty retained message deletes the retained state."""
        self.publisher.publish(self.publisher.topics.stream_state(name), b"", qos=self.mqtt.state_qos,
                               retain=True)

    # -- slots -----------------------------------------------------------------------------------
    def devices_payload(self, pools: Mapping[str, SlotPool]) -> DevicesPayload:
        slots: dict[str, SlotFacts] = {}
        for pool in pools.values():
            for name, snap in pool.snapshot().items():
                slots[name] = {"model": snap["model"], "device": snap["device"], "state": snap["state"],
                               "restarts": snap["restarts"], "errors": snap["errors"], "streams": snap["streams"],
                               "last_error": self._redact(snap["last_error"])}
        return {"v": PAYLOAD_VERSION, "at": round(self.clock.wall(), 3), "slots": slots}

    def devices(self, pools: Mapping[str, SlotPool]) -> None:
        self.publisher.publish(self.publisher.topics.devices, self.devices_payload(pools),
                               qos=self.mqtt.state_qos, retain=True)

    # -- sessions --------------------------------------------------------------------------------
    def session_state(self, name: str, state: str, error: str | None, snapshot: dict[str, Any]) -> None:
        head: TalkStatePayload = {"v": PAYLOAD_VERSION, "session": name, "state": state,
                                  "at": round(self.clock.wall(), 3), "error": self._redact(error)}
        if self.publisher.node:
            head["node"] = self.publisher.node  # on a cluster: where it runs now
        figures = {k: v for k, v in snapshot.items() if k not in head}
        self.publisher.publish(self.publisher.topics.talk_state(name), {**head, **figures},
                               qos=self.mqtt.state_qos, retain=True)

    # -- stats -----------------------------------------------------------------------------------
    def stats_payload(self, records: Mapping[str, StreamRecord], pools: Mapping[str, SlotPool],
                      talk: dict[str, Any], lipsync: dict[str, Any] | None, sink_errors: int,
                      cores: int = 1, webhooks: dict[str, WebhookFigures] | None = None,
                      recording: RecordingFigures | None = None) -> StatsPayload:
        now = self.clock.mono()
        streams: dict[str, StreamFigures] = {}
        for record in records.values():
            record.stats.tick(now)
            source = record.source
            streams[record.name] = {**record.stats.snapshot(), "state": record.state.value,
                                    "decode_errors": source.decode_errors if source is not None else 0,
                                    "corrupt_frames": source.corrupt_frames if source is not None else 0,
                                    "shed_packets": source.shed_packets if source is not None else 0,
                                    "reconnects": record.reconnects}
        executors: dict[str, ExecutorFigures] = {}
        for pool in pools.values():
            for name, s in pool.snapshot().items():
                executors[name] = {"state": s["state"], "healthy": s["state"] == "healthy", "batches": s["batches"],
                                   "frames": s["frames"], "errors": s["errors"], "batch_size": s["batch_size"],
                                   "mean_batch": s["mean_batch"], "service_ms_per_frame": s["service_ms_per_frame"]}
        wall = self.clock.wall()
        cameras = {r.name: Camera(r.source.fps, r.source.decoding, not r.source.local, r.source.decode_cpu_s)
                   for r in records.values() if r.source is not None}
        before = self.published_verdict
        verdict = self.overload.assess(now, streams, cameras, executors, cores)
        shed = sum(1 for r in records.values() if r.source is not None and r.source.shed)
        if shed:
            verdict = verdict.shedding(shed)
        self.published_verdict = verdict
        # a change of status is said at once; of reasons alone (they flicker near a limit) once a minute at most
        if verdict.status != before.status or (verdict.reasons != before.reasons and now - self._load_logged >= 60):
            self._load_logged = now
            if verdict.status == "overloaded":
                log.warning("overloaded (%s): %s", ", ".join(verdict.reasons), verdict.detail)
            else:
                log.info("no longer overloaded")
        return {
            "v": PAYLOAD_VERSION,
            "at": round(wall, 3),
            "uptime_s": round(wall - self.started_at, 1),
            "load": verdict.payload(),
            "streams": streams,
            "mqtt": self.publisher.counters(),
            "results": {"sink_errors": sink_errors},
            "talk": talk,
            "lipsync": lipsync,
            "executors": executors,
            "webhooks": webhooks or {},
            "recording": recording,
            "disk": disk_figures(),
            "process": process_figures(),
        }

    def recent_stats(self, build: Callable[[], StatsPayload], max_age: float) -> StatsPayload:
        """The stats payload built less than `max_age` seconds ago, or a new one from `build` (the load
        check reuses the stats loop's instead of building its own)."""
        now = self.clock.mono()
        if self._built is None or now - self._built[0] >= max_age:
            self._built = (now, build())
        return self._built[1]

    def stats(self, payload: StatsPayload) -> None:
        self.last_stats = payload
        self.publisher.publish(self.publisher.topics.stats, payload, qos=self.mqtt.stats_qos)

    async def stats_loop(self, build: Callable[[], StatsPayload]) -> None:
        while True:
            await asyncio.sleep(self.mqtt.stats_interval)
            self.stats(build())
