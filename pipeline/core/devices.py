"""Device discovery and executor-slot planning.

`discover()` lists NVIDIA GPUs through NVML (pynvml from nvidia-ml-py) and always adds the CPU;
without an NVIDIA driver it quietly returns the CPU alone. `plan_slots()` is pure: given device
facts it decides how many executor slots each device hosts, and says why:

    per GPU: floor(free_memory * usable_fraction / slot_memory), unless overridden
    per CPU: a configured count, each with its own thread budget

so the plan can be printed (`framegrid devices`) before any model is loaded, and tested with
invented facts (1 to 8 GPUs of any size) on a machine that has none.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

from pipeline.config import DevicesConfig, default

GB = 1024**3


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Facts about one device, as discovered (or as a test invents them)."""

    id: str  # "cuda:0", "cpu"
    kind: str  # "cuda" | "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    utilization: float | None = None  # percent, GPUs only
    cores: int | None = None  # CPUs only
    temperature_c: float | None = None  # GPUs only, where NVML reports it


@dataclass(frozen=True, slots=True)
class SlotPlan:
    device: DeviceInfo
    slots: int
    slot_bytes: int | None
    usable_bytes: int | None
    threads_per_slot: int | None
    reason: str


def _cpu_info() -> DeviceInfo:
    total = free = 0
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if ":" in line}
        total, free = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return DeviceInfo("cpu", "cpu", "CPU", total, free, cpu_utilization(), cores)


_cpu_times: tuple[float, float] | None = None  # (busy, total) jiffies at the previous reading


def cap_cpu_cores(facts: list[DeviceInfo], cores: int | None) -> list[DeviceInfo]:
    """`facts` with the CPU's cores capped at `cores` (a cluster node declaring part of its machine)."""
    if cores is None:
        return facts
    return [replace(d, cores=min(d.cores or cores, cores)) if d.kind == "cpu" else d for d in facts]


class DeviceFacts:
    """The device facts of one process: as planning used them (discovered once, at the first ask) and
    as they are now (memory in use, utilisation, temperature). Facts given at construction (tests:
    invented GPUs) are returned as given either way. `cores` caps the CPU's (a cluster node declaring
    part of its machine)."""

    def __init__(self, given: list[DeviceInfo] | None = None, cores: int | None = None) -> None:
        self._planned = given
        self._given = given is not None
        self.cores_cap = cores

    def planned(self) -> list[DeviceInfo]:
        if self._planned is None:
            self._planned = cap_cpu_cores(discover(), self.cores_cap)
        return self._planned

    def now(self) -> list[DeviceInfo]:
        """Blocking (NVML, /proc): call it off the loop."""
        return list(self.planned()) if self._given else cap_cpu_cores(discover(), self.cores_cap)

    def cpu_cores(self) -> int:
        """The cores of the CPU planning used (at least 1)."""
        cpu = next((d for d in self.planned() if d.kind == "cpu"), None)
        return (cpu.cores if cpu else None) or 1


def cpu_utilization() -> float | None:
    """Percent of all cores busy since the previous call (None on the first call or without /proc/stat)."""
    global _cpu_times
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields)
    prev, _cpu_times = _cpu_times, (total - idle, total)
    if prev is None or total <= prev[1]:
        return None
    return round(100.0 * (total - idle - prev[0]) / (total - prev[1]), 1)


def discover(nvml: ModuleType | Any | None = None) -> list[DeviceInfo]:
    """GPUs first (by NVML index), then the CPU. `nvml` may be injected (tests, other vendors)."""
    devices: list[DeviceInfo] = []
    if nvml is None:
        try:
            import pynvml

            nvml = pynvml
        except ImportError:
            nvml = None
    if nvml is not None:
        try:
            nvml.nvmlInit()
        except Exception:  # no driver / no library: a CPU machine, nothing to report
            nvml = None
    if nvml is not None:
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                name = nvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                try:
                    util: float | None = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                except Exception:
                    util = None
                try:
                    temp: float | None = float(nvml.nvmlDeviceGetTemperature(h, 0))  # NVML_TEMPERATURE_GPU
                except Exception:
                    temp = None
                devices.append(DeviceInfo(f"cuda:{i}", "cuda", name, int(mem.total), int(mem.free), util,
                                          temperature_c=temp))
        finally:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
    if not devices and os.path.exists("/dev/nvidiactl"):
        devices += _torch_gpus()  # a driver but no NVML library: ask torch (only then: importing it costs)
    devices.append(_cpu_info())
    return devices


def _torch_gpus() -> list[DeviceInfo]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(DeviceInfo(f"cuda:{i}", "cuda", torch.cuda.get_device_name(i), int(total), int(free)))
        return out
    except Exception:  # a broken CUDA install is a CPU machine, quietly
        return []


# CPU slots by default: one single-threaded slot per core, up to this many (then threads grow).
# On the 2-core test machine two 1-thread OpenVINO slots took 24 ms CPU per 640 frame where one
# 2-thread slot took 34 ms (threads of one inference wait for each other); not measured above 2 cores.
MAX_AUTO_CPU_SLOTS = 4


