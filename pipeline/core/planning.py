"""Planning: which slots each model gets (device, threads) and which runtime runs on the CPU.

Pure: device facts in, a `Plan` out, before anything is loaded. The pipeline and
`framegrid devices` call the same function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from detectors.modelfile import ModelFileError, model_kind
from detectors.runtimes import resolve_backend
from pipeline.config import ConfigError, DevicesConfig, ModelConfig

from .devices import GB, DeviceInfo, SlotAssignment, pinned_device, plan_slots, slot_layout


@dataclass
class Plan:
    layouts: dict[str, list[SlotAssignment]] = field(default_factory=dict)  # model -> its slots
    runtimes: dict[str, str] = field(default_factory=dict)  # model -> CPU runtime, for models with CPU slots

    def describe(self, model: str) -> str:
        where = ", ".join(a.device + (f" ({a.threads} threads)" if a.threads else "") for a in self.layouts[model])
        runtime = self.runtimes.get(model)
        return f"{len(self.layouts[model])} slot(s) on {where}" + (f"; CPU runtime {runtime}" if runtime else "")


def plan_models(models: Mapping[str, ModelConfig], names: Iterable[str], devices: DevicesConfig,
                facts: list[DeviceInfo], running: Mapping[str, str] | None = None) -> Plan:
    """Plan the slots of `names`. `running` are CPU runtimes already in the process (model -> runtime).

    Raises ConfigError (with the key path) for a device that cannot be used, or when models would
    put two different inference runtimes on the CPU of this one process (they would fight over
    the same cores).
    """
    plan = Plan()
    for name in names:
        mcfg = models[name]
        plans = plan_slots(facts, int((mcfg.slot_memory_gb or devices.slot_memory_gb) * GB), devices.usable_fraction,
                           dict(devices.overrides), devices.cpu_slots, devices.cpu_threads_per_slot,
                           use_cpu_with_gpus=devices.use_cpu_with_gpus)
        try:
            plan.layouts[name] = slot_layout(plans, mcfg.slots, pinned_device(mcfg.device), mcfg.threads)
        except ValueError as exc:
            raise ConfigError([(f"models.{name}.device", str(exc))]) from exc
        if any(a.device == "cpu" for a in plan.layouts[name]):
            try:
                plan.runtimes[name] = resolve_backend(mcfg.backend, "cpu", model_kind(mcfg.weights))
            except ModelFileError as exc:
                raise ConfigError([(f"models.{name}.weights", str(exc))]) from exc
            except ValueError as exc:
                raise ConfigError([(f"models.{name}.backend", str(exc))]) from exc
    cpu = {**(running or {}), **plan.runtimes}
    if len(set(cpu.values())) > 1:
        detail = ", ".join(f"{n}: {r}" for n, r in sorted(cpu.items()))
        raise ConfigError([("models.*.backend", f"one inference runtime per process on the CPU, got {detail}; "
                                                  "set the same backend for these models")])
    return plan
