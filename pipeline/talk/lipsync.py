"""Lip-sync on the shared slot machinery: a session's request queue and the lip-sync job adapter.

Talk sessions run on their own threads and call `LipSyncPool.submit(session, jobs)`, which
returns a `concurrent.futures.Future` with one output per job. The request goes into the
session's `SessionFeed` on the caller's thread (bounded; beyond `max_queue` it fails at once)
and the slot's batcher is woken through the one thread-to-loop hand-off. From there it is
exactly detection's path (`pipeline.core.slots`): one batcher per slot merges the waiting requests
of all its sessions into UNet+VAE batches, placement and failover by the pool's placer,
restarts by its policy. Blending and encoding stay on the session threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import DevicesConfig, LipSyncConfig, PipelineConfig, PoolSettings, default
from pipeline.core.devices import GB, DeviceInfo, SlotPlan, discover, pinned_device, plan_slots, slot_layout
from pipeline.core.slots import Model, SlotPool, Spawn, Taken
from pipeline.errors import PoolError, SlotError
from streams import SYSTEM_CLOCK, Clock
from streams.handoff import Handoff

log = logging.getLogger(__name__)

LipSyncError = PoolError  # the name callers know: no healthy lipsync slot, or the pool is closed
T = TypeVar("T")
LIVE_FPS = 25.0  # a live session asks for 25 frames a second until its requests are measured


@dataclass
class Request:
    jobs: list[Any]
    future: concurrent.futures.Future[list[Any]]
    queued_at: float


@dataclass(eq=False)
class SessionFeed:
    """One session's waiting requests (thread-safe, bounded) as a batcher member."""

    key: str
    max_queue: int
    clock: Clock
    queue: deque[Request] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    notify: Callable[[], None] | None = None
    last_at: float | None = None
    interval: float | None = None  # EWMA between requests
    jobs_per_request: float = 1.0

    def push(self, jobs: list[Any], future: concurrent.futures.Future[list[Any]]) -> None:
        now = self.clock.mono()
        with self.lock:
            if len(self.queue) >= self.max_queue:
                future.set_exception(PoolError(f"session {self.key}: queue full ({self.max_queue} requests waiting)"))
                return
            self.queue.append(Request(jobs, future, now))
            if self.last_at is not None:
                gap = now - self.last_at
                self.interval = gap if self.interval is None else 0.8 * self.interval + 0.2 * gap
            self.last_at = now
            self.jobs_per_request = 0.8 * self.jobs_per_request + 0.2 * max(1, len(jobs))
        notify = self.notify
        if notify is not None:
            notify()

    def waiting_since(self) -> float | None:
        with self.lock:
            return self.queue[0].queued_at if self.queue else None

    def ready_at(self, now: float) -> float | None:
        with self.lock:
            if self.queue:
                return self.queue[0].queued_at
            if self.last_at is None or self.interval is None:
                return None
            expected = self.last_at + self.interval
            return None if expected < now - self.interval else expected  # gone quiet: not waited for

    def take(self, now: float, room: int) -> list[Request]:
        out: list[Request] = []
        with self.lock:
            while self.queue and (not out or sum(len(r.jobs) for r in out) + len(self.queue[0].jobs) <= room):
                out.append(self.queue.popleft())
        return out

    def rate(self) -> float | None:
        return self.jobs_per_request / self.interval if self.interval else LIVE_FPS

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        self.notify = notify

    def fail_all(self, exc: BaseException) -> None:
        with self.lock:
            waiting, self.queue = list(self.queue), deque()
        for r in waiting:
            if not r.future.done():
                r.future.set_exception(exc)


class LipSyncJobs:
    """The lip-sync job adapter: requests of jobs in, one output per job back to each request's future."""

    def size(self, item: Request) -> int:
        return len(item.jobs)

    def call(self, requests: list[Request]) -> tuple[Any, ...]:
        return ([j for r in requests for j in r.jobs],)

    def deliver(self, taken: list[Taken], outputs: list[Any], shipped_at: float) -> None:
        k = 0
        for _, req in taken:
            if not req.future.done():
                req.future.set_result(outputs[k:k + len(req.jobs)])
            k += len(req.jobs)

    def failed(self, taken: list[Taken], exc: SlotError) -> None:
        for _, req in taken:
            if not req.future.done():
                req.future.set_exception(exc)


