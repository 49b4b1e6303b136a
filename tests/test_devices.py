"""Device discovery with injected NVML facts, and the pure slot planner."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.core.devices import GB, DeviceInfo, discover, plan_slots


class FakeNvml:
    """Stands in for the hardware: the facts NVML would report for the given GPUs."""

    def __init__(self, gpus: list[tuple[str, float, float]], fail_init: bool = False) -> None:
        self.gpus = gpus
        self.fail_init = fail_init
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.gpus[h][0].encode()

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=int(self.gpus[h][1] * GB), free=int(self.gpus[h][2] * GB))

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=7)


def gpu(i: int, total: float, free: float, name: str = "NVIDIA RTX 4090") -> DeviceInfo:
    return DeviceInfo(f"cuda:{i}", "cuda", name, int(total * GB), int(free * GB), 0.0)


CPU = DeviceInfo("cpu", "cpu", "CPU", 16 * GB, 12 * GB, None, 16)


def test_discover_reads_nvml_and_adds_cpu() -> None:
    nvml = FakeNvml([("NVIDIA A100", 80, 79), ("NVIDIA T4", 16, 15)])
    devs = discover(nvml)
    assert [d.id for d in devs] == ["cuda:0", "cuda:1", "cpu"]
    assert devs[0].name == "NVIDIA A100"
    assert devs[0].free_bytes == 79 * GB
    assert devs[0].utilization == 7
    assert nvml.shutdowns == 1


def test_discover_without_driver_is_cpu_only_and_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    devs = discover(FakeNvml([], fail_init=True))
    assert [d.kind for d in devs] == ["cpu"]
    assert devs[0].cores
    assert devs[0].cores >= 1
    assert capsys.readouterr() == ("", "")
    real = discover()  # the real library: as many GPUs as NVML counts here, first, and the CPU last
    try:
        import pynvml

        pynvml.nvmlInit()
        gpus = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception:
        gpus = 0
    assert [d.kind for d in real] == ["cuda"] * gpus + ["cpu"]


def test_plan_formula_and_reason() -> None:
    (p, c) = plan_slots([gpu(0, 24.0, 24.0), CPU], slot_memory_bytes=8 * GB, usable_fraction=0.9)
    assert p.slots == 2  # floor(24 * 0.9 / 8)
    assert p.reason == "GPU 0 NVIDIA RTX 4090: 24.0 GB total, 21.6 GB usable -> 2 detect slots of 8.0 GB"
    assert c.slots == 0
    assert "GPUs present" in c.reason


@pytest.mark.parametrize("count", range(1, 9))
def test_plan_many_mixed_gpus(count: int) -> None:
    sizes = [80.0, 40.0, 24.0, 16.0, 12.0, 8.0, 6.0, 4.0][:count]
    devices = [gpu(i, s, s * 0.95) for i, s in enumerate(sizes)] + [CPU]
    plans = plan_slots(devices, slot_memory_bytes=4 * GB, usable_fraction=0.9)
    for plan, size in zip(plans, sizes, strict=False):
        assert plan.slots == int(size * 0.95 * 0.9 // 4)
        assert plan.slots * 4 * GB <= plan.device.free_bytes * 0.9
    small = [p for p in plans if p.device.kind == "cuda" and p.slots == 0]
    assert all("too small" in p.reason for p in small)


def test_overrides_and_cpu_threads() -> None:
    plans = plan_slots([gpu(0, 24, 20), CPU], 8 * GB, overrides={"cuda:0": 3, "cpu": 4})
    assert plans[0].slots == 3
    assert "override" in plans[0].reason
    assert "would allow 2" in plans[0].reason
    assert plans[1].slots == 4
    assert plans[1].threads_per_slot == 4
    only_cpu = plan_slots([CPU], 8 * GB, cpu_slots=2, cpu_threads_per_slot=12)
    assert only_cpu[0].slots == 2
    assert "oversubscribed: 24 threads on 16 cores" in only_cpu[0].reason
    with pytest.raises(ValueError, match="slot memory must be positive"):
        plan_slots([CPU], 0)
    # the default: one single-threaded slot per core, at most 4 (then the threads grow)
    auto = plan_slots([CPU], 8 * GB, cpu_slots=None)[0]
    assert (auto.slots, auto.threads_per_slot) == (4, 4)
    assert "auto" in auto.reason
    two = plan_slots([DeviceInfo("cpu", "cpu", "CPU", 8 * GB, 8 * GB, cores=2)], 8 * GB, cpu_slots=None)[0]
    assert (two.slots, two.threads_per_slot) == (2, 1)


def test_devices_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    cores = os.cpu_count() or 1
    assert "CPU:" in out
    assert "detect slot" in out
    assert f"total: {min(cores, 4)} slot(s)" in out


def test_slot_layout_from_plan() -> None:
    from pipeline.core.devices import decode_threads, slot_layout

    gpus = discover(FakeNvml([("NVIDIA RTX 4090", 24, 22), ("Tesla T4", 16, 15)]))
    plans = plan_slots(gpus, 8 * GB, 0.9)
    layout = slot_layout(plans)
    # 22*0.9/8 -> 2 slots on the 4090, 15*0.9/8 -> 1 on the T4, none on the CPU (GPUs present)
    assert [a.device for a in layout] == ["cuda:0", "cuda:0", "cuda:1"]
    assert all(a.threads is None for a in layout)
    assert [a.device for a in slot_layout(plans, explicit=4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [a.device for a in slot_layout(plans, device="cuda:1")] == ["cuda:1"]
    with pytest.raises(ValueError, match="cuda:7 not found"):
        slot_layout(plans, device="cuda:7")
    cpu_only = [d for d in gpus if d.kind == "cpu"]
    cpu = slot_layout(plan_slots(cpu_only, 8 * GB, cpu_slots=2))
    cores = cpu_only[0].cores or 1
    assert len(cpu) == 2
    assert all(a.device == "cpu" and a.threads == max(1, cores // 2) for a in cpu)
    assert slot_layout(plan_slots(cpu_only, 8 * GB), threads=3)[0].threads == 3
    # a GPU too small for one slot and no CPU slots planned: one CPU slot keeps streams served
    tiny = discover(FakeNvml([("small", 4, 3)]))
    fallback = slot_layout(plan_slots(tiny, 8 * GB))
    assert [a.device for a in fallback] == ["cpu"]
    assert decode_threads(2, 8) == 1
    assert decode_threads(8, 2) == 4
    assert decode_threads(2, 1) == 2
    assert decode_threads(2, 8, configured=3) == 3


def test_pipeline_plans_slots_per_model_from_device_facts(tmp_path: Any) -> None:
    from pipeline import parse_config, plan_models
    from tests.support.procs import MODEL

    gpus = discover(FakeNvml([("NVIDIA A100 80GB", 80, 78), ("NVIDIA L4", 24, 23)]))
    cfg = parse_config({
        "models": {"big": {"type": "yolo", "weights": str(MODEL), "slot_memory_gb": 20},
                   "pinned": {"type": "yolo", "weights": str(MODEL), "device": "cuda:1", "slots": 2}},
        "streams": {"a": {"url": "rtsp://127.0.0.1:9/a", "model": "big"},
                    "b": {"url": "rtsp://127.0.0.1:9/b", "model": "pinned"}},
    }, tmp_path)
    plan = plan_models(cfg.models, ["big", "pinned"], cfg.devices, gpus)
    layouts = plan.layouts
    # 78*0.9/20 -> 3 slots on the A100, 23*0.9/20 -> 1 on the L4
    assert [a.device for a in layouts["big"]] == ["cuda:0"] * 3 + ["cuda:1"]
    assert [a.device for a in layouts["pinned"]] == ["cuda:1", "cuda:1"]
    assert plan.runtimes == {}  # nothing on the CPU: no CPU runtime chosen


def test_a_cluster_node_plans_for_the_cores_its_ray_node_declares() -> None:
    """Two Ray nodes on one 8-core machine, each started with --num-cpus 2, plan CPU slots for 2 cores each."""
    from pipeline.core.devices import cap_cpu_cores

    cpu = DeviceInfo("cpu", "cpu", "CPU", 0, 0, cores=8)
    gpu = DeviceInfo("cuda:0", "cuda", "GPU", 8 << 30, 8 << 30)
    capped = cap_cpu_cores([cpu, gpu], 2)
    assert capped[0].cores == 2
    assert capped[1] == gpu
    assert cap_cpu_cores([cpu], None)[0].cores == 8
    assert cap_cpu_cores([cpu], 16)[0].cores == 8
