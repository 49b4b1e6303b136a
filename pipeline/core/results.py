"""Results: the value that leaves the pipeline for one processed frame, and where it goes.

`Results.emit` is the one output seam: it numbers the stream's results (on the loop, so in
order), stamps the publish stage, records the stream's latency, and hands the `Result` to every
`ResultSink`: the MQTT publisher always; the benchmark's recorder, and later the HTTP API or a
tracker, by `Pipeline(..., sinks=[...])` or `pipeline.results.add_sink`. A sink that raises
costs only its own copy of that result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from detectors import Detections
from pipeline.payloads import DetectionsPayload
from pipeline.topics import PAYLOAD_VERSION
from streams import Clock, Frame

if TYPE_CHECKING:
    from pipeline.mqtt.publisher import Publisher

    from .ingest import StreamRecord

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class Result:
    """Detections for one frame (boxes in source pixels) plus everything needed to judge their timeliness."""

    stream: StreamRecord
    seq: int
    model: str
    frame: Frame
    inferred_at: float  # unix s: model returned
    published_at: float  # unix s: handed to the sinks
    detections: Detections
    timings_ms: dict[str, float] = field(default_factory=dict)
    track_ids: np.ndarray | None = None  # one per detection (0: no confirmed track yet); None: not tracked
    attributes: list[dict[str, Any] | None] | None = None  # per detection, secondary models' answers
    published_mono: float = 0.0  # monotonic s at publish: with the frame's `captured_mono`, its latency

    @property
    def latency_ms(self) -> float:
        """Capture to publish, on the monotonic clock (a wall-clock step in between does not count);
        on the wall clock for a frame made without a monotonic stamp."""
        if self.frame.captured_mono and self.published_mono:
            return (self.published_mono - self.frame.captured_mono) * 1000
        return (self.published_at - self.frame.captured_at) * 1000

    def payload(self) -> DetectionsPayload:
        """The published result: boxes, width and height in the pixels of the stream's `url` (its main
        stream when a substream was detected on)."""
        f = self.frame
        main = self.stream.main_scale(f.width, f.height)
        width, height = (main[0], main[1]) if main is not None else (f.width, f.height)
        return {
            "v": PAYLOAD_VERSION,
            "stream": self.stream.name,
            "seq": self.seq,
            "model": self.model,
            "frame": f.index,
            "pts": None if f.pts is None else round(f.pts, 4),
            "captured_at": round(f.captured_at, 6),
            "inferred_at": round(self.inferred_at, 6),
            "published_at": round(self.published_at, 6),
            "latency_ms": round(self.latency_ms, 2),
            "width": width,
            "height": height,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
            "detections": self._detections_json(main),
        }

    def _detections_json(self, main: tuple[int, int, float, float] | None = None) -> list[dict[str, Any]]:
        out = self.detections.to_json()
        if main is not None:
            sx, sy = main[2], main[3]
            for d, b in zip(out, self.detections.boxes, strict=True):
                d["box"] = [round(float(b[0]) * sx, 1), round(float(b[1]) * sy, 1), round(float(b[2]) * sx, 1),
                            round(float(b[3]) * sy, 1)]
        if self.track_ids is not None:
            for d, tid in zip(out, self.track_ids, strict=True):
                d["track_id"] = int(tid) or None
        if self.attributes is not None:
            for d, attrs in zip(out, self.attributes, strict=True):
                if attrs:
                    d["attributes"] = attrs
        return out


class ResultSink(Protocol):
    """A consumer of results. `emit` runs on the loop: it must not block (queue, then return)."""

    def emit(self, result: Result) -> None: ...


class MqttResults:
    """Every result as JSON on `<prefix>/streams/<stream>/detections`."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def emit(self, result: Result) -> None:
        payload = result.payload()
        if self.publisher.node:
            payload["node"] = self.publisher.node  # on a cluster: the node that made it
        self.publisher.publish(self.publisher.topics.detections(result.stream.name), payload)


class Results:
    def __init__(self, clock: Clock, sinks: list[ResultSink] | None = None) -> None:
        self.clock = clock
        self.sinks: list[ResultSink] = list(sinks or [])
        self.sink_errors = 0  # published in stats

    def add_sink(self, sink: ResultSink) -> None:
        self.sinks.append(sink)

    def emit(self, record: StreamRecord, model: str, frame: Frame, det: Detections, timings: dict[str, float],
             inferred_at: float) -> None:
        record.seq += 1
        if record.filter is not None:
            det = record.filter.apply(det, frame.width, frame.height)
        ids = None
        if record.tracker is not None:
            t0 = time.perf_counter()
            image = frame.image if record.tracker.wants_image else None  # converted by the slot already
            try:
                ids = record.tracker.update(det, frame.captured_mono or frame.captured_at, image)  # monotonic
            except Exception:  # the result is still published, untracked
                self.sink_errors += 1
                log.exception("tracking failed on %s #%d", record.name, record.seq)
            timings["track"] = (time.perf_counter() - t0) * 1000
        attributes = None
        if record.secondary is not None:
            try:
                attributes = record.secondary.attributes(det, frame, ids)
            except Exception:
                self.sink_errors += 1
                log.exception("secondary models failed on %s #%d", record.name, record.seq)
        # stamped once, on both clocks, as the result is handed to the sinks: the publish stage (model
        # returned -> sinks, filter, tracking and secondary models included; the MQTT client's own
        # send/ack time is in stats as mqtt.send_ms)
        now, now_mono = self.clock.stamp()
        timings["publish"] = max(0.0, (now - inferred_at) * 1000)
        result = Result(record, record.seq, model, frame, inferred_at, now, det, timings, ids, attributes, now_mono)
        record.stats.record(result.latency_ms, timings)
        for sink in self.sinks:
            try:
                sink.emit(result)
            except Exception:
                self.sink_errors += 1
                log.exception("result sink %s failed on %s #%d", type(sink).__name__, record.name, result.seq)