class LipSyncPool:
    """The lipsync slots. Start with `await start()` on the loop that will own them, or
    `start_in_thread()` for a process without one (offline jobs, tools). Its methods may be
    called from any thread."""

    def __init__(self, factory: Callable[[int], Model], devices: list[str], settings: PoolSettings,
                 max_queue: int, slot_memory_bytes: int | None = None, clock: Clock = SYSTEM_CLOCK,
                 on_change: Callable[[], None] | None = None, spawn: Spawn | None = None) -> None:
        self.devices = devices
        self.settings = settings
        self.max_queue = max_queue
        self.slot_memory_bytes = slot_memory_bytes  # planned per GPU slot, checked against the loaded model
        self.whisper_on_slot = False  # the slots compute live prompts from audio windows (see whisper_on_slots)
        self.clock = clock
        # `spawn`: the pipeline's TaskGroup (its batchers are tasks of it); None: tasks of whichever loop starts it
        self.pool = SlotPool("lipsync", factory, devices, LipSyncJobs(), settings, clock=clock, on_change=on_change,
                             spawn=spawn)
        self.memory_bytes: dict[str, int] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._handoff: Handoff | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def n(self) -> int:
        return len(self.devices)

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every slot's model (in its worker thread) and start the batchers."""
        self.loop = asyncio.get_running_loop()
        self._handoff = Handoff(self.loop)
        await self.pool.start()
        for name, slot in self.pool.slots.items():
            measure = getattr(slot.model, "memory_bytes", None)
            if self.pool.placer.slots[name].healthy and measure is not None:
                used = self.memory_bytes[name] = int(measure())
                if self.slot_memory_bytes and slot.device != "cpu" and used > self.slot_memory_bytes:
                    log.warning("%s: the loaded model needs %.1f GB, more than the %.1f GB planned per slot: "
                                "raise lipsync.slot_memory_gb so that slots are not packed too tightly",
                                name, used / GB, self.slot_memory_bytes / GB)

    def start_in_thread(self, timeout: float = 600.0) -> LipSyncPool:
        """Run the pool on a loop of its own in a daemon thread (for callers without a loop)."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                try:
                    await self.start()
                except BaseException as exc:
                    ready.set_exception(exc)
                    return
                ready.set_result(None)

            loop.run_until_complete(boot())
            if ready.exception() is None:
                loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name="lipsync.loop", daemon=True)
        self._thread.start()
        ready.result(timeout)
        return self

    async def close(self) -> None:
        self._closed = True
        await self.pool.close()
        for feed in list(self.pool.feeds.values()):
            assert isinstance(feed, SessionFeed)
            feed.fail_all(PoolError("lipsync pool closed"))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Close a pool started with `start_in_thread` (from any other thread)."""
        loop, handoff = self.loop, self._handoff
        if loop is None or handoff is None:
            return
        closed: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def close() -> None:
            try:
                await self.close()
                closed.set_result(None)
            except BaseException as exc:
                closed.set_exception(exc)
            finally:
                loop.stop()

        handoff.run(lambda: loop.create_task(close()), timeout)
        closed.result(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the pool's loop (the placer and slot table are the loop's) and return its value."""
        if self._handoff is None:
            raise PoolError("lipsync pool is not running")
        return self._handoff.run(fn)

    # -- sessions ---------------------------------------------------------------------------------
    def place(self, session: str) -> str:
        """Put a session on the healthy slot it leaves least utilised (`Placer.place`); returns the slot's name."""
        return self._on_loop(lambda: self._place(session, None))

    def _place(self, key: str, pin: int | None) -> str:
        feed = self.pool.feeds.get(key)
        if feed is None:
            feed = SessionFeed(key, self.max_queue, self.clock)
        if pin is None:
            return self.pool.place(feed)
        return self.pool.pin(feed, self.pool.slot_names()[pin % self.n])

    def release(self, session: str) -> None:
        if self.loop is None or self._closed:
            return
        def remove() -> None:
            for key in [k for k in self.pool.feeds if k == session or k.startswith(f"{session}#")]:
                self.pool.remove(key)

        self._on_loop(remove)

    def slot_of(self, session: str) -> str | None:
        return self.pool.slot_of(session)

    def submit(self, session: str, jobs: list[Any], slot: int | None = None) -> concurrent.futures.Future[list[Any]]:
        """Queue `jobs` for the session's slot (or for slot index `slot`); thread-safe, never blocks.

        The future's result has one output per job, in order.
        """
        fut: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        handoff = self._handoff
        if self._closed or handoff is None:
            fut.set_exception(PoolError("lipsync pool is not running"))
            return fut
        key = session if slot is None else f"{session}#{slot % self.n}"
        feed = self.pool.feeds.get(key)
        if feed is not None:
            assert isinstance(feed, SessionFeed)
            feed.push(list(jobs), fut)
        else:  # first request of this session: placed on the loop, then queued
            handoff.call(self._place_and_push, key, slot, list(jobs), fut)
        return fut

    def _place_and_push(self, key: str, slot: int | None, jobs: list[Any],
                        fut: concurrent.futures.Future[list[Any]]) -> None:
        try:
            self._place(key, slot)
        except Exception as exc:
            fut.set_exception(exc)
            return
        feed = self.pool.feeds[key]
        assert isinstance(feed, SessionFeed)
        feed.push(jobs, fut)

    # -- observability ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return self._on_loop(self._snapshot)

    def _snapshot(self) -> dict[str, Any]:
        slots = self.pool.snapshot(members_key="sessions")
        batches = sum(s.batches for s in self.pool.slots.values())
        jobs = sum(s.frames for s in self.pool.slots.values())
        for name, snap in slots.items():
            snap["sessions"] = sorted({k.split("#")[0] for k in snap["sessions"]})
            members = self.pool.placer.slots[name].members
            snap["queued"] = sum(len(f.queue) for k, f in self.pool.feeds.items()
                                 if k in members and isinstance(f, SessionFeed))
            used = self.memory_bytes.get(name)
            snap["memory_gb"] = round(used / GB, 3) if used is not None else None
        return {"batches": batches, "mean_batch": round(jobs / batches, 2) if batches else None,
                "slots": slots}


