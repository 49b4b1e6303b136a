"""Prometheus metrics (`GET /metrics`), with prometheus-client's own exposition.

Two kinds, each read from the one place its fact lives:
- histograms of latency (capture to publish, and per stage) observed as each result leaves
  (`LatencyMetrics` is a `ResultSink`);
- everything else collected at scrape time from the stream records, the slot pools, the device
  facts, the publisher and the talk sessions (`PipelineCollector`), so no counter is kept twice.

Each pipeline gets its own registry (several can live in one test process).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.core.stats import DROP_CAUSES
from streams import StreamState
from streams.disk import disk_figures
from streams.loopwatch import loop_figures

if TYPE_CHECKING:
    from pipeline.app import Pipeline
    from pipeline.core.devices import DeviceInfo
    from pipeline.core.results import Result

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("decode", "queue", "preprocess", "inference", "postprocess", "publish")
STATES = tuple(s.value for s in StreamState)


class LatencyMetrics:
    """Histograms of each published result's latency: capture -> publish, and per stage."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram("framegrid_latency_seconds", "Capture to publish latency of a result",
                                 ["stream"], buckets=LATENCY_BUCKETS, registry=registry)
        self.stage = Histogram("framegrid_stage_seconds", "Time a result spent in each pipeline stage",
                               ["stream", "stage"], buckets=STAGE_BUCKETS, registry=registry)

    def emit(self, result: Result) -> None:
        name = result.stream.name
        self.latency.labels(name).observe(max(0.0, result.latency_ms / 1000))
        for stage, ms in result.timings_ms.items():
            if stage in STAGES:
                self.stage.labels(name, stage).observe(max(0.0, ms / 1000))

    def forget(self, stream: str) -> None:
        """A deleted stream's series go (a new stream of the same name starts from zero)."""
        for hist, labels in ((self.latency, (stream,)), *((self.stage, (stream, s)) for s in STAGES)):
            with contextlib.suppress(KeyError):
                hist.remove(*labels)


