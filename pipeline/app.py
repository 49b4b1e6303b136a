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
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from detectors import Detections, Detector, DetectorError
from detectors.runtimes import build_detector, resolve_backend
from streams import (
    FAILED,
    STOPPED,
    Backoff,
    Frame,
    LatestFrame,
    Source,
    SourceOptions,
    SourceState,
    redact_text,
    url_password,
)

from .broker import EmbeddedBroker
from .config import Config, ConfigError, ModelConfig, StreamConfig
from .devices import (
    GB,
    DeviceInfo,
    SlotAssignment,
    decode_threads,
    discover,
    pinned_device,
    plan_slots,
    slot_layout,
)
from .executor import ExecutorSlot
from .lipsync import LipSyncError, LipSyncPool, musetalk_pool
from .memory import fix_mmap_threshold
from .placement import PlacementError, Placer
from .publisher import Publisher
from .result import PAYLOAD_VERSION, Result
from .scheduler import Scheduler, StreamHandle
from .stats import StreamStats

log = logging.getLogger(__name__)

DetectorFactory = Callable[[str, ModelConfig], Detector]


def default_detector_factory(name: str, cfg: ModelConfig) -> Detector:
    """The detector for one slot. `cfg.device` is the slot's device ("cpu", "cuda:N"; "auto" = CPU)."""
    device = pinned_device(cfg.device) or "cpu"
    runtime = resolve_backend(cfg.backend, device)
    extra = {"inference_precision": cfg.cpu_precision} if runtime == "openvino" else {}
    return build_detector(runtime, name, cfg.weights, imgsz=cfg.imgsz, confidence=cfg.confidence, iou=cfg.iou,
                          device=device, threads=cfg.threads, half=cfg.half, max_batch=cfg.batch_size, **extra)


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
                 clock: Callable[[], float] = time.time, devices: list[DeviceInfo] | None = None) -> None:
        self.config = config
        self.device_facts = devices  # discovered at start when not given (tests give invented ones)
        self.layouts: dict[str, list[SlotAssignment]] = {}
        self.runtimes: dict[str, str] = {}
        self.detector_factory = detector_factory or default_detector_factory
        self.clock = clock
        self.secrets = config.secrets()
        self.streams: dict[str, StreamRuntime] = {}
        self.slots: dict[str, ExecutorSlot] = {}  # by slot name, "<model>.<index>"
        self.schedulers: dict[str, Scheduler] = {}  # by slot name
        self.model_slots: dict[str, list[str]] = {}
        self.slot_state: dict[str, str] = {}
        self.slot_restarts: dict[str, list[float]] = {}
        self.placers: dict[str, Placer] = {}  # per model: streams move only between slots of their model
        self.model_errors: dict[str, str] = {}
        self.sessions: dict[str, Any] = {}  # talking-head sessions by name (talkinghead.TalkSession)
        self.lipsync: LipSyncPool | None = None  # MuseTalk slots, started with the first musetalk session
        self._lipsync_frontend: Any = None  # VAE + Whisper for the sessions' side (talkinghead.musetalk.MuseTalk)
        self._lipsync_lock = asyncio.Lock()
        self.broker: EmbeddedBroker | None = None
        self.publisher: Publisher | None = None
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        fix_mmap_threshold(self.config.pipeline.malloc_mmap_threshold_kb)  # before the first frame is decoded
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
                for name, tcfg in self.config.talk.items():
                    if tcfg.enabled:
                        with contextlib.suppress(Exception):  # reported on its state topic; others run on
                            await self.start_session(name, tcfg)
                self._sched_tasks.append(tg.create_task(self._stats_loop(), name="stats"))
                self._sched_tasks.append(tg.create_task(self._rebalance_loop(), name="supervisor.rebalance"))
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
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in sources),
                             *(self.stop_session(name) for name in list(self.sessions)))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                await slot.close()
        if self.lipsync is not None:
            with contextlib.suppress(Exception):
                await self.lipsync.close()
        for rt in self.streams.values():
            self._publish_state(rt, STOPPED, None)
        self._publish_stats()
        assert self.publisher is not None
        await self.publisher.close()
        done, _ = await asyncio.wait({pub_task}, timeout=10)
        if not done:
            log.warning("mqtt: %d message(s) not delivered at shutdown", self.publisher.buffered)
            pub_task.cancel()
        # the whole account, once: every result was acknowledged by the broker, dropped, or is left over
        final = {**self.publisher.counters(), "results": {rt.name: rt.seq for rt in self.streams.values()}}
        log.info("mqtt: final account %s", json.dumps(final, separators=(",", ":")))

    @property
    def _tasks(self) -> list[asyncio.Task[Any]]:
        return [t for t in getattr(self, "_sched_tasks", []) if not t.done()]

    # -- models and slots ------------------------------------------------------------------------
    def plan(self, models: list[str] | None = None) -> dict[str, list[SlotAssignment]]:
        """Decide each model's slots (device, threads) and runtime before anything is loaded.

        Raises ConfigError when models would put two different inference runtimes on the CPU of
        this one process (they would fight over the same cores).
        """
        if self.device_facts is None:
            self.device_facts = discover()
        dcfg = self.config.devices
        names = models if models is not None else sorted({rt.cfg.model for rt in self.streams.values()})
        for name in names:
            mcfg = self.config.models[name]
            plans = plan_slots(self.device_facts, int((mcfg.slot_memory_gb or dcfg.slot_memory_gb) * GB),
                               dcfg.usable_fraction, dict(dcfg.overrides), dcfg.cpu_slots, dcfg.cpu_threads_per_slot,
                               use_cpu_with_gpus=dcfg.use_cpu_with_gpus)
            try:
                layout = slot_layout(plans, mcfg.slots, pinned_device(mcfg.device), mcfg.threads)
            except ValueError as exc:
                raise ConfigError([(f"models.{name}.device", str(exc))]) from exc
            self.layouts[name] = layout
            if any(a.device == "cpu" for a in layout):
                try:
                    self.runtimes[name] = resolve_backend(mcfg.backend, "cpu")
                except ValueError as exc:
                    raise ConfigError([(f"models.{name}.backend", str(exc))]) from exc
        cpu_runtimes = {self.runtimes[n] for n in self.runtimes}
        if len(cpu_runtimes) > 1:
            detail = ", ".join(f"{n}: {r}" for n, r in sorted(self.runtimes.items()))
            raise ConfigError([("models.*.backend", f"one inference runtime per process on the CPU, got {detail}; "
                                                      "set the same backend for these models")])
        return self.layouts

    async def _load_models(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        self._sched_tasks: list[asyncio.Task[Any]] = []
        self._slot_tasks: dict[str, asyncio.Task[Any]] = {}
        self.plan()
        for name, layout in self.layouts.items():
            log.info("model %s: %d slot(s): %s%s", name, len(layout),
                     ", ".join(f"{a.device}" + (f" ({a.threads} threads)" if a.threads else "") for a in layout),
                     f"; CPU runtime {self.runtimes[name]}" if name in self.runtimes else "")
        for name in sorted({rt.cfg.model for rt in self.streams.values()}):
            await self._load_model(name)

    async def _load_model(self, name: str) -> bool:
        """Start the model's slots; False (its streams marked failed) when none could start."""
        if name not in self.layouts:
            self.plan([name])
        self.model_slots[name] = []
        errors = []
        for i in range(len(self.layouts[name])):
            err = await self._start_slot(name, i)
            if err is None:
                self.model_slots[name].append(f"{name}.{i}")
            else:
                errors.append(err)
        if self.model_slots[name]:
            self.model_errors.pop(name, None)
            self._publish_devices()
            return True
        msg = errors[0]
        log.error("model %s: %s", name, msg)
        self.model_errors[name] = msg
        for rt in self.streams.values():
            if rt.cfg.model == name:
                self._publish_state(rt, FAILED, f"model {name} unavailable: {msg}")
        return False

    async def _new_slot(self, model: str, index: int) -> ExecutorSlot:
        assign = self.layouts[model][index]
        mcfg = self.config.models[model].model_copy(update={"device": assign.device, "threads": assign.threads})
        detector = self.detector_factory(model, mcfg)
        slot = ExecutorSlot(f"{model}.{index}", detector, device=assign.device, hang_timeout=mcfg.hang_timeout)
        side = mcfg.imgsz  # a calibration batch of model-sized 16:9 frames seeds the slot's service time
        await slot.start(calibrate=mcfg.batch_size, frame_shape=(side * 9 // 16, side, 3))
        if mcfg.classes is not None:
            unknown = sorted(set(mcfg.classes) - set(detector.class_names))
            if unknown:
                await slot.close()
                raise DetectorError(f"model {model}: classes {unknown} not in model "
                                    f"(has {', '.join(detector.class_names)})")
        return slot

    async def _start_slot(self, model: str, index: int) -> str | None:
        """Start slot `model.index` and its scheduler; the error message when it cannot."""
        mcfg = self.config.models[model]
        try:
            slot = await self._new_slot(model, index)
        except Exception as exc:
            return redact_text(str(exc), self.secrets)
        sched = Scheduler(
            slot,
            self._on_results_for(model),
            batch_size=mcfg.batch_size,
            batch_timeout=self.config.pipeline.batch_timeout_ms / 1000,
            max_frame_age=self.config.pipeline.max_frame_age,
            on_error=self._on_slot_error,
        )
        self.slots[slot.name] = slot
        self.schedulers[slot.name] = sched
        self.slot_state[slot.name] = "healthy"
        self.placers.setdefault(model, Placer(self.config.pipeline.rebalance_band)).add_slot(slot.name)
        task = self._tg.create_task(sched.run(), name=f"executor[{slot.name}].scheduler")
        self._sched_tasks.append(task)
        self._slot_tasks[slot.name] = task
        return None

    # -- placement and failover --------------------------------------------------------------------
    def _stream_cost(self, stream: str, slot_name: str) -> float:
        """Share of a slot this stream needs: fps x measured service time per frame."""
        rt = self.streams.get(stream)
        fps = 15.0  # before a stream has been opened: a typical camera
        if rt is not None:
            measured = rt.stats.fps_in or (rt.source.fps if rt.source is not None else None)
            fps = min(rt.cfg.max_fps or measured or fps, measured or rt.cfg.max_fps or fps)
        ms = self.slots[slot_name].service_ms_per_frame or 50.0
        return fps * ms / 1000

    def _pick_slot(self, model: str, stream: str, exclude: str | None = None) -> str | None:
        """Place `stream` on the healthy slot of `model` with the most headroom (shared Placer logic)."""
        candidates = [n for n in self.model_slots.get(model, []) if n != exclude and self.slots[n].healthy]
        if not candidates:
            return None
        placer = self.placers[model]
        placer.remove(stream)
        cost = self._stream_cost(stream, candidates[0])
        # without admission control an over-full slot thins its streams (keep-latest) instead of refusing
        return placer.place(stream, cost, candidates, force=not self.config.pipeline.admission_control)

    def _on_slot_error(self, sched: Scheduler, exc: Exception) -> None:
        """A model call raised: take the slot out, move its streams to healthy slots at once, restart it."""
        slot = sched.slot
        if not slot.healthy:
            return
        slot.healthy = False
        self.slot_state[slot.name] = "restarting"
        model = slot.name.rsplit(".", 1)[0]
        self.placers[model].slots[slot.name].healthy = False
        moved = []
        for handle in list(sched.streams.values()):
            target = self._pick_slot(model, handle.stream, exclude=slot.name)
            if target is None:
                break  # nowhere to go: they wait here for the restart
            sched.remove_stream(handle.stream)
            self.schedulers[target].add_stream(handle)
            moved.append(f"{handle.stream}->{target}")
        log.warning("slot %s: unhealthy (%s); moved %s", slot.name, redact_text(str(exc), self.secrets),
                    ", ".join(moved) or "nothing (no healthy slot)")
        self._publish_devices()
        self._tg.create_task(self._restart_slot(sched, model, redact_text(str(exc), self.secrets)),
                             name=f"executor[{slot.name}].restart")

    async def _restart_slot(self, sched: Scheduler, model: str, reason: str) -> None:
        name = sched.slot.name
        mcfg = self.config.models[model]
        history = self.slot_restarts.setdefault(name, [])
        backoff = Backoff(0.5, 30.0)
        while True:
            now = time.monotonic()
            history[:] = [t for t in history if now - t < mcfg.restart_window]
            if len(history) >= mcfg.restart_budget:
                self.slot_state[name] = "failed"
                log.error("slot %s: failed (%d restarts within %.0fs; last error: %s)", name, len(history),
                          mcfg.restart_window, reason)
                self._publish_devices()
                return
            history.append(now)
            with contextlib.suppress(Exception):
                await sched.slot.close()
            await asyncio.sleep(backoff.next_delay())
            if self.schedulers.get(name) is not sched:  # the model was removed meanwhile
                return
            try:
                slot = await self._new_slot(model, int(name.rsplit(".", 1)[1]))
            except Exception as exc:
                reason = redact_text(str(exc), self.secrets)
                log.error("slot %s: restart failed: %s", name, reason)
                continue
            sched.slot = slot
            self.slots[name] = slot
            self.slot_state[name] = "healthy"
            self.placers[model].slots[name].healthy = True
            self.placers[model].slots[name].streams = {h: self._stream_cost(h, name) for h in sched.streams}
            log.info("slot %s: restarted", name)
            self._publish_devices()
            return

    def rebalance(self) -> list[Any]:
        """Refresh costs from measured service times and apply the fewest moves that even the load.

        A move is lossless: a batch in flight on the old slot finishes there and is published in
        order (`seq` is per stream, assigned on the loop), the stream's next frame goes to the new
        slot. Remove and add happen with no await between them, so the stream is never unplaced.
        """
        applied = []
        for model, placer in self.placers.items():
            for slot in placer.slots.values():
                for stream in slot.streams:
                    slot.streams[stream] = self._stream_cost(stream, slot.name)
            for move in placer.rebalance():
                handle = self.schedulers[move.source].remove_stream(move.stream)
                if handle is None:  # removed meanwhile
                    continue
                self.schedulers[move.target].add_stream(handle)
                applied.append(move)
                log.info("stream %s: moved %s -> %s (rebalance)", move.stream, move.source, move.target)
        if applied:
            self._publish_devices()
        return applied

    async def _rebalance_loop(self) -> None:
        interval = self.config.pipeline.rebalance_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            self.rebalance()

    def devices_payload(self) -> dict[str, Any]:
        return {
            "v": PAYLOAD_VERSION,
            "at": round(time.time(), 3),
            "slots": {
                name: {
                    "model": name.rsplit(".", 1)[0],
                    "device": slot.device,
                    "state": self.slot_state.get(name, "unknown"),
                    "restarts": len(self.slot_restarts.get(name, [])),
                    "errors": slot.errors,
                    "last_error": redact_text(slot.last_error, self.secrets) if slot.last_error else None,
                    "streams": sorted(self.schedulers[name].streams),
                }
                for name, slot in self.slots.items()
            },
        }

    def _publish_devices(self) -> None:
        if self.publisher is not None:
            self.publisher.publish(self.publisher.topic("devices"), self.devices_payload(),
                                   qos=self.config.mqtt.state_qos, retain=True)

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
        password = url_password(cfg.url)
        if password:
            self.secrets = (*self.secrets, password)
        if cfg.model not in self.model_slots and not await self._load_model(cfg.model):
            return
        self._start_stream(rt)
        log.info("stream %s: added (model %s)", name, cfg.model)

    async def remove_stream(self, name: str) -> None:
        """Stop a stream while running, publish `stopped` and clear its retained state."""
        rt = self.streams.get(name)
        if rt is None:
            raise KeyError(f"no stream {name}")
        for sched in self.schedulers.values():
            sched.remove_stream(name)
        for placer in self.placers.values():
            placer.remove(name)
        if rt.source is not None:
            await asyncio.to_thread(rt.source.stop)
        self._publish_state(rt, STOPPED, None)
        del self.streams[name]
        if self.publisher is not None:  # an empty retained message deletes the retained state
            topic = self.publisher.topic("streams", name, "state")
            self.publisher.publish(topic, b"", qos=self.config.mqtt.state_qos, retain=True)
        log.info("stream %s: removed", name)

    async def add_model(self, name: str, cfg: ModelConfig) -> None:
        """Load a model while running (its slots planned like at start), ready for `add_stream`.

        Raises ValueError for a bad or duplicate name, ConfigError when it would bring a second
        CPU runtime into the process, and DetectorError when none of its slots could start.
        """
        import re

        from .config import NAME_PATTERN

        if not self.ready.is_set():
            raise RuntimeError("pipeline is not running")
        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"model name {name!r} must match {NAME_PATTERN}")
        if name in self.config.models:
            raise ValueError(f"model {name} already exists")
        self.config.models[name] = cfg
        try:
            self.plan([name])
            loaded = await self._load_model(name)
        except BaseException:
            self._forget_model(name)
            raise
        if not loaded:
            msg = self.model_errors.get(name, "no slot started")
            self._forget_model(name)
            raise DetectorError(f"model {name}: {msg}")
        log.info("model %s: added (%d slot(s))", name, len(self.model_slots[name]))

    async def remove_model(self, name: str) -> None:
        """Stop a model's slots and forget it. Its streams must be removed first (ValueError names them)."""
        if name not in self.config.models:
            raise KeyError(f"no model {name}")
        users = sorted(rt.name for rt in self.streams.values() if rt.cfg.model == name)
        if users:
            raise ValueError(f"model {name} still serves stream(s) {', '.join(users)}: remove them first")
        for slot_name in self.model_slots.get(name, []):
            task = self._slot_tasks.pop(slot_name, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            slot = self.slots.pop(slot_name, None)
            self.schedulers.pop(slot_name, None)
            self.slot_state.pop(slot_name, None)
            self.slot_restarts.pop(slot_name, None)
            if slot is not None:
                with contextlib.suppress(Exception):
                    await slot.close()
        self._forget_model(name)
        self._publish_devices()
        log.info("model %s: removed", name)

    def _forget_model(self, name: str) -> None:
        for table in (self.model_slots, self.placers, self.layouts, self.runtimes, self.model_errors):
            table.pop(name, None)  # type: ignore[attr-defined]
        self.config.models.pop(name, None)

    # -- talking-head sessions ----------------------------------------------------------------------
    async def start_session(self, name: str, cfg: Any) -> None:
        """Start a live talking-head session (avatar + audio + sink) while running.

        Audio `mqtt` listens on `<prefix>/talk/<name>/audio` for s16le mono 16 kHz PCM chunks (an
        empty message ends the audio). State goes to `<prefix>/talk/<name>/state` (retained) and
        figures into `stats`. Raises on a bad avatar or sink after publishing the `failed` state.
        """
        from streams.sinks import AVSink
        from talkinghead import EnergyLipSync, PushAudio, TalkSession, prepare_avatar
        from talkinghead.audio import iter_audio

        if name in self.sessions:
            raise ValueError(f"session {name} already exists")
        assert self.publisher is not None
        self._publish_session_state(name, "starting", None)
        try:
            avatar = await asyncio.to_thread(prepare_avatar, cfg.avatar, name, cfg.box)
            if cfg.backend == "musetalk":
                backend: Any = await self._musetalk_backend(name, avatar)
            else:
                backend = EnergyLipSync(avatar)
            w, h = avatar.size
            sink = await asyncio.to_thread(AVSink, cfg.out, w, h)
        except Exception as exc:
            if self.lipsync is not None:
                self.lipsync.release(name)
            self._publish_session_state(name, "failed", str(exc))
            raise
        topic = self.publisher.topic("talk", name, "audio")
        audio: Any
        if cfg.audio == "mqtt":
            push = PushAudio()

            def on_audio(_topic: str, payload: bytes) -> None:
                if not payload:
                    push.close()
                    return
                try:
                    push.push_pcm16(payload)
                except Exception as exc:  # an odd-length chunk: this chunk only
                    log.warning("session %s: %s", name, exc)

            audio = push
            subscribed = self.publisher.subscribe(topic, on_audio)
            if subscribed is not None:
                # `live` must mean the audio topic is listened to: wait for the broker's SUBACK
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(subscribed), 5.0)
        else:
            audio = iter_audio(cfg.audio)
        loop = asyncio.get_running_loop()

        def on_state(session: str, state: str, error: str | None) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._publish_session_state, session, state, error)

        session = TalkSession(name, backend, audio, sink, realtime=True, on_state=on_state)
        self.sessions[name] = session
        session.start()
        log.info("session %s: started (%s -> %s)", name, "mqtt" if cfg.audio == "mqtt" else
                 redact_text(cfg.audio, self.secrets), redact_text(cfg.out, self.secrets))

    async def stop_session(self, name: str) -> None:
        session = self.sessions.pop(name, None)
        if session is None:
            raise KeyError(f"no session {name}")
        if self.publisher is not None:
            self.publisher.unsubscribe(self.publisher.topic("talk", name, "audio"))
        await asyncio.to_thread(session.stop)
        if self.lipsync is not None:
            self.lipsync.release(name)
        self._publish_session_state(name, "stopped", None, session.snapshot())

    async def _musetalk_backend(self, name: str, avatar: Any) -> Any:
        """A live MuseTalk backend for one session, on the lipsync slots (started with the first session)."""
        from talkinghead.live import MuseTalkLive
        from talkinghead.musetalk import MuseTalk

        lcfg = self.config.lipsync
        assert lcfg.weights is not None  # the config requires it for musetalk sessions
        async with self._lipsync_lock:
            if self.lipsync is None:
                if self.device_facts is None:
                    self.device_facts = await asyncio.to_thread(discover)
                pool = musetalk_pool(lcfg.weights, lcfg.version, slots=lcfg.slots, batch_size=lcfg.batch_size,
                                     batch_timeout=lcfg.batch_timeout_ms / 1000, slot_memory_gb=lcfg.slot_memory_gb,
                                     usable_fraction=self.config.devices.usable_fraction,
                                     device_facts=self.device_facts, device=pinned_device(lcfg.device))
                others = {r for r in self.runtimes.values() if r != "torch"}
                if others and "cpu" in pool.devices:
                    raise LipSyncError(f"MuseTalk runs on torch, and this process's CPU already runs "
                                       f"{', '.join(sorted(others))} for detection: one inference runtime per "
                                       "process on the CPU (run talking heads in a second framegrid process, "
                                       "or give MuseTalk a GPU)")
                frontend = MuseTalk(lcfg.weights, lcfg.version, device=pool.devices[0], parts={"vae", "whisper"})
                await asyncio.to_thread(frontend.load)
                await pool.start()
                self._lipsync_frontend, self.lipsync = frontend, pool
        pool, frontend = self.lipsync, self._lipsync_frontend
        faces = await asyncio.to_thread(frontend.prepare_faces, avatar)
        slot = pool.place(name)
        log.info("session %s: MuseTalk on %s", name, slot)
        return MuseTalkLive(frontend, faces, lambda jobs: pool.submit(name, jobs), block=lcfg.block,
                            timeout=lcfg.timeout)

    def _publish_session_state(self, name: str, state: str, error: str | None,
                               snapshot: dict[str, Any] | None = None) -> None:
        if self.publisher is None:
            return
        session = self.sessions.get(name)
        snap = snapshot or (session.snapshot() if session is not None else {})
        payload = {"v": PAYLOAD_VERSION, "session": name, "state": state, "at": round(time.time(), 3),
                   "error": redact_text(error, self.secrets) if error else None,
                   **{k: v for k, v in snap.items() if k not in ("session", "state", "error")}}
        self.publisher.publish(self.publisher.topic("talk", name, "state"), payload,
                               qos=self.config.mqtt.state_qos, retain=True)

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
                if frame.source_size is not None:  # the decoder scaled the picture down: back to source pixels
                    det = det.scaled(*frame.scale)
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
        try:
            target = self._pick_slot(rt.cfg.model, rt.name)
        except PlacementError as exc:
            self._publish_state(rt, "refused", str(exc))
            log.warning("%s", exc)
            return
        if target is None:
            return  # its model failed to load; state already says so
        sched = self.schedulers[target]
        rt.stats.restart_window()  # rates count from here, not from model loading
        handle = StreamHandle(rt.name, rt.latest, rt.stats, rt.cfg.max_fps)
        sched.add_stream(handle)
        opts = SourceOptions(
            open_timeout=rt.cfg.open_timeout, stall_timeout=rt.cfg.stall_timeout, transport=rt.cfg.transport,
            realtime=rt.cfg.realtime, loop=rt.cfg.loop, reconnect_cap=rt.cfg.reconnect_cap,
            max_retries=rt.cfg.max_retries, ffmpeg_options=dict(rt.cfg.ffmpeg_options),
            decode_threads=decode_threads(self._cores(), len(self.streams), self.config.pipeline.decode_threads),
            max_side=self.config.models[rt.cfg.model].imgsz if self.config.pipeline.decode_resize else None,
        )
        rt.source = Source(rt.name, rt.cfg.url, rt.latest.put, self._state_from_thread, opts)
        rt.source.start()

    def _cores(self) -> int:
        cpu = next((d for d in self.device_facts or [] if d.kind == "cpu"), None)
        return (cpu.cores if cpu else None) or 1

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
        now = self.clock()
        # the publish stage: model returned -> payload built and queued for the MQTT client (the
        # client's own send/ack time is in stats as mqtt.send_ms)
        result.timings_ms["publish"] = max(0.0, (now - result.inferred_at) * 1000)
        payload = result.payload(now)
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
            "talk": {name: {**session.snapshot(), "slot": self.lipsync.slot_of(name) if self.lipsync else None}
                     for name, session in self.sessions.items()},
            "lipsync": self.lipsync.snapshot() if self.lipsync is not None else None,
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


def _filter(det: Detections, wanted: set[str]) -> Detections:
    keep = [i for i, label in enumerate(det.labels) if label in wanted]
    if len(keep) == len(det.labels):
        return det
    return Detections(det.boxes[keep], det.confidences[keep], det.class_ids[keep],
                      tuple(det.labels[i] for i in keep), det.timings_ms)