def plan_lipsync(facts: list[DeviceInfo], slot_memory_gb: float,
                 usable_fraction: float = default(DevicesConfig, "usable_fraction"),
                 slots: int | None = None) -> list[SlotPlan]:
    """Lipsync slots per device: per GPU from its free memory, on a CPU-only machine `slots` (default 1)."""
    return plan_slots(facts, int(slot_memory_gb * GB), usable_fraction, cpu_slots=slots or 1, kind="lipsync")


def musetalk_pool(cfg: LipSyncConfig, pipeline: PipelineConfig | None = None,
                  usable_fraction: float = default(DevicesConfig, "usable_fraction"),
                  device_facts: list[DeviceInfo] | None = None, half: bool | None = None,
                  on_change: Callable[[], None] | None = None, clock: Clock = SYSTEM_CLOCK,
                  spawn: Spawn | None = None) -> LipSyncPool:
    """A pool of MuseTalk lipsync slots laid out by the device plan.

    Per GPU: floor(free memory x usable_fraction / slot_memory_gb) slots; on a CPU-only machine
    `cfg.slots` (default 1), each with cores / slots torch threads. `cfg.slots` on a GPU machine
    spreads that many over the planned devices.
    """
    from talkinghead.musetalk import MuseTalkSlotModel

    if cfg.weights is None:
        raise PoolError("lipsync.weights is not set (the MuseTalk models folder)")
    weights: Path = cfg.weights
    facts = device_facts if device_facts is not None else discover()
    plans = plan_lipsync(facts, cfg.slot_memory_gb, usable_fraction, cfg.slots)
    for p in plans:
        log.info("lipsync plan: %s", p.reason)
    layout = slot_layout(plans, explicit=cfg.slots, device=pinned_device(cfg.device))

    whisper = whisper_on_slots(cfg, [a.device for a in layout])

    def factory(i: int) -> MuseTalkSlotModel:
        a = layout[i]
        return MuseTalkSlotModel(weights, cfg.version, device=a.device, half=half, threads=a.threads, whisper=whisper)

    pool = LipSyncPool(factory, [a.device for a in layout], cfg.pool_settings(pipeline or PipelineConfig()),
                       cfg.max_queue, slot_memory_bytes=int(cfg.slot_memory_gb * GB), clock=clock,
                       on_change=on_change, spawn=spawn)
    pool.whisper_on_slot = whisper
    return pool


def whisper_on_slots(cfg: LipSyncConfig, devices: list[str]) -> bool:
    """Whether the slots run the Whisper encoder (live prompts): `slot`, `session`, or `auto` (on
    the slots when every slot is on a GPU: the encoder beside the UNet, in the slot's memory;
    on CPUs the session side computes them in parallel with the slots)."""
    if cfg.whisper != "auto":
        return cfg.whisper == "slot"
    return bool(devices) and all(d.startswith("cuda") for d in devices)
