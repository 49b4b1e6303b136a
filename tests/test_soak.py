"""A three-minute soak (`tools/soak.py`): real RTSP cameras and Mosquitto, faults on a seeded schedule
(camera kills, stalls, broker restarts, slot crashes and hangs, stream churn through the API), every
frame accounted for, memory, descriptors and threads watched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_minute_soak_with_faults(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "-m", "tools.soak", "--cameras", "4", "--minutes", "2",
                           "--gap", "10", "--seed", "3", "--json", str(out)], capture_output=True, text=True,
                          timeout=540, cwd=ROOT)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    print(proc.stdout)
    assert r["faults_total"] >= 6, r["faults"]
    assert len({f["kind"] for f in r["faults"]}) >= 4, r["faults"]
    t = r["targets"]
    for target in ("zero_unaccounted_frames", "received_all_but_across_broker_restarts", "rss_growth_below_5pct",
                   "fds_flat", "threads_flat", "every_fault_recovered_in_bound", "clean_exit"):
        assert t[target], (target, proc.stdout)
    # (`published_equals_received` is reported, not required: see the README's known issues)
