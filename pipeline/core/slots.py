"""The one executor-slot machinery, for detection and lip-sync alike.

A `SlotPool` is one model's slots: each slot is a model copy on its own worker thread (`Slot`)
fed by one arrival-driven `Batcher`. The pool's `Placer` holds the only member-to-slot table and
the only health record per slot; members are detection streams or talk sessions, each behind a
`Feed`. What detection and lip-sync do differently lives in a small `JobAdapter` (how items
become one model call and how outputs go back); everything else is shared:

    Feed (mailbox / session queue) --> Batcher (per slot, on the loop) --> Slot (worker thread)
                                           |                                  |
                                     JobAdapter.deliver  <----  outputs  <----+
    faults --> SlotPool: Placer.evacuate (members move at once) --> restart with backoff, in budget

The loop only moves references and awaits: model calls run on the slots' worker threads. A
failing or hanging model call costs that batch and takes the slot out; it never stops the pool.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

from pipeline.config import PoolSettings
from pipeline.errors import PlacementError, PoolError, SlotError, SlotHang, SlotOutOfMemory, slot_error
from streams import SYSTEM_CLOCK, Backoff, Clock
from streams.handoff import Handoff, wait_event

from . import faults
from .placement import Move, Placer, SlotRecord, SlotState

log = logging.getLogger(__name__)

DEFAULT_SERVICE_S = 0.05  # per frame, before a slot has measured itself


class Model(Protocol):
    """What a slot runs: a detector, a lip-sync model, or a test's fake."""

    def load(self) -> None: ...

    def warmup(self) -> None: ...

    def infer(self, *args: Any) -> list[Any]: ...

    def close(self) -> None: ...


# -- one slot ----------------------------------------------------------------------------------------
class Slot:
    """A model copy on its own worker thread, with a watchdog and a measured service time."""

    def __init__(self, name: str, model: Model, device: str, hang_timeout: float, clock: Clock = SYSTEM_CLOCK,
                 hang_factor: float = 10.0) -> None:
        self.name = name
        self.model = model
        self.device = device
        self.hang_timeout = hang_timeout
        self.hang_factor = hang_factor
        self.clock = clock
        self._pool = WorkerThread(f"slot[{name}]")
        self.batches = 0
        self.frames = 0
        self.errors = 0
        self.busy_s = 0.0  # seconds spent in model calls that returned (the busy fraction is its rate)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # inputs per call -> calls
        self.service_s_per_frame: float | None = None  # EWMA of the batch time per output
        self._closed = False

    async def start(self, calibration: tuple[tuple[Any, ...], int] | None = None) -> None:
        """Load and warm up the model; a calibration call (args, outputs) seeds the service time,
        so placement knows a member's cost before the first real batch."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self.model.load)
        await loop.run_in_executor(self._pool, self.model.warmup)
        if calibration is not None:
            args, n = calibration
            t0 = time.perf_counter()
            await loop.run_in_executor(self._pool, lambda: self.model.infer(*args))
            self.service_s_per_frame = (time.perf_counter() - t0) / max(1, n)

    async def infer(self, args: tuple[Any, ...], n: int) -> list[Any]:
        """One model call on the worker thread; backend errors come back as SlotError subclasses."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        limit = max(self.hang_timeout, (self.service_s_per_frame or 0.0) * n * self.hang_factor)
        try:
            fut = loop.run_in_executor(self._pool, self.model.infer, *args)
            try:
                # the watchdog: a model call that never returns must not hold its members hostage
                async with asyncio.timeout(limit):  # (not wait_for: see handoff.wait_event)
                    out = await asyncio.shield(fut)
            except TimeoutError:
                raise SlotHang(f"slot {self.name}: batch of {n} still running after {limit:.1f}s (hang)") from None
            if len(out) != n:
                raise SlotError(f"slot {self.name}: model returned {len(out)} outputs for {n} inputs")
        except SlotError:
            self.errors += 1
            raise
        except Exception as exc:
            self.errors += 1
            raise slot_error(self.name, exc) from exc
        took = time.perf_counter() - t0
        self.busy_s += took
        self.batch_sizes[n] += 1
        per = took / max(1, n)
        prev = self.service_s_per_frame
        self.service_s_per_frame = per if prev is None else 0.8 * prev + 0.2 * per
        self.batches += 1
        self.frames += n
        return out

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            # bounded: after a hang the worker may never come back to run close()
            async with asyncio.timeout(5.0):
                await loop.run_in_executor(self._pool, self.model.close)
        except TimeoutError:
            log.warning("slot %s: worker still busy; abandoning it", self.name)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


