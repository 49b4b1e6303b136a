"""Ingest: one record per running stream (config, mailbox, source, state, stats, result sequence).

`Ingest.records` is the one table of the streams a pipeline runs: the config's enabled streams from
the start, plus those added and less those removed while running. A `StreamRecord` is the one place
a stream's state lives (its `cfg` the one live copy of its settings). Its source decodes on its own thread
into the mailbox; the source's state changes cross to the loop through the one hand-off and are
applied here, then told to the listener (telemetry publishes them). Nothing here runs a model
or publishes by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config import StreamConfig, check_name
from streams import Clock, Mailbox, Source, SourceState, StreamState
from streams.handoff import Handoff
from streams.source import PacketSink

from .filters import StreamFilter
from .mainstream import MainStream
from .overload import DecodePacer
from .stats import StreamStats

if TYPE_CHECKING:
    from pipeline.analytics.tracking import StreamTracker

    from .secondary import StreamSecondary

log = logging.getLogger(__name__)


@dataclass(eq=False)
class StreamRecord:
    name: str
    cfg: StreamConfig
    mailbox: Mailbox
    stats: StreamStats
    state: StreamState = StreamState.STARTING
    since: float = 0.0  # wall time the state began
    reconnects: int = 0
    error: str | None = None
    source: Source | None = None  # decodes `detect_url` when set, else `url`
    main: MainStream | None = None  # with `detect_url`: the main stream (recorded, its size, its snapshots)
    seq: int = 0  # results published so far (assigned on the loop, so in order)
    live: bool = True  # False once removed at runtime: a result still in flight is not published
    tracker: StreamTracker | None = None  # track ids for its results (None: not tracked)
    filter: StreamFilter | None = None  # its own filters of the shared model's detections (None: none set)
    recorder: PacketSink | None = None  # takes its packets for event clips (None: not recording)
    secondary: StreamSecondary | None = None  # classifiers on its tracked objects' crops (None: none)

    @property
    def model(self) -> str:
        return self.cfg.model

    def main_scale(self, width: int, height: int) -> tuple[int, int, float, float] | None:
        """With `detect_url`: (main width, main height, x scale, y scale) from a detected frame of
        `width` x `height` to the main stream's pixels; None without roles or before the main stream
        has been opened."""
        size = self.main.size if self.main is not None else None
        if size is None or not width or not height or size == (width, height):
            return None
        return size[0], size[1], size[0] / width, size[1] / height


class Ingest:
    """The streams of a pipeline: add, start decoding, apply state changes, stop.

    Made with the pipeline (its records are the streams to run); `attach` wires it to the loop's
    hand-off and the state listeners when the pipeline starts."""

    def __init__(self, clock: Clock, streams: dict[str, StreamConfig] | None = None) -> None:
        self.clock = clock
        self.handoff: Handoff | None = None
        self.on_state: Callable[[StreamRecord], None] = lambda record: None
        self.on_reconnect: Callable[[StreamRecord], None] | None = None  # a new connection is a new scene
        self.records: dict[str, StreamRecord] = {}
        self.pacer = DecodePacer()  # while shedding decode load: whose keyframe is decoded when
        for name, cfg in (streams or {}).items():
            self.add(name, cfg)

    def attach(self, handoff: Handoff, on_state: Callable[[StreamRecord], None],
               on_reconnect: Callable[[StreamRecord], None] | None = None) -> None:
        self.handoff, self.on_state, self.on_reconnect = handoff, on_state, on_reconnect

    def add(self, name: str, cfg: StreamConfig) -> StreamRecord:
        """A new stream's record (not decoding yet). ValueError for a bad name or a duplicate."""
        check_name("stream", name)
        if name in self.records:
            raise ValueError(f"stream {name} already exists")
        mailbox = Mailbox(name)
        record = StreamRecord(name, cfg, mailbox, StreamStats(mailbox), since=self.clock.wall(),
                              filter=StreamFilter.of(cfg))
        self.records[name] = record
        return record

    def models_in_use(self) -> list[str]:
        return sorted({r.model for r in self.records.values()})

    def users(self, model: str) -> list[str]:
        """The running streams of a model."""
        return sorted(n for n, r in self.records.items() if r.model == model)

    def set_state(self, record: StreamRecord, state: StreamState, error: str | None = None,
                  since: float | None = None, reconnects: int | None = None) -> None:
        if record.state is StreamState.STOPPED:
            return  # final
        if state is StreamState.RECONNECTING and record.state is not state and self.on_reconnect is not None:
            self.on_reconnect(record)
        if since is None:
            since = record.since if record.state is state else self.clock.wall()
        record.state, record.since, record.error = state, since, error
        if reconnects is not None:
            record.reconnects = reconnects
        self.on_state(record)

    def start(self, record: StreamRecord, decode_threads: int) -> None:
        """Start decoding into the record's mailbox (the batcher of its slot is already wired)."""
        handoff = self.handoff
        assert handoff is not None, "attach() first"
        record.stats.restart_window(self.clock.mono())
        cfg = record.cfg
        record.source = Source(record.name, cfg.detect_url or cfg.url, record.mailbox.put,
                               lambda st: handoff.call(self._source_state, record, st), cfg,
                               decode_threads=decode_threads, wanted_fps=cfg.max_fps, clock=self.clock)
        if cfg.detect_url is not None:  # never decoded but for a snapshot; read only when recorded
            record.main = MainStream(record.name, cfg, self.clock, record.recorder)
            record.main.start()
        else:
            record.source.recorder = record.recorder
        # while shedding: a keyframe is decoded only when its mailbox is empty and it is the camera's turn
        record.source.demand = lambda: (record.mailbox.waiting_since is None
                                        and self.pacer.may_decode(record.name, self.clock.mono(),
                                                                  record.stats.drops["too_old"]))
        record.source.start()

    def _source_state(self, record: StreamRecord, st: SourceState) -> None:
        if self.records.get(record.name) is record:
            self.set_state(record, st.state, st.error, st.since, st.reconnects)

    async def stop(self, record: StreamRecord) -> None:
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in (record.source, record.main) if s is not None))
        self.set_state(record, StreamState.STOPPED)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(r) for r in self.records.values()))

    def remove(self, name: str) -> StreamRecord:
        """Take a stream's record out of the table (KeyError when there is none)."""
        if name not in self.records:
            raise KeyError(f"no stream {name}")
        return self.records.pop(name)
