"""The detection models of one process: each model's config, slot plan, CPU runtime, slot pool and
load error in one record, and the devices an operator drained.

`Models` is the only home of these facts. The composer asks it to load, add, remove, drain and
rebalance; the HTTP API, metrics, telemetry and a cluster node's worker read it. It knows nothing of
streams beyond the `on_failed` callback through which a model that cannot start marks its streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from detectors import DetectorError
from pipeline.config import Config, ModelConfig, check_name
from pipeline.errors import PlacementError, PoolError
from streams import Clock, redact_text

from .detect import DetectorFactory, detect_pool
from .devices import DeviceInfo, SlotAssignment
from .placement import Move
from .planning import plan_models
from .results import Results
from .slots import SlotPool

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], Any]


@dataclass
class LoadedModel:
    """Everything known about one model while it is configured."""

    name: str
    cfg: ModelConfig
    layout: list[SlotAssignment] | None = None  # its slots (device, threads), once planned
    runtime: str | None = None  # the inference runtime of its CPU slots, if it has any
    pool: SlotPool | None = None  # once its slots started
    error: str | None = None  # why it could not start (redacted)

    def describe(self) -> str:
        layout = self.layout or []
        where = ", ".join(a.device + (f" ({a.threads} threads)" if a.threads else "") for a in layout)
        return f"{len(layout)} slot(s) on {where}" + (f"; CPU runtime {self.runtime}" if self.runtime else "")


class Models:
    """The table of models (config order), their pools and the drained devices."""

    def __init__(self, config: Config, factory: DetectorFactory, results: Results, clock: Clock,
                 facts: Callable[[], list[DeviceInfo]], secrets: Callable[[], list[str]],
                 devices_changed: Callable[[], None], on_failed: Callable[[str, str], None]) -> None:
        self.config = config
        self.factory = factory
        self.results = results
        self.clock = clock
        self.facts = facts
        self.secrets = secrets
        self.devices_changed = devices_changed
        self.on_failed = on_failed  # (model, why): its streams are marked failed
        self.table: dict[str, LoadedModel] = {n: LoadedModel(n, c) for n, c in config.models.items()}
        self.drained: set[str] = set()  # devices taken out by an operator
        self.spawn: Spawn | None = None  # the TaskGroup's create_task, set by the composer when it runs

    # -- reads -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.table)

    def cfg(self, name: str) -> ModelConfig:
        return self.table[name].cfg

    def pool(self, name: str) -> SlotPool | None:
        model = self.table.get(name)
        return model.pool if model is not None else None

    def class_names(self, name: str) -> list[str]:
        """A loaded model's class names (empty while it is not loaded)."""
        pool = self.pool(name)
        if pool is None:
            return []
        return next((list(names) for s in pool.slots.values() if (names := getattr(s.model, "class_names", None))),
                    [])

    @property
    def pools(self) -> dict[str, SlotPool]:
        """The loaded models' pools, by model."""
        return {n: m.pool for n, m in self.table.items() if m.pool is not None}

    def runtimes(self) -> set[str]:
        """The CPU inference runtimes in this process (one at most: see `plan_models`)."""
        return {m.runtime for m in self.table.values() if m.runtime}

    def errors(self) -> dict[str, str]:
        return {n: m.error for n, m in self.table.items() if m.error}

    def throughput(self) -> dict[str, float]:
        """Frames per second each loaded model's healthy slots can serve (capacity / measured time per
        frame): what a cluster head places streams against."""
        out = {}
        for name, pool in self.pools.items():
            total = 0.0
            for slot_name, slot in pool.slots.items():
                record = pool.placer.slots.get(slot_name)
                if record is not None and record.healthy and slot.service_s_per_frame:
                    total += record.capacity / slot.service_s_per_frame
            out[name] = total
        return out

    # -- loading -------------------------------------------------------------------------------------------
    def plan(self, names: list[str]) -> None:
        """Plan the slots of `names` (ConfigError: a device that cannot be used, or a second CPU runtime)."""
        running = {n: m.runtime for n, m in self.table.items() if m.runtime and n not in names}
        plan = plan_models({n: m.cfg for n, m in self.table.items()}, names, self.config.devices, self.facts(),
                           running)
        for name in names:
            self.table[name].layout = plan.layouts[name]
            self.table[name].runtime = plan.runtimes.get(name)

    async def start(self, names: list[str]) -> None:
        """Plan the slots of `names` together (said in the log), then load each (one failing leaves the
        others running)."""
        self.plan(names)
        for name in names:
            log.info("model %s: %s", name, self.table[name].describe())
        for name in names:
            await self.load(name)

    async def load(self, name: str) -> bool:
        """Start the model's slots; False (its streams marked failed through `on_failed`) when none could."""
        model = self.table[name]
        if model.layout is None:
            self.plan([name])
        assert model.layout is not None
        assert self.spawn is not None, "load() before the composer runs"
        pool = detect_pool(name, model.cfg, model.layout, self.config.pipeline, self.factory, self.results,
                           self.clock, self.devices_changed, self.spawn, self.drained)
        try:
            await pool.start()
        except PoolError as exc:
            msg = redact_text(str(exc), self.secrets())
            log.error("model %s: %s", name, msg)
            model.error = msg
            self.on_failed(name, f"model {name} unavailable: {msg}")
            return False
        model.pool = pool  # a model loaded during maintenance starts with its drained devices' slots out
        model.error = None
        self.devices_changed()
        return True

    async def load_missing(self) -> dict[str, str]:
        """Load every configured model not loaded yet (a cluster node's worker does, so a stream moved
        to it starts at once). -> the models that could not start, with why."""
        todo = [n for n, m in self.table.items() if m.pool is None]
        if todo:
            self.plan(todo)
        for name in todo:
            await self.load(name)
        return {n: self.table[n].error or "" for n in todo if self.table[n].error}

    async def add(self, name: str, cfg: ModelConfig) -> None:
        """Load a model while running (its slots planned like at start), ready for streams.

        Raises ValueError for a bad or duplicate name, ConfigError when it would bring a second CPU
        runtime into the process, and DetectorError when none of its slots could start.
        """
        check_name("model", name)
        if name in self.table:
            raise ValueError(f"model {name} already exists")
        self.table[name] = LoadedModel(name, cfg)
        try:
            self.plan([name])
            loaded = await self.load(name)
        except BaseException:
            self.table.pop(name, None)
            raise
        if not loaded:
            msg = self.table.pop(name).error or "no slot started"
            raise DetectorError(f"model {name}: {msg}")
        log.info("model %s: added (%d slot(s))", name, len(self.pools[name].slots))

    async def remove(self, name: str, users: list[str]) -> None:
        """Stop a model's slots and forget it. Its streams (`users`) must be removed first."""
        if name not in self.table:
            raise KeyError(f"no model {name}")
        if users:
            raise ValueError(f"model {name} still serves stream(s) {', '.join(users)}: remove them first")
        model = self.table.pop(name)
        if model.pool is not None:
            await model.pool.close()
        self.devices_changed()
        log.info("model %s: removed", name)

    async def close(self) -> None:
        """Close every pool at once (a batch in flight finishes); one failing does not keep others open."""
        await asyncio.gather(*(pool.close() for pool in self.pools.values()), return_exceptions=True)

    # -- supervision --------------------------------------------------------------------------------------
    def rebalance(self) -> list[Move]:
        """Apply the fewest moves that even each model's load (see `SlotPool.rebalance`)."""
        return [m for pool in self.pools.values() for m in pool.rebalance()]

    async def rebalance_loop(self, interval: float) -> None:
        """Rebalance every `interval` seconds (0: never)."""
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            self.rebalance()

    def drain(self, device: str) -> list[Move]:
        """Move every stream off `device` (maintenance) until `resume`; KeyError for an unknown device,
        PlacementError (nothing changed) when another device cannot take them."""
        pools = [p for p in self.pools.values() if device in p.devices]
        if not pools and device not in {d.id for d in self.facts()}:
            raise KeyError(device)
        problems = [p for pool in pools if (p := pool.drain_problem(device))]  # all or nothing
        if problems:
            raise PlacementError("; ".join(problems))
        self.drained.add(device)
        return [m for pool in pools for m in pool.drain(device)]

    def resume(self, device: str) -> list[Move]:
        if device not in {d.id for d in self.facts()}:
            raise KeyError(device)
        self.drained.discard(device)
        return [m for pool in self.pools.values() if device in pool.devices for m in pool.resume(device)]
