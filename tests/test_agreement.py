"""Same answers as the model: every published frame against `YOLO(weights).predict(frame)`.

Camera files of every shape (1920x1080, 1280x720, portrait 720x1280, 4:3, the odd 1000x562, and
one stream that changes size halfway) play through the real pipeline; `tools/agreement.py`
compares each published frame with ultralytics' own answer on the same decoded frame.
Targets (README): backend torch F1 >= 0.99 at IoU >= 0.9 with confidences within 0.02; the
default backend (auto: OpenVINO here, bf16 where the CPU has it) F1 >= 0.97 at IoU >= 0.7.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.procs import MODEL
from tools.agreement import CAMERAS, CHANGE, TARGETS, measure, render_cameras

SECONDS = 5.0


@pytest.fixture(scope="module")
def cameras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("agreement")
    # 5 s: six cameras share two cores in real time, and the 1080p one publishes ~2.5 frames a second
    render_cameras(folder, seconds=SECONDS)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_published_detections_equal_ultralytics_predict(cameras: Path, backend: str) -> None:
    threshold, f1_min, conf_within = TARGETS[backend]
    report = measure(cameras, MODEL, imgsz=320, backend=backend, seconds=SECONDS, thresholds=(threshold,))
    assert set(report) == {*CAMERAS, "change"}
    for name, r in report.items():
        s = r[f"at_{threshold}"]
        assert r["frames"] >= 8, (name, r)  # enough published frames to mean something
        assert s["boxes_ultralytics"] >= 3 * r["frames"], (name, r)  # the scenes are full of objects
        assert s["f1"] >= f1_min, (backend, name, r)
        if conf_within is not None:
            assert s["max_conf_diff"] <= conf_within, (backend, name, r)
    # the size change was seen and answered in the new size's pixels
    assert report["change"]["sizes"] == sorted(f"{w}x{h}" for w, h in CHANGE)
