"""Detection on the shared slot machinery: a stream's feed and the detection job adapter.

`StreamFeed` serves one stream's mailbox to its slot's batcher, keeping the stream's `max_fps`
phase and dropping frames older than `max_frame_age` (cause `too_old`) instead of inferring
them. `DetectJobs` turns a batch of frames into one detector call and each answer into a
`Result` (boxes in source pixels, classes filtered, per-stage timings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np

from detectors import Detections, Detector, DetectorError
from detectors.modelfile import model_kind
from detectors.runtimes import build_detector, resolve_backend
from pipeline.config import ModelConfig, PipelineConfig
from pipeline.errors import SlotError
from streams import Clock, Frame

from .devices import SlotAssignment, pinned_device
from .ingest import StreamRecord
from .results import Results
from .slots import SlotPool, Spawn, Taken

DetectorFactory = Callable[[str, ModelConfig], Detector]


def default_detector_factory(name: str, cfg: ModelConfig) -> Detector:
    """The detector for one slot. `cfg.device` is the slot's device ("cpu", "cuda:N"; "auto" = CPU)."""
    device = pinned_device(cfg.device) or "cpu"
    runtime = resolve_backend(cfg.backend, device, model_kind(cfg.weights))
    extra: dict[str, object] = {}
    if runtime == "openvino" and cfg.cpu_precision == "int8":  # a quantized graph (float ops: the CPU's fastest)
        extra = {"precision": "int8", "calibration": cfg.calibration}
    elif runtime == "openvino":
        extra = {"inference_precision": cfg.cpu_precision}
    return build_detector(runtime, name, cfg.weights, imgsz=cfg.imgsz, confidence=cfg.confidence, iou=cfg.iou,
                          device=device, threads=cfg.threads, half=cfg.half, max_batch=cfg.batch_size,
                          max_detections=cfg.max_det, agnostic=cfg.agnostic_nms, names=cfg.label_names(), **extra)


class StreamFeed:
    """One stream as a batcher member: its mailbox, rate limit and frame-age rule."""

    def __init__(self, record: StreamRecord, max_frame_age: float) -> None:
        self.key = record.name
        self.record = record
        self.mailbox = record.mailbox
        self.max_frame_age = max_frame_age
        self.next_due = 0.0

    @property
    def max_fps(self) -> float | None:
        return self.record.cfg.max_fps  # the stream's one live setting (a live retune changes it there)

    def waiting_since(self) -> float | None:
        return self.mailbox.waiting_since

    def ready_at(self, now: float) -> float | None:
        expected, interval = self.mailbox.expected_next(), self.mailbox.interval
        if self.mailbox.waiting_since is not None:
            if self.next_due <= now or expected is None or expected < now:
                return self.next_due
            # rate-limited and early: serve whichever frame is nearer the due time, this one now or
            # the next one when it arrives (holding this one until due would only age it)
            held = self.mailbox.last_put
            if held is not None and self.next_due - held <= expected - self.next_due:
                return now
            return expected
        if expected is None or interval is None or expected < now - interval:
            return None  # not measured yet, or overdue (a stalled camera never holds a batch back)
        return max(expected, self.next_due)

    def take(self, now: float, room: int) -> list[Frame]:
        frame = self.mailbox.take(now)
        if frame is None:
            return []
        if now - frame.captured_mono > self.max_frame_age:
            self.record.stats.drop("too_old")
            return []
        if self.max_fps:
            interval = 1.0 / self.max_fps
            # keep the phase (so 15 fps in, 10 fps out really gives 10; a frame taken early counts
            # for its due time), but never bank credit
            base = self.next_due if now - self.next_due < interval else now
            self.next_due = base + interval
        self.record.stats.dispatched += 1
        return [frame]

    def rate(self) -> float | None:
        interval = self.mailbox.interval
        measured = 1.0 / interval if interval else None
        rates = [r for r in (measured, self.max_fps) if r]
        return min(rates) if rates else None

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        self.mailbox.set_notify(notify)


class DetectJobs:
    """The detection job adapter: frames in, results out."""

    def __init__(self, model: str, classes: Sequence[str] | None, results: Results, clock: Clock) -> None:
        self.model = model
        self.classes = set(classes) if classes is not None else None
        self.results = results
        self.clock = clock

    def size(self, item: Frame) -> int:
        return 1

    def call(self, frames: list[Frame]) -> tuple[Any, ...]:
        # the decoded pictures themselves: each converts to BGR on the slot's thread, once
        return ([f.picture for f in frames],)

    def deliver(self, taken: list[Taken], outputs: list[Detections], shipped_at: float) -> None:
        inferred_at, now = self.clock.wall(), self.clock.mono()
        for (feed, frame), det in zip(taken, outputs, strict=True):
            record: StreamRecord = feed.record  # type: ignore[attr-defined]
            if not record.live:  # removed while in flight
                continue
            # a frame young enough when taken may have aged in the slot past its bound plus the model's own
            # time (a starved slot thread, a stalled process): it is not published as fresh, it is dropped
            # and counted like a frame too old to take
            if now - frame.captured_mono > feed.max_frame_age + det.timings_ms.get("batch_total", 0.0) / 1000:  # type: ignore[attr-defined]
                record.stats.drop("too_old")
                continue
            if self.classes is not None:
                det = _only(det, self.classes)
            timings = {"decode": frame.decode_ms, "queue": (shipped_at - frame.captured_mono) * 1000,
                       **det.timings_ms}
            self.results.emit(record, self.model, frame, det, timings, inferred_at)

    def failed(self, taken: list[Taken], exc: SlotError) -> None:
        for feed, _ in taken:
            feed.record.stats.drop("error")  # type: ignore[attr-defined]


def detect_pool(name: str, cfg: ModelConfig, layout: list[SlotAssignment], pipeline: PipelineConfig,
                factory: DetectorFactory, results: Results, clock: Clock, on_change: Callable[[], None],
                spawn: Spawn | None = None, drained: AbstractSet[str] = frozenset()) -> SlotPool:
    """The slots of one detection model, as planned (`drained`: the operator's drained devices)."""

    def make(i: int) -> Detector:
        a = layout[i]
        return factory(name, cfg.model_copy(update={"device": a.device, "threads": a.threads}))

    def check(det: Detector) -> None:
        unknown = sorted(set(cfg.classes or ()) - set(det.class_names))
        if unknown:
            raise DetectorError(f"model {name}: classes {unknown} not in model (has {', '.join(det.class_names)})")

    side = cfg.imgsz  # a calibration batch of model-sized 16:9 frames seeds the slots' service time
    settings = cfg.pool_settings(pipeline)
    frames = [np.zeros((side * 9 // 16, side, 3), np.uint8)] * cfg.batch_size
    return SlotPool(name, make, [a.device for a in layout], DetectJobs(name, cfg.classes, results, clock),
                    settings, clock=clock, calibration=((frames,), len(frames)),
                    check=check, on_change=on_change, spawn=spawn, drained=drained)


def _only(det: Detections, wanted: set[str]) -> Detections:
    return det.take([i for i, label in enumerate(det.labels) if label in wanted])
