"""`lipsync` executor slots: one lip-sync model copy per slot, batched across the sessions on it.

The same slot machinery as detection (`ExecutorSlot`: a worker thread per slot, watchdog,
measured service time). Sessions run on their own threads and call `submit(session, jobs)`,
which returns a `concurrent.futures.Future`; the jobs cross into the loop through
`call_soon_threadsafe` (the one thread-to-loop boundary), and each slot's batcher merges the waiting jobs of all its sessions
into batches of at most `batch_size`, shipping a batch when it is full or `batch_timeout` after
its first job. Blending and encoding stay on the session threads, off the inference thread.

A session is placed on the healthy slot with the fewest sessions; a slot whose model call fails
is taken out, its sessions move to healthy slots at once (their next jobs go there), the failed
batch's futures raise (the sessions show their last frame for those frames), and the slot is
restarted with backoff within a restart budget. This module never blocks the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams import Backoff

from .devices import GB, DeviceInfo, SlotPlan, discover, plan_slots, slot_layout
from .executor import ExecutorSlot

log = logging.getLogger(__name__)

ModelFactory = Callable[[int], Any]  # slot index -> an unloaded model (load / warmup / infer / close)


class LipSyncError(RuntimeError):
    """No healthy lipsync slot, or the pool is closed."""


@dataclass
class _Request:
    jobs: list[Any]
    future: concurrent.futures.Future[list[Any]]
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _SlotRuntime:
    name: str
    slot: ExecutorSlot
    queue: deque[_Request] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    state: str = "starting"  # healthy | restarting | failed
    restarts: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    memory_bytes: int | None = None  # measured from the loaded model

    @property
    def device(self) -> str:
        return self.slot.device


class LipSyncPool:
    """N lipsync slots and their batchers. Start with `await start()` on the loop that will own them,
    or `start_in_thread()` for a process without one (offline jobs, tools)."""

    def __init__(self, factory: ModelFactory, slots: int = 1, batch_size: int = 8, batch_timeout: float = 0.02,
                 hang_timeout: float = 30.0, max_queue: int = 64, restart_budget: int = 3,
                 restart_window: float = 300.0, devices: list[str] | None = None,
                 slot_memory_bytes: int | None = None) -> None:
        if slots < 1:
            raise ValueError("a lipsync pool needs at least one slot")
        self.factory = factory
        self.n = slots
        self.devices = devices or ["cpu"] * slots
        self.slot_memory_bytes = slot_memory_bytes  # planned per GPU slot, checked against the loaded model
        self.batch_size = batch_size
        self.batch_timeout = batch_timeout
        self.hang_timeout = hang_timeout
        self.max_queue = max_queue  # requests waiting per slot; beyond it submit() fails fast
        self.restart_budget, self.restart_window = restart_budget, restart_window
        self.slots: list[_SlotRuntime] = []
        self.placement: dict[str, int] = {}  # session -> slot index
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.batch_sizes: deque[int] = deque(maxlen=500)

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every slot's model (in its worker thread) and start the batchers."""
        self.loop = asyncio.get_running_loop()
        for i in range(self.n):
            name = f"lipsync.{i}"
            slot = ExecutorSlot(name, self.factory(i), device=self.devices[i % len(self.devices)],
                                hang_timeout=self.hang_timeout)
            self.slots.append(_SlotRuntime(name, slot))
        await asyncio.gather(*(self._start_slot(rt) for rt in self.slots))
        for rt in self.slots:
            measure = getattr(rt.slot.detector, "memory_bytes", None)
            if rt.state == "healthy" and measure is not None:
                rt.memory_bytes = int(measure())
                if self.slot_memory_bytes and rt.device != "cpu" and rt.memory_bytes > self.slot_memory_bytes:
                    log.warning("%s: the loaded model needs %.1f GB, more than the %.1f GB planned per slot: "
                                "raise lipsync.slot_memory_gb so that slots are not packed too tightly",
                                rt.name, rt.memory_bytes / 2**30, self.slot_memory_bytes / 2**30)
        if not any(rt.state == "healthy" for rt in self.slots):
            raise LipSyncError("no lipsync slot could start: "
                               + "; ".join(f"{rt.name}: {rt.slot.last_error}" for rt in self.slots))
        for rt in self.slots:
            rt.task = asyncio.create_task(self._batcher(rt), name=f"{rt.name}.batcher")

    async def _start_slot(self, rt: _SlotRuntime) -> None:
        try:
            await rt.slot.start(warmup=True)
            rt.state = "healthy"
        except Exception as exc:
            rt.slot.last_error = str(exc)
            rt.state = "failed"
            log.error("%s: cannot start: %s", rt.name, exc)

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
        for rt in self.slots:
            if rt.task is not None:
                rt.task.cancel()
            while rt.queue:
                req = rt.queue.popleft()
                if not req.future.done():
                    req.future.set_exception(LipSyncError("lipsync pool closed"))
        await asyncio.gather(*(t for rt in self.slots if (t := rt.task) is not None), return_exceptions=True)
        await asyncio.gather(*(rt.slot.close() for rt in self.slots), return_exceptions=True)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Close a pool started with `start_in_thread` (from any other thread)."""
        if self.loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.close(), self.loop).result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- sessions ---------------------------------------------------------------------------------
    def place(self, session: str) -> str:
        """Put a session on the healthy slot with the fewest sessions; returns the slot's name."""
        with self._lock:
            healthy = [i for i, rt in enumerate(self.slots) if rt.state == "healthy"]
            if not healthy:
                raise LipSyncError("no healthy lipsync slot")
            load = {i: 0 for i in healthy}
            for s, i in self.placement.items():
                if i in load and s != session:
                    load[i] += 1
            best = min(healthy, key=lambda i: (load[i], i))
            self.placement[session] = best
            return self.slots[best].name

    def release(self, session: str) -> None:
        with self._lock:
            self.placement.pop(session, None)

    def slot_of(self, session: str) -> str | None:
        i = self.placement.get(session)
        return None if i is None else self.slots[i].name

    def submit(self, session: str, jobs: list[Any], slot: int | None = None) -> concurrent.futures.Future[list[Any]]:
        """Queue `jobs` for the session's slot (or slot index `slot`); thread-safe, never blocks.

        The future's result has one output per job, in order.
        """
        fut: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        if self._closed or self.loop is None:
            fut.set_exception(LipSyncError("lipsync pool is not running"))
            return fut
        if slot is None:
            i = self.placement.get(session)
            if i is None:
                self.place(session)
                i = self.placement[session]
        else:
            i = slot % len(self.slots)
        self.loop.call_soon_threadsafe(self._enqueue, i, _Request(list(jobs), fut))
        return fut

    def _enqueue(self, i: int, req: _Request) -> None:
        rt = self.slots[i]
        if rt.state != "healthy":  # moved away while the request crossed over: any healthy slot
            alive = [r for r in self.slots if r.state == "healthy"]
            if not alive:
                req.future.set_exception(LipSyncError("no healthy lipsync slot"))
                return
            rt = min(alive, key=lambda r: len(r.queue))
        if len(rt.queue) >= self.max_queue:
            req.future.set_exception(LipSyncError(f"{rt.name}: queue full ({self.max_queue} requests waiting)"))
            return
        rt.queue.append(req)
        rt.wake.set()

    # -- batching ---------------------------------------------------------------------------------
    async def _batcher(self, rt: _SlotRuntime) -> None:
        while True:
            while not rt.queue or rt.state != "healthy":
                rt.wake.clear()
                await rt.wake.wait()
            deadline = rt.queue[0].queued_at + self.batch_timeout
            # wait for more sessions' jobs until the batch is full or its deadline passes
            while sum(len(r.jobs) for r in rt.queue) < self.batch_size:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                rt.wake.clear()
                try:
                    await asyncio.wait_for(rt.wake.wait(), left)
                except TimeoutError:
                    break
            taken: list[_Request] = []
            n = 0
            while rt.queue and (not taken or n + len(rt.queue[0].jobs) <= self.batch_size):
                req = rt.queue.popleft()
                taken.append(req)
                n += len(req.jobs)
            jobs = [j for r in taken for j in r.jobs]
            try:
                out = await rt.slot.infer(jobs)
            except Exception as exc:
                for r in taken:
                    if not r.future.done():
                        r.future.set_exception(exc)
                await self._fail(rt, exc)
                continue
            self.batches += 1
            self.batch_sizes.append(len(jobs))
            k = 0
            for r in taken:
                if not r.future.done():
                    r.future.set_result(out[k:k + len(r.jobs)])
                k += len(r.jobs)
            await asyncio.sleep(0)  # let the loop breathe between batches

    async def _fail(self, rt: _SlotRuntime, exc: BaseException) -> None:
        """Take the slot out, move its sessions and waiting jobs, restart it with backoff."""
        i = self.slots.index(rt)
        rt.state = "restarting"
        log.error("%s: model call failed (%s): moving its sessions, restarting", rt.name, exc)
        with self._lock:
            moved = [s for s, j in self.placement.items() if j == i]
        for s in moved:
            try:
                self.place(s)
            except LipSyncError:  # nowhere to go: placed again on its next submit
                self.release(s)
        while rt.queue:
            self._enqueue(i, rt.queue.popleft())  # to a healthy slot, or failed at once
        now = time.monotonic()
        rt.restarts = [t for t in rt.restarts if now - t < self.restart_window] + [now]
        if len(rt.restarts) > self.restart_budget:
            rt.state = "failed"
            log.error("%s: restarted %d times in %.0fs: failed", rt.name, len(rt.restarts) - 1,
                      self.restart_window)
            return
        await rt.slot.close()
        backoff = Backoff(base=0.5, cap=10.0, attempts=len(rt.restarts) - 1)
        await asyncio.sleep(backoff.next_delay())
        rt.slot = ExecutorSlot(rt.name, self.factory(i), device=rt.slot.device, hang_timeout=self.hang_timeout)
        await self._start_slot(rt)
        if rt.state == "healthy":
            log.info("%s: restarted", rt.name)

    # -- observability ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        sizes = list(self.batch_sizes)
        return {
            "batches": self.batches,
            "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None,
            "slots": {rt.name: {
                "state": rt.state, "device": rt.slot.device, "batches": rt.slot.batches, "frames": rt.slot.frames,
                "errors": rt.slot.errors, "last_error": rt.slot.last_error, "queued": len(rt.queue),
                "restarts": len(rt.restarts),
                "memory_gb": round(rt.memory_bytes / 2**30, 3) if rt.memory_bytes is not None else None,
                "service_ms_per_frame": round(rt.slot.service_ms_per_frame, 2)
                if rt.slot.service_ms_per_frame is not None else None,
                "sessions": sorted(s for s, i in self.placement.items() if self.slots[i] is rt),
            } for rt in self.slots},
        }


