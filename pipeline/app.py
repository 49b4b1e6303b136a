"""The running graph: sources -> schedulers -> executor slots -> publisher.

`Pipeline(config).run(stop)` owns every component's lifecycle inside one TaskGroup with named
tasks, and tears them down in order on stop: sources first (no new frames), then schedulers,
then slots, then the publisher (which says `offline`), then the embedded broker. Decode threads
talk to the loop only through `call_soon_threadsafe`. One bad stream or one failing model call
affects only that stream or that model's streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from detectors import Detections, Detector, DetectorError, YoloDetector
from streams import FAILED, STOPPED, Frame, LatestFrame, Source, SourceOptions, SourceState, redact_text

from .broker import EmbeddedBroker
from .config import Config, ModelConfig, StreamConfig
from .executor import ExecutorSlot
from .publisher import Publisher
from .result import PAYLOAD_VERSION, Result
from .scheduler import Scheduler, StreamHandle
from .stats import StreamStats

log = logging.getLogger(__name__)

DetectorFactory = Callable[[str, ModelConfig], Detector]


def default_detector_factory(name: str, cfg: ModelConfig) -> Detector:
    device = "cpu" if cfg.device == "auto" else cfg.device
    if cfg.device == "auto":
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                device = "cuda:0"
    if cfg.backend == "onnxruntime":
        from detectors.onnx import OnnxYoloDetector

        return OnnxYoloDetector(name, cfg.weights, imgsz=cfg.imgsz, confidence=cfg.confidence, iou=cfg.iou,
                                threads=cfg.threads, device=device)
    return YoloDetector(
        name, cfg.weights, imgsz=cfg.imgsz, confidence=cfg.confidence, iou=cfg.iou, device=device,
        half=cfg.half and device.startswith("cuda"), torch_threads=cfg.threads,
    )


@dataclass
class StreamRuntime:
    name: str
    cfg: StreamConfig
    latest: LatestFrame
    stats: StreamStats
    source: Source | None = None
    seq: int = 0
    state: dict[str, Any] | None = None


class Pipeline:
    """framegrid's detection graph for one config."""

    def __init__(self, config: Config, detector_factory: DetectorFactory | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.detector_factory = detector_factory or default_detector_factory
        self.clock = clock
        self.secrets = config.secrets()
        self.streams: dict[str, StreamRuntime] = {}
        self.slots: dict[str, ExecutorSlot] = {}
        self.schedulers: dict[str, Scheduler] = {}
        self.model_errors: dict[str, str] = {}
        self.broker: EmbeddedBroker | None = None
        self.publisher: Publisher | None = None
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        mqtt = self.config.mqtt
        if mqtt.url == "embedded":
            self.broker = EmbeddedBroker("127.0.0.1", mqtt.embedded_port)
            await asyncio.to_thread(self.broker.start)
            self.publisher = Publisher(mqtt, "127.0.0.1", self.broker.port, secrets=self.secrets)
        else:
            self.publisher = Publisher(mqtt, secrets=self.secrets)
        try:
            async with asyncio.TaskGroup() as tg:
                pub_task = tg.create_task(self.publisher.run(), name="mqtt.publisher")
                for name, stream_cfg in self.config.streams.items():
                    if stream_cfg.enabled:
                        self._add_runtime(name, stream_cfg)
                await self._load_models(tg)
                for rt in self.streams.values():
                    self._start_stream(rt)
                self._sched_tasks.append(tg.create_task(self._stats_loop(), name="stats"))
                self.ready.set()
                try:
                    await stop.wait()
                finally:
                    await self._shutdown(pub_task)
        finally:
            if self.broker is not None:
                await asyncio.to_thread(self.broker.stop)

    async def _shutdown(self, pub_task: asyncio.Task[None]) -> None:
        log.info("stopping")
        sources = [rt.source for rt in self.streams.values() if rt.source is not None]
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in sources))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                await slot.close()
        for rt in self.streams.values():
            self._publish_state(rt, STOPPED, None)
        self._publish_stats()
        assert self.publisher is not None
        await self.publisher.close()
        done, _ = await asyncio.wait({pub_task}, timeout=10)
        if not done:
            log.warning("mqtt: %d message(s) not delivered at shutdown", self.publisher.buffered)
            pub_task.cancel()

    @property
    def _tasks(self) -> list[asyncio.Task[Any]]:
        return [t for t in getattr(self, "_sched_tasks", []) if not t.done()]

    # -- models and slots ------------------------------------------------------------------------
    async def _load_models(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        self._sched_tasks: list[asyncio.Task[Any]] = []
        for name in sorted({rt.cfg.model for rt in self.streams.values()}):
            await self._load_model(name)

    async def _load_model(self, name: str) -> bool:
        """Load a model onto a new slot and start its scheduler; False (streams marked failed) on error."""
        mcfg = self.config.models[name]
        try:
            detector = self.detector_factory(name, mcfg)
            slot = ExecutorSlot(f"{name}.0", detector)
            await slot.start()
            if mcfg.classes is not None:
                unknown = sorted(set(mcfg.classes) - set(detector.class_names))
                if unknown:
                    raise DetectorError(f"model {name}: classes {unknown} not in model "
                                        f"(has {', '.join(detector.class_names)})")
        except Exception as exc:
            msg = redact_text(str(exc), self.secrets)
            log.error("model %s: %s", name, msg)
            self.model_errors[name] = msg
            for rt in self.streams.values():
                if rt.cfg.model == name:
                    self._publish_state(rt, FAILED, f"model {name} unavailable: {msg}")
            return False
        self.model_errors.pop(name, None)
        self.slots[name] = slot
        sched = Scheduler(
            slot,
            self._on_results_for(name),
            batch_size=mcfg.batch_size,
            batch_timeout=self.config.pipeline.batch_timeout_ms / 1000,
            max_frame_age=self.config.pipeline.max_frame_age,
        )
        self.schedulers[name] = sched
        self._sched_tasks.append(self._tg.create_task(sched.run(), name=f"executor[{name}.0].scheduler"))
        return True

    # -- runtime changes (the Python API the CLI and HTTP API build on) -------------------------------
    async def add_stream(self, name: str, cfg: StreamConfig) -> None:
        """Start a stream while running. Its model must be in the config; it is loaded if unused so far.

        Raises ValueError for a bad name, a duplicate, or an unknown model; a model that fails to
        load leaves the stream in state `failed` (as at start-up).
        """
        import re

        from .config import NAME_PATTERN

        if not self.ready.is_set():
            raise RuntimeError("pipeline is not running")
        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"stream name {name!r} must match {NAME_PATTERN}")
        if name in self.streams:
            raise ValueError(f"stream {name} already exists")
        if cfg.model not in self.config.models:
            raise ValueError(f"stream {name}: unknown model '{cfg.model}'")
        rt = self._add_runtime(name, cfg)
        self.secrets = tuple({*self.secrets, *_url_secret(cfg.url)})
        if cfg.model not in self.schedulers and not await self._load_model(cfg.model):
            return
        self._start_stream(rt)
        log.info("stream %s: added (model %s)", name, cfg.model)

    async def remove_stream(self, name: str) -> None:
        """Stop a stream while running, publish `stopped` and clear its retained state."""
        rt = self.streams.get(name)
        if rt is None:
            raise KeyError(f"no stream {name}")
        sched = self.schedulers.get(rt.cfg.model)
        if sched is not None:
            sched.remove_stream(name)
        if rt.source is not None:
            await asyncio.to_thread(rt.source.stop)
        self._publish_state(rt, STOPPED, None)
        del self.streams[name]
        if self.publisher is not None:  # an empty retained message deletes the retained state
            topic = self.publisher.topic("streams", name, "state")
            self.publisher.publish(topic, b"", qos=self.config.mqtt.state_qos, retain=True)
        log.info("stream %s: removed", name)

    def _on_results_for(self, model: str) -> Callable[[list[tuple[StreamHandle, Frame, Detections,
                                                                      dict[str, float]]]], None]:
        wanted = self.config.models[model].classes

        def on_results(batch: list[tuple[StreamHandle, Frame, Detections, dict[str, float]]]) -> None:
            inferred_at = self.clock()
            for handle, frame, det, timings in batch:
                rt = self.streams.get(handle.stream)
                if rt is None:  # removed while in flight
                    continue
                if wanted is not None:
                    det = _filter(det, set(wanted))
                rt.seq += 1
                result = Result(
                    stream=rt.name, seq=rt.seq, model=model, frame_index=frame.index, pts=frame.pts,
                    captured_at=frame.captured_at, inferred_at=inferred_at, width=frame.width,
                    height=frame.height, detections=det, timings_ms=timings,
                )
                self._publish_result(rt, result)

        return on_results

    # -- streams ---------------------------------------------------------------------------------
    def _add_runtime(self, name: str, cfg: StreamConfig) -> StreamRuntime:
        rt = StreamRuntime(name, cfg, LatestFrame(name), StreamStats(name))
        self.streams[name] = rt
        return rt

    def _start_stream(self, rt: StreamRuntime) -> None:
        sched = self.schedulers.get(rt.cfg.model)
        if sched is None:
            return  # its model failed to load; state already says so
        rt.stats.restart_window()  # rates count from here, not from model loading
        handle = StreamHandle(rt.name, rt.latest, rt.stats, rt.cfg.max_fps)
        sched.add_stream(handle)
        opts = SourceOptions(
            open_timeout=rt.cfg.open_timeout, stall_timeout=rt.cfg.stall_timeout, transport=rt.cfg.transport,
            realtime=rt.cfg.realtime, loop=rt.cfg.loop, reconnect_cap=rt.cfg.reconnect_cap,
            max_retries=rt.cfg.max_retries, decode_threads=self.config.pipeline.decode_threads,
            ffmpeg_options=dict(rt.cfg.ffmpeg_options),
        )
        rt.source = Source(rt.name, rt.cfg.url, rt.latest.put, self._state_from_thread, opts)
        rt.source.start()

    def _state_from_thread(self, state: SourceState) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_source_state, state)

    def _on_source_state(self, state: SourceState) -> None:
        rt = self.streams.get(state.stream)
        if rt is None:
            return
        self._publish_state(rt, state.state, state.error, state.since, state.reconnects)

    # -- publishing ------------------------------------------------------------------------------
    def _publish_result(self, rt: StreamRuntime, result: Result) -> None:
        assert self.publisher is not None
        payload = result.payload(self.clock())
        rt.stats.record(payload["latency_ms"], result.timings_ms)
        self.publisher.publish(self.publisher.topic("streams", rt.name, "detections"), payload)

    def _publish_state(self, rt: StreamRuntime, state: str, error: str | None,
                       since: float | None = None, reconnects: int | None = None) -> None:
        prev = rt.state or {}
        if prev.get("state") == STOPPED:
            return
        payload = {
            "v": PAYLOAD_VERSION,
            "stream": rt.name,
            "state": state,
            "since": round(since if since is not None else (prev.get("since") if prev.get("state") == state
                                                            else time.time()), 3),
            "reconnects": reconnects if reconnects is not None else prev.get("reconnects", 0),
            "error": redact_text(error, self.secrets) if error else None,
            "model": rt.cfg.model,
            "url": redact_text(rt.cfg.url, self.secrets),
        }
        rt.state = payload
        if self.publisher is not None:
            self.publisher.publish(self.publisher.topic("streams", rt.name, "state"), payload,
                                   qos=self.config.mqtt.state_qos, retain=True)

    def _sync_counters(self) -> None:
        for rt in self.streams.values():
            rt.stats.decoded = rt.latest.received
            rt.stats.drops["stale"] = rt.latest.dropped_stale

    def stats_payload(self) -> dict[str, Any]:
        self._sync_counters()
        now = time.monotonic()
        streams = {}
        for rt in self.streams.values():
            rt.stats.tick(now)
            snap = rt.stats.snapshot()
            snap["state"] = (rt.state or {}).get("state", "starting")
            streams[rt.name] = snap
        pub = self.publisher.counters() if self.publisher else {}
        return {
            "v": PAYLOAD_VERSION,
            "at": round(time.time(), 3),
            "uptime_s": round(time.time() - self.started_at, 1),
            "streams": streams,
            "mqtt": pub,
            "executors": {
                s.name: {"healthy": s.healthy, "batches": s.batches, "frames": s.frames, "errors": s.errors,
                         "service_ms_per_frame": None if s.service_ms_per_frame is None
                         else round(s.service_ms_per_frame, 2)}
                for s in self.slots.values()
            },
        }

    def _publish_stats(self) -> None:
        if self.publisher is None:
            return
        self.last_stats = self.stats_payload()
        self.publisher.publish(self.publisher.topic("stats"), self.last_stats, qos=self.config.mqtt.stats_qos)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.mqtt.stats_interval)
            self._publish_stats()


def _url_secret(url: str) -> tuple[str, ...]:
    from urllib.parse import urlsplit

    pw = urlsplit(url).password
    return (pw,) if pw else ()


def _filter(det: Detections, wanted: set[str]) -> Detections:
    keep = [i for i, label in enumerate(det.labels) if label in wanted]
    if len(keep) == len(det.labels):
        return det
    return Detections(det.boxes[keep], det.confidences[keep], det.class_ids[keep],
                      tuple(det.labels[i] for i in keep), det.timings_ms)
