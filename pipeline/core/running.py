"""Runtime changes: how a stream starts (tracker, placement on its model's pool, its decoder), and
how streams and models are added, retuned and removed while running, over the ingest's records (the
one table of running streams) and the models.

`RunningStreams` is the one service the composer, the control plane (`StreamControl`, whose
`StreamTarget` it is on one process, as the cluster head is on a cluster) and a node's worker change
streams and models through. It is made with the pipeline; changes are refused until it runs. It
reaches models and analytics only through what it is given, and telemetry through `on_removed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.config import Config, ModelConfig, StreamConfig, TrackerConfig, stream_references
from pipeline.errors import PlacementError
from streams import StreamState, url_password

from .detect import StreamFeed
from .devices import DeviceInfo, decode_threads
from .filters import FILTER_KEYS, StreamFilter
from .ingest import Ingest, StreamRecord
from .models import Models
from .secondary import Secondaries

if TYPE_CHECKING:
    from pipeline.analytics.service import Analytics

log = logging.getLogger(__name__)
LIVE_KEYS = ("max_fps", *FILTER_KEYS)  # changed at run time without a reconnect


class Trackers(Protocol):
    """What builds a stream's tracker (analytics' `StreamTracker`; core only holds what it makes)."""

    def __call__(self, settings: TrackerConfig) -> Any: ...

    def prepare(self, kind: str) -> None: ...  # import its code, off the loop


class RunningStreams:
    def __init__(self, config: Config, ingest: Ingest, models: Models, analytics: Analytics,
                 facts: Callable[[], list[DeviceInfo]], secrets: list[str],
                 tracker: Trackers, ready: asyncio.Event) -> None:
        self.config = config
        self.ingest = ingest
        self.models = models
        self.analytics = analytics
        self.facts = facts
        self.secrets = secrets  # the composer's list: a new stream's password is added to it
        self.tracker = tracker  # a stream's tracker from its settings (analytics builds it; core only holds it)
        self.ready = ready  # set by the composer once everything runs
        self.on_removed: Callable[[str], None] = lambda name: None  # telemetry clears its retained state
        self.on_started: Callable[[StreamRecord], None] = lambda record: None  # Home Assistant discovery
        self.secondaries = Secondaries(config.models)  # classifiers on tracked objects' crops

    def _running(self) -> None:
        if not self.ready.is_set():
            raise RuntimeError("pipeline is not running")

    def model_names(self) -> list[str]:
        return self.models.names()

    @property
    def records(self) -> dict[str, StreamRecord]:
        return self.ingest.records

    def is_running(self, name: str) -> bool:
        return name in self.ingest.records

    def users(self, model: str) -> list[str]:
        """The running streams of a model."""
        return self.ingest.users(model)

    def _tracking(self, record: StreamRecord) -> TrackerConfig:
        return record.cfg.tracker or self.models.cfg(record.model).tracker

    async def prepare(self, records: Iterable[StreamRecord]) -> None:
        """Import the trackers these streams use on a worker thread, before they start: `start` runs on
        the event loop, where a first import of a tracker (seconds on a busy machine) would hold every
        stream's results (the 8.5 s freeze of issue 27)."""
        for kind in sorted({self._tracking(r).type for r in records if self.models.pool(r.model) is not None}):
            if kind != "none":
                await asyncio.to_thread(self.tracker.prepare, kind)

    def start(self, record: StreamRecord) -> None:
        """Track, place and decode a stream whose model is loaded (a failed model's state says so);
        `prepare` it first."""
        pool = self.models.pool(record.model)
        if pool is None:
            return
        tracking = self._tracking(record)
        record.tracker = self.tracker(tracking) if tracking.type != "none" else None
        if record.tracker is not None:
            self.analytics.add_stream(record.name, record.cfg)
            record.recorder = self.analytics.recorder_for(record.name, record.cfg)
            record.secondary = self.secondaries.for_stream(record.name, record.cfg.secondary)
        try:
            pool.place(StreamFeed(record, self.config.pipeline.max_frame_age))
        except PlacementError as exc:
            self.ingest.set_state(record, StreamState.REFUSED, str(exc))
            log.warning("%s", exc)
            return
        cpu = next((d for d in self.facts() if d.kind == "cpu"), None)
        threads = decode_threads((cpu.cores if cpu else None) or 1, len(self.ingest.records),
                                 self.config.pipeline.decode_threads)
        self.ingest.start(record, threads)
        self.on_started(record)

    async def add_stream(self, name: str, cfg: StreamConfig) -> None:
        """Start a stream. Its model must be known; it is loaded if unused so far. Raises ValueError for
        a bad name, a duplicate, or an unknown model; a model that fails to load leaves the stream
        `failed` (as at start-up)."""
        self._running()
        if cfg.model not in self.models.names():
            raise ValueError(f"stream {name}: unknown model '{cfg.model}'")
        if problems := stream_references(name, cfg, {n: self.models.cfg(n) for n in self.models.names()}):
            raise ValueError("; ".join(problems))
        record = self.ingest.add(name, cfg)
        for url in (cfg.url, cfg.detect_url):
            if url and (password := url_password(url)):
                self.secrets.append(password)
        if self.models.pool(cfg.model) is None and not await self.models.load(cfg.model):
            return
        await self.prepare([record])
        self.start(record)
        log.info("stream %s: added (model %s)", name, cfg.model)

    async def remove_stream(self, name: str) -> None:
        """Stop a stream, publish `stopped` and clear its retained state (KeyError: no such stream)."""
        self._running()
        record = self.ingest.remove(name)
        record.live = False
        pool = self.models.pool(record.model)
        if pool is not None:
            pool.remove(name)
        await self.ingest.stop(record)
        self.analytics.remove_stream(name)
        self.secondaries.forget(name)
        self.on_removed(name)
        log.info("stream %s: removed", name)

    def retune_stream(self, name: str, cfg: StreamConfig) -> bool:
        """Apply a new `max_fps` or new filters without reconnecting: True when done, False when the
        change needs a restart (another key changed, or the decoder would skip frames differently). The
        feed's rate, the placer's cost and the filters follow at once."""
        record = self.ingest.records.get(name)
        if record is None or record.cfg.model_copy(update={k: getattr(cfg, k) for k in LIVE_KEYS}) != cfg:
            return False
        source = record.source
        if source is not None:
            before = source.wanted_fps
            source.wanted_fps = cfg.max_fps
            if source.skip_mode(source.fps) != source.skipping:
                source.wanted_fps = before
                return False
        before_cfg, record.cfg = record.cfg, cfg  # the feed reads its rate from here
        record.filter = StreamFilter.of(cfg)
        pool = self.models.pool(cfg.model)
        feed = pool.feeds.get(name) if pool is not None else None
        if pool is not None and feed is not None:
            pool.placer.update_cost(name, pool.cost(feed))
        log.info("stream %s: %s changed (live)", name, ", ".join(k for k in LIVE_KEYS if getattr(cfg, k) != getattr(
            before_cfg, k)) or "nothing")
        return True

    async def add_model(self, name: str, cfg: ModelConfig) -> None:
        """Load a model while running, ready for `add_stream` (see `Models.add` for what it raises)."""
        self._running()
        await self.models.add(name, cfg)

    async def remove_model(self, name: str) -> None:
        """Stop a model's slots and forget it. Its streams must be removed first (ValueError names them)."""
        self._running()
        await self.models.remove(name, self.users(name))
