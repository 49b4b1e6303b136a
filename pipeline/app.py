"""The composer: wires the parts of one pipeline and owns their lifecycle in one TaskGroup.

    Source (decode thread) -> Mailbox -> StreamFeed -> Batcher -> Slot (worker thread)
        -> DetectJobs -> Results -> sinks (MQTT, and any `ResultSink` given)
    Ingest: stream records (state, stats)    SlotPool: placer, batchers, failover, restarts
    Telemetry: state/devices/stats payloads  TalkSessions: live talking heads on lipsync slots

Each part has one job; this module only wires them. `async with Pipeline(config) as p:` (or
`await Pipeline(config).run(stop)`) starts everything; leaving tears it down in order: sources
and sessions first (no new work), then the supervisor's loops, then the slots (a batch in flight
finishes), then the publisher (which says `offline`), then the embedded broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.analytics.service import Analytics
from pipeline.analytics.tracking import StreamTracker
from pipeline.core.detect import DetectorFactory, default_detector_factory
from pipeline.core.devices import DeviceFacts, DeviceInfo
from pipeline.core.ingest import Ingest, StreamRecord
from pipeline.core.memory import fix_mmap_threshold, keep_freed, limit_arenas
from pipeline.core.models import Models
from pipeline.core.overload import DecodeShedder, LoadWatch, Verdict
from pipeline.core.results import MqttResults, Results, ResultSink
from pipeline.core.running import RunningStreams
from pipeline.core.slots import SlotPool
from pipeline.mqtt.broker import publisher_for
from pipeline.mqtt.homeassistant import HomeAssistant
from pipeline.mqtt.publisher import Publisher
from pipeline.mqtt.telemetry import Telemetry
from pipeline.payloads import StatsPayload
from pipeline.talk.sessions import TalkSessions
from streams import SYSTEM_CLOCK, Clock, StreamState
from streams.handoff import Handoff

from .config import Config

log = logging.getLogger(__name__)
LOAD_CHECK_S = 5.0  # seconds between load verdicts (and decode shedding decisions)


class Pipeline:
    """framegrid's graph for one config."""

    def __init__(self, config: Config, detector_factory: DetectorFactory | None = None, clock: Clock = SYSTEM_CLOCK,
                 devices: list[DeviceInfo] | None = None, sinks: list[ResultSink] | None = None,
                 config_path: Path | None = None, node: str | None = None, cpu_cores: int | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.node = node  # the cluster node this pipeline is the worker of (None: a single process)
        self.clock = clock
        # the one table of running streams: the config's enabled ones now, runtime changes later
        self.ingest = Ingest(clock, {n: s for n, s in config.streams.items() if s.enabled})
        # discovered at the first ask unless given (tests); on a cluster node `cpu_cores` are the cores
        # its Ray node declares
        self.devices = DeviceFacts(devices, cpu_cores)
        self.facts = self.devices.planned  # what planning and placement use
        self.secrets: list[str] = list(config.secrets())
        self.results = Results(clock, sinks)
        self.models = Models(config, detector_factory or default_detector_factory, self.results, clock, self.facts,
                             lambda: self.secrets, self._devices_changed, self._model_failed)
        self.analytics = Analytics(config, config_path)
        self.ready = asyncio.Event()
        # the runtime changes of streams and models (the control plane's and node workers' way in)
        self.running = RunningStreams(config, self.ingest, self.models, self.analytics, self.facts, self.secrets,
                                      StreamTracker, self.ready)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # made on the loop, in run()
        self.publisher: Publisher
        self.telemetry: Telemetry
        self.talk: TalkSessions

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Pipeline:
        self._task = asyncio.create_task(self.run(self._stop), name="pipeline")
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not self.ready.is_set():
            ready.cancel()
            await self._task  # raises what stopped it
        return self

    @property
    def done(self) -> bool:
        """True once a pipeline entered with `async with` has stopped (on its own only after an error)."""
        return self._task is not None and self._task.done()

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set."""
        handoff = Handoff(asyncio.get_running_loop())
        keep_freed(self.config.pipeline.malloc_trim_threshold_kb)  # before the first frame is decoded
        fix_mmap_threshold(self.config.pipeline.malloc_mmap_threshold_kb)
        limit_arenas(self.config.pipeline.malloc_arenas)  # before the decoder and slot threads start
        self.publisher, broker = await publisher_for(self.config.mqtt, self.secrets, self.node)
        self.telemetry = Telemetry(self.publisher, self.config.mqtt, self.clock, self.secrets)
        self.results.add_sink(MqttResults(self.publisher))
        self.analytics.start(self.publisher, self.results, handoff, self.clock.wall)
        self.ingest.attach(handoff, self.telemetry.stream_state, self._reconnected)
        self.running.on_removed = self.telemetry.stream_removed
        if self.node is None:  # a cluster node's streams move: its head tells Home Assistant
            self._tell_home_assistant(HomeAssistant(self.config.homeassistant, self.publisher))
        self.talk = TalkSessions(self.config, self.publisher, self.telemetry, handoff, self.clock, self.secrets,
                                 self.facts, self.models.runtimes, self._devices_changed)
        try:
            async with asyncio.TaskGroup() as tg:
                self.models.spawn = self.talk.spawn = lambda coro, name: tg.create_task(coro, name=name)
                pub_task = tg.create_task(self.publisher.run(), name="mqtt.publisher")
                await self.models.start(self.ingest.models_in_use())
                await self.running.prepare(self.ingest.records.values())
                for record in self.ingest.records.values():
                    self.running.start(record)
                await self.talk.start_configured()
                loops = [tg.create_task(self.telemetry.stats_loop(self.stats_payload), name="telemetry.stats"),
                         tg.create_task(self.models.rebalance_loop(self.config.pipeline.rebalance_interval),
                                        name="supervisor.rebalance"),
                         tg.create_task(self._load_loop(), name="supervisor.load"),
                         tg.create_task(self.analytics.sweep_loop(self.clock.mono), name="events.sweep"),
                         tg.create_task(self.analytics.deliver_loop(), name="events.webhooks")]
                self.ready.set()
                try:
                    await stop.wait()
                finally:
                    await self._shutdown(pub_task, loops)
        finally:
            if broker is not None:
                await asyncio.to_thread(broker.stop)

    async def _shutdown(self, pub_task: asyncio.Task[None], loops: list[asyncio.Task[Any]]) -> None:
        log.info("stopping")
        await asyncio.gather(self.ingest.stop_all(), self.talk.close())
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await self.models.close()
        await asyncio.to_thread(self.running.secondaries.close)
        await self.analytics.close()
        self.telemetry.stats(self.stats_payload())
        await self.publisher.close()
        done, _ = await asyncio.wait({pub_task}, timeout=10)
        if not done:
            log.warning("mqtt: %d message(s) not delivered at shutdown", self.publisher.buffered)
            pub_task.cancel()
        # the whole account, once: every result was acknowledged by the broker, dropped, or is left over
        final = {**self.publisher.counters(), "results": {r.name: r.seq for r in self.ingest.records.values()}}
        log.info("mqtt: final account %s", json.dumps(final, separators=(",", ":")))

    def _tell_home_assistant(self, discovery: HomeAssistant) -> None:
        """Announce each stream as it starts, withdraw it when removed."""
        def started(record: StreamRecord) -> None:
            labels = discovery.labels_for(record.cfg, self.models.cfg(record.model).classes,
                                          self.models.class_names(record.model))
            discovery.announce(record.name, record.cfg, labels)

        def removed(name: str) -> None:
            self.telemetry.stream_removed(name)
            discovery.withdraw(name)

        self.running.on_started, self.running.on_removed = started, removed

    def _reconnected(self, record: StreamRecord) -> None:
        """A new connection is a new scene: the stream's tracks end, and their objects' events."""
        if record.tracker is not None:
            record.tracker.restart()
        self.analytics.restart_stream(record.name)

    def _model_failed(self, model: str, why: str) -> None:
        for record in self.ingest.records.values():
            if record.model == model:
                self.ingest.set_state(record, StreamState.FAILED, why)

    @property
    def streams(self) -> dict[str, StreamRecord]:
        return self.ingest.records

    # -- supervision -----------------------------------------------------------------------------
    async def _load_loop(self) -> None:
        if not self.config.pipeline.shed_decode:
            return

        def judge() -> Verdict:
            self.stats_payload(max_age=LOAD_CHECK_S / 2)  # updates the verdict (unless the stats loop just did)
            return self.telemetry.overload.verdict

        hold = self.config.pipeline.shed_hold
        shedder = DecodeShedder(hold=hold, max_hold=max(900.0, hold))
        await LoadWatch(shedder, self.ingest, self.clock, judge, self.devices.cpu_cores, LOAD_CHECK_S).run()

    def all_pools(self) -> dict[str, SlotPool]:
        """Every slot pool of the process: the models' and, once started, the lipsync one."""
        pools = dict(self.models.pools)
        if self.talk.lipsync is not None:  # set once its slots have started
            pools["lipsync"] = self.talk.lipsync.pool
        return pools

    def _devices_changed(self) -> None:
        self.telemetry.devices(self.all_pools())

    def stats_payload(self, max_age: float = 0.0) -> StatsPayload:
        """The stats payload (and, as it is built, the load verdict); one built less than `max_age`
        seconds ago is reused."""
        def build() -> StatsPayload:
            lipsync = self.talk.lipsync
            return self.telemetry.stats_payload(self.ingest.records, self.models.pools, self.talk.snapshot(),
                                                lipsync.snapshot() if lipsync is not None else None,
                                                self.results.sink_errors, self.devices.cpu_cores(),
                                                self.analytics.webhooks.figures(),
                                                self.analytics.recording_figures())

        return self.telemetry.recent_stats(build, max_age)