class WorkerThread(concurrent.futures.Executor):
    """One daemon thread running a slot's model calls in order (an executor for `run_in_executor`).

    Not a ThreadPoolExecutor: the interpreter joins those threads at exit, so one model call that
    never returns kept a stopped framegrid from exiting (SIGTERM during a hang: shutdown done, the
    process still there). A hung call here is abandoned with its daemon thread.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]
                                       | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        if self._closed:
            raise RuntimeError("worker thread is shut down")
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((fut, (lambda: fn(*args, **kwargs)) if kwargs else fn, () if kwargs else args))
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._queue.put(None)
        if wait:
            self._thread.join()


# -- members and jobs -------------------------------------------------------------------------------
class Feed(Protocol):
    """One member's supply of work (a stream's mailbox, a session's request queue)."""

    key: str

    def waiting_since(self) -> float | None:
        """Monotonic arrival of the oldest item waiting (None: nothing waiting)."""
        ...

    def ready_at(self, now: float) -> float | None:
        """When this feed can next give an item: <= now if now; None if not known to come soon."""
        ...

    def take(self, now: float, room: int) -> list[Any]:
        """The items to batch now (at least one if any is fit; never more than `room` unless the
        first alone is larger). May drop items (counted by cause) and return none."""
        ...

    def rate(self) -> float | None:
        """Outputs per second this member asks for (placement cost), None before it is known."""
        ...

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        """Called from any thread when an item arrives (wakes the batcher of the member's slot)."""
        ...


Taken = tuple[Feed, Any]


class JobAdapter(Protocol):
    """What a kind of work does differently: how items become one model call, and where outputs go."""

    def size(self, item: Any) -> int:
        """Outputs the item needs (a frame: 1; a lip-sync request: its jobs)."""
        ...

    def call(self, items: list[Any]) -> tuple[Any, ...]:
        """The model's infer(*args) arguments for these items."""
        ...

    def deliver(self, taken: list[Taken], outputs: list[Any], shipped_at: float) -> None:
        """Hand the outputs on (on the loop; must not block)."""
        ...

    def failed(self, taken: list[Taken], exc: SlotError) -> None:
        """These items were lost to a failed model call (count them, release waiters)."""
        ...