def plan_lipsync(facts: list[DeviceInfo], slot_memory_gb: float, usable_fraction: float = 0.9,
                 slots: int | None = None) -> list[SlotPlan]:
    """Lipsync slots per device: per GPU from its free memory, on a CPU-only machine `slots` (default 1)."""
    return plan_slots(facts, int(slot_memory_gb * GB), usable_fraction, cpu_slots=slots or 1, kind="lipsync")


def musetalk_pool(weights: str | Path, version: str = "v15", slots: int | None = None, batch_size: int = 8,
                  batch_timeout: float = 0.02, slot_memory_gb: float = 8.0, usable_fraction: float = 0.9,
                  device_facts: list[DeviceInfo] | None = None, half: bool | None = None,
                  device: str | None = None) -> LipSyncPool:
    """A pool of MuseTalk lipsync slots laid out by the device plan.

    Per GPU: floor(free memory x usable_fraction / slot_memory_gb) slots; on a CPU-only machine
    `slots` (default 1), each with cores / slots torch threads. `slots` given on a GPU machine
    spreads that many over the planned devices.
    """
    from talkinghead.musetalk import MuseTalkSlotModel

    facts = device_facts if device_facts is not None else discover()
    plans = plan_lipsync(facts, slot_memory_gb, usable_fraction, slots)
    for p in plans:
        log.info("lipsync plan: %s", p.reason)
    layout = slot_layout(plans, explicit=slots, device=device)

    def factory(i: int) -> MuseTalkSlotModel:
        a = layout[i]
        return MuseTalkSlotModel(weights, version, device=a.device, half=half, threads=a.threads)

    return LipSyncPool(factory, slots=len(layout), batch_size=batch_size, batch_timeout=batch_timeout,
                       devices=[a.device for a in layout], slot_memory_bytes=int(slot_memory_gb * GB))
