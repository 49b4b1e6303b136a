"""Ingest: one record per stream (config, mailbox, source, state, stats, result sequence).

A `StreamRecord` is the one place a stream's state lives. Its source decodes on its own thread
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

from pipeline.config import StreamConfig
from streams import Clock, Mailbox, Source, SourceState, StreamState

from .handoff import Handoff
from .overload import DecodePacer
from .stats import StreamStats

if TYPE_CHECKING:
    from pipeline.analytics.tracking import StreamTracker

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
    source: Source | None = None
    seq: int = 0  # results published so far (assigned on the loop, so in order)
    live: bool = True  # False once removed at runtime: a result still in flight is not published
    tracker: StreamTracker | None = None  # track ids for its results (None: not tracked)

    @property
    def model(self) -> str:
        return self.cfg.model


class Ingest:
    """The streams of a pipeline: add, start decoding, apply state changes, stop."""

    def __init__(self, clock: Clock, handoff: Handoff, on_state: Callable[[StreamRecord], None],
                 on_reconnect: Callable[[StreamRecord], None] | None = None) -> None:
        self.clock = clock
        self.handoff = handoff
        self.on_state = on_state
        self.on_reconnect = on_reconnect  # a new connection is a new scene (tracks and their events end)
        self.records: dict[str, StreamRecord] = {}
        self.pacer = DecodePacer()  # while shedding decode load: whose keyframe is decoded when

    def add(self, name: str, cfg: StreamConfig) -> StreamRecord:
        mailbox = Mailbox(name)
        record = StreamRecord(name, cfg, mailbox, StreamStats(mailbox), since=self.clock.wall())
        self.records[name] = record
        return record

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
        record.stats.restart_window(self.clock.mono())
        record.source = Source(record.name, record.cfg.url, record.mailbox.put,
                               lambda st: self.handoff.call(self._source_state, record, st), record.cfg,
                               decode_threads=decode_threads, wanted_fps=record.cfg.max_fps, clock=self.clock)
        # while shedding: a keyframe is decoded only when its mailbox is empty and it is the camera's turn
        record.source.demand = lambda: (record.mailbox.waiting_since is None
                                        and self.pacer.may_decode(record.name, self.clock.mono(),
                                                                  record.stats.drops["too_old"]))
        record.source.start()

    def _source_state(self, record: StreamRecord, st: SourceState) -> None:
        if self.records.get(record.name) is record:
            self.set_state(record, st.state, st.error, st.since, st.reconnects)

    async def stop(self, record: StreamRecord) -> None:
        if record.source is not None:
            await asyncio.to_thread(record.source.stop)
        self.set_state(record, StreamState.STOPPED)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(r) for r in self.records.values()))

    def remove(self, name: str) -> StreamRecord | None:
        return self.records.pop(name, None)