# -- the batcher ------------------------------------------------------------------------------------
class Batcher:
    """Arrival-driven batches for one slot: no tick.

    When the slot is free it takes what is ready now, oldest-waiting member first, up to the
    batch size. It waits (at most the batch timeout after its first item) only when waiting pays:
    the batch is partial and another member's next item is due before the deadline. A member's
    rate limit (`max_fps` phase) and frame age are its feed's business.

    The slots of one device serve the device's members together (`members` is the device's), so
    a slot that is free takes the oldest waiting frame of any of them: one slot cannot starve its
    streams while its sibling idles. `in_flight` (shared by the pool) holds the members with an
    item in a batch; they are skipped until it is delivered, so a member's results stay in order.
    """

    def __init__(self, slot: Slot, record: SlotRecord, members: Callable[[], Iterable[Feed]],
                 adapter: JobAdapter, settings: PoolSettings, clock: Clock,
                 on_fault: Callable[[Batcher, SlotError], None], in_flight: set[str] | None = None,
                 on_done: Callable[[], None] | None = None) -> None:
        self.slot = slot
        self.record = record
        self.members = members
        self.in_flight = in_flight if in_flight is not None else set()
        self._holding: set[str] = set()  # this batcher's share of in_flight
        self.on_done = on_done
        self.adapter = adapter
        self.batch_size = settings.batch_size  # halved for good after an out-of-memory
        self.batch_ms = settings.cpu_batch_ms
        self.batch_timeout = settings.batch_timeout
        self.clock = clock
        self.on_fault = on_fault
        self.wake = asyncio.Event()
        # whether this batcher looks for work now: set before it looks, cleared while its batch runs.
        # A frame that arrives while every batcher of the device is busy wakes nobody (the loop is not
        # woken for it): the batcher finds it when its batch is done (32 cameras: 800 wake-ups a second)
        self.listening = False
        self._forming: list[Taken] = []  # items taken for a batch not yet shipped

    async def run(self) -> None:
        while True:
            taken: list[Taken] = []
            try:
                self.listening = True
                taken = await self._collect()
                self.listening = False
                self._forming = []  # from here `_ship` accounts for them, also when cancelled
                await self._ship(taken)
            except asyncio.CancelledError:
                if self._forming:  # stopped while a partial batch waited for more: failed, never lost
                    self.adapter.failed(self._forming, SlotError(f"slot {self.slot.name}: stopped while "
                                                                 "forming a batch"))
                    self._forming = []
                raise
            except Exception:  # an adapter's bug costs this batch, never the pool
                log.exception("slot %s: batch of %d could not be delivered", self.slot.name, len(taken))
            finally:
                self.listening = False
                self.in_flight.difference_update(self._holding)  # also when cancelled mid-collect
                self._holding.clear()
                if taken and self.on_done is not None:
                    self.on_done()  # their next items may be waiting: any free sibling may take them

    def limit(self) -> int:
        """Items this batch may take: the batch size, on a CPU slot cut to what its measured time per
        item runs within `cpu_batch_ms` (a CPU gains little from a batch of costly frames and its
        latency grows with every one; cheap frames still batch)."""
        per = self.slot.service_s_per_frame
        if self.batch_ms is None or self.slot.device != "cpu" or not per:
            return self.batch_size
        return max(1, min(self.batch_size, int(self.batch_ms / 1000 / per)))

    async def _collect(self) -> list[Taken]:
        taken: list[Taken] = []
        self._forming = taken  # what a cancellation mid-collect must account for
        used: set[str] = set()
        filled = 0
        deadline: float | None = None
        limit = self.limit()
        while True:
            self.wake.clear()
            now = self.clock.mono()
            if not self.record.healthy:  # taken out: wait for the restart to wake us
                await self.wake.wait()
                continue
            members = [f for f in self.members() if f.key not in used and f.key not in self.in_flight]
            ready = []
            for f in members:
                since, at = f.waiting_since(), f.ready_at(now)
                if since is not None and at is not None and at <= now:
                    ready.append((since, f.key, f))
            for _, _, f in sorted(ready, key=lambda r: (r[0], r[1])):
                if filled >= limit:
                    break
                items = f.take(now, limit - filled)
                if items:
                    used.add(f.key)
                    self.in_flight.add(f.key)
                    self._holding.add(f.key)
                    taken.extend((f, it) for it in items)
                    filled += sum(self.adapter.size(it) for it in items)
            if filled >= limit:
                return taken
            upcoming = [at for f in members if f.key not in used and (at := f.ready_at(now)) is not None]
            if taken:
                if deadline is None:
                    deadline = now + self.batch_timeout
                due = [at for at in upcoming if at <= deadline]
                if now >= deadline or not due:
                    return taken  # waiting would not pay: run the partial batch now
                first = min(due)
                # late: until it arrives or the deadline
                timeout: float | None = first - now if first > now else deadline - now
            else:
                later = [at for at in upcoming if at > now]
                timeout = min(later) - now if later else None  # a rate-limited member's turn, or any arrival
            await wait_event(self.wake, timeout)

    async def _ship(self, taken: list[Taken]) -> None:
        shipped_at = self.clock.mono()
        items = [it for _, it in taken]
        n = sum(self.adapter.size(it) for it in items)
        try:
            outputs = await self.slot.infer(self.adapter.call(items), n)
        except asyncio.CancelledError:
            # the batcher is stopped (a slot restart or shutdown) with this batch in flight: its items are
            # accounted for as failed (a frame dropped, a lipsync request answered), never left pending
            self.adapter.failed(taken, SlotError(f"slot {self.slot.name}: stopped with a batch in flight"))
            raise
        except SlotOutOfMemory as exc:
            if len(taken) < 2:
                self._lost(taken, exc)
                return
            # out of memory: the same items again at half the batch size, and keep that size
            half = len(taken) // 2
            self.batch_size = max(1, half)
            log.warning("slot %s: out of memory at batch %d; batch size now %d", self.slot.name, len(taken),
                        self.batch_size)
            for k in range(0, len(taken), self.batch_size):  # the same items, in batches of the new size
                await self._ship(taken[k:k + self.batch_size])
            return
        except SlotError as exc:
            self._lost(taken, exc)
            return
        self.adapter.deliver(taken, outputs, shipped_at)

    def _lost(self, taken: list[Taken], exc: SlotError) -> None:
        log.error("slot %s: batch of %d failed: %s", self.slot.name, len(taken), exc)
        self.adapter.failed(taken, exc)
        self.on_fault(self, exc)


