"""What a pipeline does with its results beyond publishing them: the event engine (zones, lines,
new/update/end), the SQLite event store and the snapshots, started and stopped together.

`Analytics` is the one home of where events live on disk (`folder`, `db`) and of the three parts'
lifecycle; the composer hands it results (it is a result sink) and stream changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Config, StreamConfig
from pipeline.payloads import RecordingFigures
from streams import default_state_dir

from .clips import Clips
from .events import EventEngine
from .eventstore import EventStore
from .snapshots import Snapshots
from .webhooks import Webhooks

if TYPE_CHECKING:
    from pipeline.core.results import Results
    from pipeline.mqtt.publisher import Publisher
    from streams.handoff import Handoff
    from streams.recorder import StreamRecorder


def events_folder(config: Config, config_path: Path | None) -> Path:
    """Where the event store and the snapshots live: beside `events.store`, else `<config>.events/`,
    else `events` in the state folder."""
    if config.events.store is not None:
        return config.events.store.parent
    if config_path is not None:
        return config_path.resolve().with_name(config_path.stem + ".events")
    return default_state_dir() / "events"


def events_db(config: Config, config_path: Path | None) -> Path:
    """The SQLite file of events: `events.store`, else `events.db` in `events_folder()`."""
    return config.events.store or events_folder(config, config_path) / "events.db"


WEBHOOK_FLUSH_S = 5.0  # at shutdown: the most time given to deliver the webhooks' last events


class Analytics:
    """The event engine, store and snapshots of one pipeline (all None while `events.enabled` is off)."""

    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.folder = events_folder(config, config_path)
        self.db = events_db(config, config_path)
        self.engine: EventEngine | None = None
        self.store: EventStore | None = None
        self.snapshots: Snapshots | None = None
        self.clips: Clips | None = None
        self.clips_folder = config.record.dir or self.folder / "clips"
        # events POSTed to HTTP endpoints
        self.webhooks = Webhooks(config.webhooks, config.webhook_names(), config.secrets())

    def start(self, publisher: Publisher, results: Results, handoff: Handoff, wall: Callable[[], float]) -> None:
        cfg, record = self.config.events, self.config.record
        if not cfg.enabled:
            return
        self.engine = EventEngine(cfg, publisher)
        self.store = EventStore(self.db, cfg.max_age_days, cfg.max_events, cfg.max_queue,
                                int(record.max_gb * 1e9), dict(record.retain_days))
        self.store.start()
        store = self.store
        self.engine.listeners.append(lambda event, obj, result: store.put(event) if not event["type"].startswith("_")
                                     else None)
        if cfg.snapshots:
            self.snapshots = Snapshots(self.folder / "snapshots", cfg.max_snapshots, store, publisher,
                                       cfg.mqtt_snapshots, on_loop=handoff.call)
            self.engine.listeners.append(self.snapshots)
        self.clips = Clips(record, self.clips_folder, store, wall)
        self.engine.listeners.append(self.clips.on_event)
        self.engine.listeners.append(self.webhooks.put)
        results.add_sink(self.engine)

    async def sweep_loop(self, mono: Callable[[], float]) -> None:
        """End the events of objects not seen for a while, once a second (`mono`: the clock's mono(): a
        wall-clock step neither ends every object nor keeps one alive)."""
        if self.engine is None:
            return
        while True:
            await asyncio.sleep(1.0)
            self.engine.sweep(mono())

    async def deliver_loop(self) -> None:
        """Send the webhooks' events until cancelled (nothing to do without hooks or events)."""
        if self.engine is not None:
            await self.webhooks.run()

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.close()  # every live object's event ends
            await self.webhooks.flush(WEBHOOK_FLUSH_S)  # ... and reaches the hooks, if they answer in time
        if self.clips is not None:
            await asyncio.to_thread(self.clips.close)  # the clips' last packets and their rows
        if self.snapshots is not None:
            await asyncio.to_thread(self.snapshots.close)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    def recording_figures(self) -> RecordingFigures | None:
        """Clips per recording stream and the media budget (None while events are off)."""
        if self.store is None or self.clips is None:
            return None
        return {"streams": self.clips.figures(), "media_bytes": self.store.media_size,
                "media_limit_bytes": self.store.media_bytes, "media_deleted": self.store.media_deleted}

    # -- stream changes ------------------------------------------------------------------------------------
    def add_stream(self, name: str, cfg: StreamConfig) -> None:
        if self.engine is not None:
            self.engine.add_stream(name, cfg)

    def recorder_for(self, name: str, cfg: StreamConfig) -> StreamRecorder | None:
        """The packet recorder of a stream that records event clips (None: it does not)."""
        return self.clips.recorder_for(name, cfg) if self.clips is not None else None

    def remove_stream(self, name: str) -> None:
        if self.engine is not None:
            self.engine.remove_stream(name)  # its objects' events end (and their clips)
        if self.clips is not None:
            self.clips.remove_stream(name)

    def restart_stream(self, name: str) -> None:
        """A new connection is a new scene: the stream's objects' events end."""
        if self.engine is not None:
            self.engine.restart_stream(name)