def plan_slots(
    devices: list[DeviceInfo],
    slot_memory_bytes: int,
    usable_fraction: float = default(DevicesConfig, "usable_fraction"),
    overrides: dict[str, int] | None = None,
    cpu_slots: int | None = 1,
    cpu_threads_per_slot: int | None = None,
    kind: str = "detect",
    use_cpu_with_gpus: bool = False,
) -> list[SlotPlan]:
    """How many `kind` slots each device hosts, with a one-line reason per device."""
    if slot_memory_bytes <= 0:
        raise ValueError("slot memory must be positive")
    if not 0 < usable_fraction <= 1:
        raise ValueError("usable_fraction must be in (0, 1]")
    overrides = overrides or {}
    has_gpu = any(d.kind == "cuda" for d in devices)
    plans = []
    for d in devices:
        if d.kind == "cuda":
            usable = int(d.free_bytes * usable_fraction)
            computed = math.floor(usable / slot_memory_bytes)
            head = (f"GPU {d.id.split(':')[1]} {d.name}: {d.total_bytes / GB:.1f} GB total, "
                    f"{usable / GB:.1f} GB usable")
            if d.id in overrides:
                n = overrides[d.id]
                reason = f"{head} -> {n} {kind} slots (override; memory alone would allow {computed})"
            else:
                n = computed
                reason = f"{head} -> {n} {kind} slot{'s' if n != 1 else ''} of {slot_memory_bytes / GB:.1f} GB"
                if n == 0:
                    reason += " (too small for one slot: not used)"
            plans.append(SlotPlan(d, n, slot_memory_bytes, usable, None, reason))
        else:
            cores = d.cores or 1
            if "cpu" in overrides:
                n, why = overrides["cpu"], "override"
            elif has_gpu and not use_cpu_with_gpus:
                n, why = 0, "GPUs present"
            elif cpu_slots is None:
                n, why = min(cores, MAX_AUTO_CPU_SLOTS), f"auto: one per core, at most {MAX_AUTO_CPU_SLOTS}"
            else:
                n, why = cpu_slots, "configured"
            threads = cpu_threads_per_slot or max(1, cores // max(1, n))
            reason = f"CPU: {cores} cores -> {n} {kind} slot{'s' if n != 1 else ''} ({why})"
            if n:
                reason += f", {threads} thread{'s' if threads != 1 else ''} each"
                if n * threads > cores:
                    reason += f" (oversubscribed: {n * threads} threads on {cores} cores)"
            plans.append(SlotPlan(d, n, None, None, threads if n else None, reason))
    return plans


@dataclass(frozen=True, slots=True)
class SlotAssignment:
    """Where one executor slot of a model runs, and with how many inference threads (CPU)."""

    device: str
    threads: int | None


def pinned_device(setting: str) -> str | None:
    """A `device` setting as a device id: None for "auto" (every planned device), "cuda" -> "cuda:0"."""
    if setting == "auto":
        return None
    return "cuda:0" if setting == "cuda" else setting


def slot_layout(plans: list[SlotPlan], explicit: int | None = None, device: str | None = None,
                threads: int | None = None) -> list[SlotAssignment]:
    """Expand a plan into one assignment per slot.

    `device` pins the model to one device id ("cpu", "cuda:1"); `explicit` fixes the number of
    slots (spread round-robin over the planned devices, or all on the pinned one); `threads`
    overrides the planned per-slot CPU thread budget.
    """
    by_id = {p.device.id: p for p in plans}
    if device is not None:
        plan = by_id.get(device)
        if plan is None:
            raise ValueError(f"device {device} not found (have: {', '.join(by_id)})")
        n = explicit if explicit is not None else max(plan.slots, 1)
        return [SlotAssignment(device, _threads(plan, threads))] * n
    used = [p for p in plans if p.slots > 0]
    if not used:  # nothing fits anywhere: one CPU slot keeps the streams served, slowly
        cpu = by_id.get("cpu")
        if cpu is None:
            raise ValueError("no device can host a slot")
        used = [SlotPlan(cpu.device, 1, None, None, cpu.device.cores or 1, cpu.reason)]
    out = [SlotAssignment(p.device.id, _threads(p, threads)) for p in used for _ in range(p.slots)]
    if explicit is not None:
        ring = [SlotAssignment(p.device.id, _threads(p, threads)) for p in used]
        out = [ring[i % len(ring)] for i in range(explicit)] if len(out) != explicit else out
    return out


def _threads(plan: SlotPlan, override: int | None) -> int | None:
    if plan.device.kind != "cpu":
        return None
    return override or plan.threads_per_slot or plan.device.cores or 1


def decode_threads(cores: int, streams: int, configured: int = 0) -> int:
    """FFmpeg threads per decoder: the configured number, else share the cores between streams.

    With as many streams as cores or more, one thread each: frame threading would add a frame of
    latency per extra thread and the streams already keep every core busy.
    """
    if configured:
        return configured
    return max(1, cores // max(1, streams))