# -- the pool ---------------------------------------------------------------------------------------
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def _create_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro, name=name)


class SlotPool:
    """One model's executor slots: placement, batching, failover and restarts.

    `factory(i)` makes slot i's (unloaded) model; `devices[i]` is where it runs. `check(model)`
    may reject a loaded model (raising). `on_change()` is called whenever a slot's state or its
    members change (the devices payload). Members join with `place(feed)`.
    """

    def __init__(self, name: str, factory: Callable[[int], Model], devices: Sequence[str], adapter: JobAdapter,
                 settings: PoolSettings, *, clock: Clock = SYSTEM_CLOCK,
                 calibration: tuple[tuple[Any, ...], int] | None = None,
                 check: Callable[[Any], None] | None = None, on_change: Callable[[], None] | None = None,
                 spawn: Spawn | None = None, drained: AbstractSet[str] = frozenset()) -> None:
        if not devices:
            raise PoolError(f"pool {name}: no slot planned")
        self.name = name
        self.factory = factory
        self.devices = list(devices)
        self.adapter = adapter
        self.settings = settings
        self.clock = clock
        self.calibration = calibration
        self.check = check
        self.on_change = on_change or (lambda: None)
        self.spawn = spawn or _create_task
        self.placer = Placer(settings.rebalance_band)
        self.feeds: dict[str, Feed] = {}
        self.in_flight: set[str] = set()  # members with an item in a batch (on any slot)
        self.slots: dict[str, Slot] = {}
        self.batchers: dict[str, Batcher] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._restarting: set[asyncio.Task[None]] = set()
        # the devices an operator took out (owned by `Models`, read here): their slots stay out, also
        # after a restart
        self.drained = drained
        self.closed = False

    def slot_names(self) -> list[str]:
        return [f"{self.name}.{i}" for i in range(len(self.devices))]

    def _model(self, index: int, slot: str) -> Model:
        """A new model copy for a slot; wrapped for armed faults only when FRAMEGRID_FAULTS=1 (soak, tests)."""
        model = self.factory(index)
        return faults.FaultyModel(model, slot, self.settings.hang_timeout) if faults.ENABLED else model

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every slot (in parallel, each on its worker thread) and start their batchers.

        Raises PoolError naming each slot's error when none could start; slots that could not
        start are `failed`, the others serve.
        """
        for i, name in enumerate(self.slot_names()):
            self.placer.add_slot(name, state=SlotState.STARTING)
            self.slots[name] = Slot(name, self._model(i, name), self.devices[i], self.settings.hang_timeout, self.clock)
        for name in self.slot_names():
            device = self.slots[name].device
            self.batchers[name] = Batcher(self.slots[name], self.placer.slots[name], self._members_of(name),
                                          self.adapter, self.settings, self.clock, self._on_fault, self.in_flight,
                                          on_done=functools.partial(self._wake_local, device))
        await asyncio.gather(*(self._start_slot(name) for name in self.slots))
        if not self.placer.healthy():
            errors = "; ".join(f"{n}: {r.last_error}" for n, r in self.placer.slots.items())
            await self.close()
            raise PoolError(errors)
        for name, batcher in self.batchers.items():
            self._tasks[name] = self.spawn(batcher.run(), f"slot[{name}].batcher")

    async def _start_slot(self, name: str) -> bool:
        slot, record = self.slots[name], self.placer.slots[name]
        try:
            await slot.start(self.calibration)
            if self.check is not None:
                self.check(slot.model)
        except Exception as exc:
            record.state, record.last_error = SlotState.FAILED, str(exc)
            log.error("slot %s: cannot start: %s", name, exc)
            await slot.close()
            return False
        record.state = SlotState.DRAINED if slot.device in self.drained else SlotState.HEALTHY
        record.up_since = self.clock.mono()
        return True

    async def close(self) -> None:
        self.closed = True
        tasks = [*self._tasks.values(), *self._restarting]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for feed in self.feeds.values():
            feed.set_notify(None)
        await asyncio.gather(*(s.close() for s in self.slots.values()), return_exceptions=True)

    # -- members -----------------------------------------------------------------------------------
    def _members_of(self, name: str) -> Callable[[], list[Feed]]:
        """A batcher's members, read from the placer's table at every call (it is the only table)."""
        device = self.slots[name].device
        group = [n for n, s in self.slots.items() if s.device == device]
        return lambda: [self.feeds[k] for n in group for k in self.placer.slots[n].members if k in self.feeds]

    def _wake_device(self, device: str, key: str) -> Callable[[], None]:
        """Member `key`'s notify: wakes every batcher of the device's slots (they share its members)
        with one hand-off to the loop, from the decode thread, when one of them is looking for work
        and the member has no item in a batch (until then no batcher may take its next one)."""
        batchers = [b for b in self.batchers.values() if b.slot.device == device]
        in_flight = self.in_flight
        return Handoff(asyncio.get_running_loop()).waker(
            *(b.wake for b in batchers),
            listening=lambda: key not in in_flight and any(b.listening for b in batchers))

    def cost(self, feed: Feed, slot: str | None = None) -> float:
        """Share of a slot the member needs: its rate x the slot's measured time per output."""
        rate = feed.rate() or 15.0  # a typical camera until measured
        times = [s.service_s_per_frame for n, s in self.slots.items() if (slot is None or n == slot)
                 and s.service_s_per_frame is not None]
        return rate * (max(times) if times else DEFAULT_SERVICE_S)

    def place(self, feed: Feed) -> str:
        """Put a member on the healthy slot it leaves least utilised (`Placer.place`); PlacementError when none
        admits it."""
        if self.closed:
            raise PoolError(f"pool {self.name} is closed")
        slot = self.placer.place(feed.key, self.cost(feed), force=not self.settings.admission_control)
        self.feeds[feed.key] = feed
        self._attach(feed, slot)
        self.on_change()
        return slot

    def pin(self, feed: Feed, slot: str) -> str:
        """Put a member on a given slot (placed normally instead when that slot is not healthy)."""
        if not self.placer.slots[slot].healthy:
            return self.place(feed)
        self.placer.assign(feed.key, slot, self.cost(feed, slot))
        self.feeds[feed.key] = feed
        self._attach(feed, slot)
        self.on_change()
        return slot

    def remove(self, key: str) -> Feed | None:
        """Take a member out; an item of its in flight is still delivered."""
        self.placer.remove(key)
        feed = self.feeds.pop(key, None)
        if feed is not None:
            feed.set_notify(None)
            self.on_change()
        return feed

    def slot_of(self, key: str) -> str | None:
        return self.placer.where(key)

    def members(self, slot: str) -> list[str]:
        return sorted(self.placer.slots[slot].members)

    def state(self, slot: str) -> SlotState:
        return self.placer.slots[slot].state

    def _attach(self, feed: Feed, slot: str) -> None:
        device = self.slots[slot].device
        feed.set_notify(self._wake_device(device, feed.key))
        self._wake_local(device)

    def _wake_local(self, device: str) -> None:
        """Wake the device's batchers from the loop."""
        for b in self.batchers.values():
            if b.slot.device == device:
                b.wake.set()

    def _apply(self, moves: Iterable[Move]) -> list[Move]:
        applied = []
        for move in moves:
            feed = self.feeds.get(move.stream)
            if feed is None:
                continue
            self._attach(feed, move.target)
            applied.append(move)
        return applied

    def rebalance(self) -> list[Move]:
        """Refresh costs from measured rates and service times, then apply the fewest moves that
        even the load. Lossless: an item in flight on the old slot is delivered from there, the
        member's next item goes to the new slot (no await between the table change and re-wiring)."""
        for record in self.placer.slots.values():
            for key in record.members:
                if key in self.feeds:
                    record.members[key] = self.cost(self.feeds[key], record.name)
        applied = self._apply(self.placer.rebalance())
        for m in applied:
            log.info("%s: moved %s -> %s (rebalance)", m.stream, m.source, m.target)
        if applied:
            self.on_change()
        return applied

    # -- maintenance -------------------------------------------------------------------------------
    def drain(self, device: str) -> list[Move]:
        """Take every slot of `device` out of service (`Models.drain` records the device as drained)
        and move its members to other devices' slots (past their capacity when needed: a drain is the
        operator's call). PlacementError, and nothing changed, when members would have nowhere to go."""
        problem = self.drain_problem(device)
        if problem:
            raise PlacementError(problem)
        names = [n for n, s in self.slots.items() if s.device == device]
        for n in names:
            if self.placer.slots[n].state is SlotState.HEALTHY:
                self.placer.slots[n].state = SlotState.DRAINED
        moves = []
        for n in names:
            if self.placer.slots[n].state is SlotState.DRAINED:
                moved, _ = self.placer.evacuate(n, SlotState.DRAINED, force=True)
                moves += moved
        applied = self._apply(moves)
        for m in applied:
            log.info("%s: moved %s -> %s (drain %s)", m.stream, m.source, m.target, device)
        self.on_change()
        return applied

    def drain_problem(self, device: str) -> str | None:
        """Why `drain(device)` would leave members with nowhere to go (None: it would not)."""
        names = [n for n, s in self.slots.items() if s.device == device]
        elsewhere = [r for n, r in self.placer.slots.items() if r.healthy and n not in names]
        if any(self.placer.slots[n].members for n in names) and not elsewhere:
            return f"model {self.name}: no healthy slot on another device to take the streams of {device}"
        return None

    def resume(self, device: str) -> list[Move]:
        """Put a drained device's slots back in service and rebalance onto them."""
        for n, s in self.slots.items():
            if s.device == device and self.placer.slots[n].state is SlotState.DRAINED:
                self.placer.slots[n].state = SlotState.HEALTHY
                self.batchers[n].wake.set()
        self.on_change()
        return self.rebalance()

    # -- failover ----------------------------------------------------------------------------------
    def _on_fault(self, batcher: Batcher, exc: SlotError) -> None:
        """A model call failed or hung: take the slot out, move its members at once, restart it."""
        name = batcher.slot.name
        record = self.placer.slots[name]
        if not record.healthy or self.closed:
            return
        record.last_error = str(exc)
        moves, stay = self.placer.evacuate(name, force=not self.settings.admission_control)
        moved = self._apply(moves)
        log.warning("slot %s: unhealthy (%s); moved %s", name, exc,
                    ", ".join(f"{m.stream}->{m.target}" for m in moved) or "nothing")
        if stay:
            log.warning("slot %s: %s wait(s) for its restart (no healthy slot with room)", name, ", ".join(stay))
        self.on_change()
        task = self.spawn(self._restart(name), f"slot[{name}].restart")
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _restart(self, name: str) -> None:
        try:
            await self._restart_with_backoff(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the pipeline's TaskGroup down: the slot fails
            log.exception("slot %s: restart failed", name)
            record = self.placer.slots[name]
            record.state, record.last_error = SlotState.FAILED, f"restart failed: {exc}"
            self.on_change()

    async def _restart_with_backoff(self, name: str) -> None:
        record, policy = self.placer.slots[name], self.settings
        backoff = Backoff(min(0.5, policy.restart_backoff_cap), policy.restart_backoff_cap)
        while not self.closed:
            now = self.clock.mono()
            record.restarts = [t for t in record.restarts if now - t < policy.restart_window]
            if len(record.restarts) >= policy.restart_budget:
                record.state = SlotState.FAILED
                log.error("slot %s: failed (%d restart(s) within %.0fs; last error: %s)", name,
                          len(record.restarts), policy.restart_window, record.last_error)
                self.on_change()
                return
            if record.up_since is not None and now - record.up_since >= policy.restart_stable_s:
                record.streak = 0  # it served for a while since its last restart: not a crash loop
            record.up_since = None
            record.restarts.append(now)
            # escalate only within a run of faults: counting every restart in the window made a slot
            # that faulted now and then (each time after minutes of service) wait up to the cap, and
            # with the pool's other slot also down its streams waited that long (soak: 4-7 s)
            backoff.attempts = record.streak
            record.streak += 1
            await self.slots[name].close()
            await asyncio.sleep(backoff.next_delay())
            index = self.slot_names().index(name)
            slot = Slot(name, self._model(index, name), self.devices[index], self.settings.hang_timeout, self.clock)
            self.slots[name] = slot
            self.batchers[name].slot = slot
            if not await self._start_slot(name):
                continue  # state failed for now; the budget decides whether to try again
            for key in record.members:  # members that waited here
                if key in self.feeds:
                    record.members[key] = self.cost(self.feeds[key], name)
            log.info("slot %s: restarted", name)
            self.batchers[name].wake.set()
            self.on_change()
            return

    # -- observability ------------------------------------------------------------------------------
    def snapshot(self, members_key: str = "streams") -> dict[str, dict[str, Any]]:
        """Per slot: the health record and the worker's counters (what `devices` and `stats` publish)."""
        out = {}
        for name, record in self.placer.slots.items():
            slot = self.slots[name]
            service = slot.service_s_per_frame
            out[name] = {
                "model": self.name,
                "device": slot.device,
                "state": record.state.value,
                "restarts": len(record.restarts),
                "batches": slot.batches,
                "frames": slot.frames,
                "errors": slot.errors,
                "batch_size": self.batchers[name].batch_size,
                "mean_batch": round(slot.frames / slot.batches, 2) if slot.batches else None,  # outputs per call
                "last_error": record.last_error,
                "service_ms_per_frame": None if service is None else round(service * 1000, 2),
                members_key: sorted(record.members),
            }
        return out