class PipelineCollector(Collector):
    """Counters and gauges read from the running pipeline at each scrape."""

    def __init__(self, pipeline: Pipeline, devices: Callable[[], list[DeviceInfo]]) -> None:
        self.pipeline = pipeline
        self.devices = devices

    def collect(self) -> Iterator[Metric]:
        p = self.pipeline
        if not p.ready.is_set():
            return
        yield from self._streams(p)
        yield from self._slots(p)
        yield from self._devices()
        yield from self._mqtt(p)
        yield from self._talk(p)
        yield from self._events(p)
        yield from self._load(p)

    def _load(self, p: Pipeline) -> Iterator[Metric]:
        verdict = p.telemetry.published_verdict  # as of the last stats interval
        g = GaugeMetricFamily("framegrid_overloaded", "1 while the process falls behind its cameras, by reason "
                              "(decode-bound, inference-bound)", labels=["reason"])
        for reason in ("decode-bound", "inference-bound"):
            g.add_metric([reason], 1.0 if reason in verdict.reasons else 0.0)
        yield g
        full = GaugeMetricFamily("framegrid_disk_full", "1 while a writer's last write failed for want of space "
                                 "(event store, snapshots, clips, overlay, talk jobs, avatar cache)", labels=["writer"])
        failed = CounterMetricFamily("framegrid_disk_write_errors", "Writes that failed, by writer", labels=["writer"])
        for writer, d in disk_figures().items():
            full.add_metric([writer], int(d["full"]))
            failed.add_metric([writer], d["errors"])
        yield from (full, failed)
        watch = loop_figures()  # (scraped on the loop itself)
        if watch is not None:
            stalls = CounterMetricFamily("framegrid_loop_stalls", "Times the event loop did not turn for a second "
                                         "or more (the log names the function that held it)")
            stalls.add_metric([], watch["stalls"])
            longest = GaugeMetricFamily("framegrid_loop_stall_longest_seconds", "The longest event-loop stall so "
                                        "far (including one going on now)")
            longest.add_metric([], watch["longest_s"])
            yield from (stalls, longest)

    def _events(self, p: Pipeline) -> Iterator[Metric]:
        events = CounterMetricFamily("framegrid_events", "Events published on <prefix>/events",
                                     labels=["stream", "type"])
        if p.analytics.engine is not None:
            for (stream, kind), n in sorted(p.analytics.engine.by_type.items()):
                events.add_metric([stream, kind], n)
        yield events
        flickers = CounterMetricFamily("framegrid_tracks_without_event", "Tracks gone before they lasted "
                                       "events.min_seen_s (a flicker or a duplicate box): no event", labels=["stream"])
        if p.analytics.engine is not None:
            for stream, ev in sorted(p.analytics.engine.streams.items()):
                flickers.add_metric([stream], ev.discarded)
        yield flickers
        dropped = CounterMetricFamily("framegrid_event_store_dropped", "Event writes dropped: the store's queue "
                                      "was full (its disk could not keep up)")
        if p.analytics.store is not None:
            dropped.add_metric([], p.analytics.store.dropped)
        yield dropped
        hooks = CounterMetricFamily("framegrid_webhook_events", "Events per webhook by outcome: sent, failed "
                                    "(after its retries, or refused), dropped (its queue was full)",
                                    labels=["hook", "outcome"])
        for name, f in p.analytics.webhooks.figures().items():
            for outcome in ("sent", "failed", "dropped"):
                hooks.add_metric([name, outcome], f[outcome])
        yield hooks
        recording = p.analytics.recording_figures()
        if recording is not None:
            clips = CounterMetricFamily("framegrid_clips", "Event clips by outcome: written, failed (not kept)",
                                        labels=["stream", "outcome"])
            full = GaugeMetricFamily("framegrid_recording_disk_full", "1 while a stream's last clip failed for "
                                     "want of disk space", labels=["stream"])
            for name, r in recording["streams"].items():
                clips.add_metric([name, "written"], r["clips_written"])
                clips.add_metric([name, "failed"], r["clips_failed"])
                full.add_metric([name], int(r["disk_full"]))
            media = GaugeMetricFamily("framegrid_media_bytes", "Bytes of event clips and snapshots kept")
            media.add_metric([], recording["media_bytes"])
            yield from (clips, full, media)

    def _streams(self, p: Pipeline) -> Iterator[Metric]:
        decoded = CounterMetricFamily("framegrid_frames_decoded", "Frames decoded", labels=["stream"])
        dispatched = CounterMetricFamily("framegrid_frames_dispatched", "Frames sent to a model",
                                         labels=["stream"])
        published = CounterMetricFamily("framegrid_frames_published", "Results published", labels=["stream"])
        drops = CounterMetricFamily("framegrid_frames_dropped", "Frames dropped, by reason",
                                    labels=["stream", "reason"])
        reconnects = CounterMetricFamily("framegrid_stream_reconnects", "Reconnects of a stream's source",
                                         labels=["stream"])
        errors = CounterMetricFamily("framegrid_decode_errors", "Packets or frames the decoder rejected",
                                     labels=["stream"])
        corrupt = CounterMetricFamily("framegrid_corrupt_frames", "Frames decoded with concealed damage (kept)",
                                      labels=["stream"])
        decode_cpu = CounterMetricFamily("framegrid_decode_cpu_seconds", "CPU seconds the stream's decoder spent "
                                         "decoding (its rate is the cores decoding takes)", labels=["stream"])
        state = GaugeMetricFamily("framegrid_stream_state", "1 for the stream's current state",
                                  labels=["stream", "state"])
        fps = GaugeMetricFamily("framegrid_stream_fps", "Frames per second in (decoded) and out (published)",
                                labels=["stream", "direction"])
        for name, r in p.ingest.records.items():
            st = r.stats
            decoded.add_metric([name], r.mailbox.received)
            dispatched.add_metric([name], st.dispatched)
            published.add_metric([name], r.seq)
            for reason in DROP_CAUSES:
                n = r.mailbox.dropped_stale if reason == "stale" else st.drops.get(reason, 0)
                drops.add_metric([name, reason], n)
            reconnects.add_metric([name], r.reconnects)
            errors.add_metric([name], r.source.decode_errors if r.source is not None else 0)
            corrupt.add_metric([name], r.source.corrupt_frames if r.source is not None else 0)
            decode_cpu.add_metric([name], r.source.decode_cpu_s if r.source is not None else 0.0)
            for s in STATES:
                state.add_metric([name, s], 1.0 if r.state.value == s else 0.0)
            fps.add_metric([name, "in"], st.fps_in)
            fps.add_metric([name, "out"], st.fps_processed)
        yield from (decoded, dispatched, published, drops, reconnects, errors, corrupt, decode_cpu, state, fps)

    def _slots(self, p: Pipeline) -> Iterator[Metric]:
        busy = CounterMetricFamily("framegrid_slot_busy_seconds", "Seconds an executor slot spent in model calls "
                                   "(its rate is the busy fraction)", labels=["slot", "model", "device"])
        batches = HistogramMetricFamily("framegrid_batch_size", "Inputs per model call", labels=["slot", "model"])
        frames = CounterMetricFamily("framegrid_slot_frames", "Outputs of a slot's model calls",
                                     labels=["slot", "model", "device"])
        healthy = GaugeMetricFamily("framegrid_slot_healthy", "1 when the slot serves", labels=["slot", "model",
                                                                                             "device", "state"])
        queue = GaugeMetricFamily("framegrid_slot_queue_depth", "Members of the slot with a frame waiting",
                                  labels=["slot", "model", "device"])
        restarts = GaugeMetricFamily("framegrid_slot_restarts", "Restarts within the restart window",
                                     labels=["slot", "model", "device"])
        for model, pool in p.all_pools().items():
            for name, slot in pool.slots.items():
                record = pool.placer.slots[name]
                labels = [name, model, slot.device]
                busy.add_metric(labels, slot.busy_s)
                frames.add_metric(labels, slot.frames)
                healthy.add_metric([*labels, record.state.value], 1.0 if record.healthy else 0.0)
                restarts.add_metric(labels, len(record.restarts))
                waiting = sum(1 for k in record.members if k in pool.feeds and pool.feeds[k].waiting_since()
                              is not None)
                queue.add_metric(labels, waiting)
                buckets = [(str(bound), sum(c for size, c in slot.batch_sizes.items() if size <= bound))
                           for bound in BATCH_BUCKETS]
                count = sum(slot.batch_sizes.values())
                total = float(sum(size * c for size, c in slot.batch_sizes.items()))
                buckets.append(("+Inf", count))
                batches.add_metric([name, model], buckets, total)
        yield from (busy, frames, batches, healthy, queue, restarts)

    def _devices(self) -> Iterator[Metric]:
        total = GaugeMetricFamily("framegrid_device_memory_total_bytes", "Device memory", labels=["device"])
        used = GaugeMetricFamily("framegrid_device_memory_used_bytes", "Device memory in use", labels=["device"])
        util = GaugeMetricFamily("framegrid_device_utilization_ratio", "Device busy fraction (0-1)",
                                 labels=["device"])
        temp = GaugeMetricFamily("framegrid_device_temperature_celsius", "GPU temperature", labels=["device"])
        for d in self.devices():
            total.add_metric([d.id], d.total_bytes)
            used.add_metric([d.id], max(0, d.total_bytes - d.free_bytes))
            if d.utilization is not None:
                util.add_metric([d.id], d.utilization / 100)
            if d.temperature_c is not None:
                temp.add_metric([d.id], d.temperature_c)
        yield from (total, used, util, temp)

    def _mqtt(self, p: Pipeline) -> Iterator[Metric]:
        c: dict[str, Any] = p.publisher.counters()
        yield GaugeMetricFamily("framegrid_mqtt_connected", "1 while connected to the broker",
                                value=1.0 if c["connected"] else 0.0)
        yield GaugeMetricFamily("framegrid_mqtt_buffered_messages", "Messages waiting to be sent",
                                value=c["buffered"])
        yield CounterMetricFamily("framegrid_mqtt_published_messages", "Messages the broker acknowledged",
                                  value=c["published"])
        dropped = CounterMetricFamily("framegrid_mqtt_dropped_messages", "Messages dropped", labels=["reason"])
        dropped.add_metric(["overflow"], c["dropped_overflow"])
        dropped.add_metric(["unencodable"], c["dropped_unencodable"])
        yield dropped
        yield CounterMetricFamily("framegrid_mqtt_connects", "Successful connections", value=c["connects"])

    def _talk(self, p: Pipeline) -> Iterator[Metric]:
        fps = GaugeMetricFamily("framegrid_talk_session_fps", "Frames per second a live session outputs",
                                labels=["session"])
        lag = GaugeMetricFamily("framegrid_talk_session_latency_seconds", "Median audio-to-frame latency",
                                labels=["session"])
        late = CounterMetricFamily("framegrid_talk_session_late_frames", "Frames shown late", labels=["session"])
        for name, snap in p.talk.snapshot().items():
            if snap.get("output_fps") is not None:
                fps.add_metric([name], snap["output_fps"])
            if snap.get("latency_ms_p50") is not None:
                lag.add_metric([name], snap["latency_ms_p50"] / 1000)
            late.add_metric([name], snap.get("late", 0))
        yield from (fps, lag, late)


def make_registry(pipeline: Pipeline, devices: Callable[[], list[DeviceInfo]]) -> tuple[CollectorRegistry,
                                                                                       LatencyMetrics]:
    registry = CollectorRegistry(auto_describe=False)
    add_standard_collectors(registry)
    registry.register(PipelineCollector(pipeline, devices))
    return registry, LatencyMetrics(registry)


def add_standard_collectors(registry: CollectorRegistry) -> None:
    """The process_* (CPU, memory, descriptors) and python_* (GC, version) series every exporter
    carries; each pipeline has its own registry (several live in one test process), so they are
    registered here rather than taken from the global one."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
