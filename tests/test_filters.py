"""A stream's own filters of the detections of the model copy it shares: labels, confidence overall
and per label, box area, masks (pixels or fractions of the frame)."""

from __future__ import annotations

import numpy as np
import pytest

from detectors import Detections
from pipeline.config import ConfigError, StreamConfig, parse_config
from pipeline.core.filters import StreamFilter


def dets(*rows: tuple[str, float, tuple[float, float, float, float]]) -> Detections:
    names = {"person": 0, "car": 1, "dog": 2}
    return Detections(np.array([r[2] for r in rows], np.float32).reshape(-1, 4),
                      np.array([r[1] for r in rows], np.float32), np.array([names[r[0]] for r in rows], np.int32),
                      tuple(r[0] for r in rows))


def stream(**filters: object) -> StreamConfig:
    return StreamConfig.model_validate({"url": "rtsp://127.0.0.1/x", "model": "m", **filters})


def test_a_stream_without_filters_passes_detections_untouched() -> None:
    assert StreamFilter.of(stream()) is None


def test_filters_keep_what_the_stream_asks_for() -> None:
    frame = (1000, 500)  # 500_000 px
    d = dets(("person", 0.9, (100, 100, 200, 300)),    # 4% of the frame
             ("person", 0.5, (300, 100, 400, 300)),    # below the person threshold
             ("car", 0.45, (500, 300, 700, 450)),      # 6%, car threshold 0.4: kept
             ("dog", 0.95, (10, 10, 60, 60)),          # not a wanted class
             ("car", 0.9, (0, 0, 1000, 500)),          # the whole frame: above max_area
             ("car", 0.9, (850, 100, 950, 200)))       # its bottom-centre is in the mask: dropped
    f = StreamFilter.of(stream(classes=["person", "car"], confidence=0.3, label_confidence={"person": 0.6,
                               "car": 0.4}, min_area=0.01, max_area=0.5,
                               masks={"tree": {"polygon": [[0.8, 0], [1, 0], [1, 0.5], [0.8, 0.5]]}}))
    assert f is not None
    kept = f.apply(d, *frame)
    assert kept.labels == ("person", "car")
    assert kept.confidences.tolist() == pytest.approx([0.9, 0.45])
    assert kept.boxes.tolist() == [[100, 100, 200, 300], [500, 300, 700, 450]]
    small = StreamFilter.of(stream(min_area=0.05))
    assert small is not None
    assert small.apply(d, *frame).labels == ("car", "car")  # the 6% car and the whole frame; 4% and less gone
    assert len(f.apply(Detections.empty(), *frame)) == 0


def test_a_mask_in_pixels_follows_the_anchor() -> None:
    f = StreamFilter.of(stream(masks={"ts": {"polygon": [[0, 0], [300, 0], [300, 40], [0, 40]], "anchor": "center"}}))
    assert f is not None
    d = dets(("person", 0.9, (10, 0, 110, 60)), ("person", 0.9, (10, 0, 110, 90)))  # centres y 30 and 45
    assert f.apply(d, 640, 360).boxes.tolist() == [[10, 0, 110, 90]]


def test_bad_filters_are_named() -> None:
    from pathlib import Path

    def errors(**filters: object) -> list[tuple[str, str]]:
        with pytest.raises(ConfigError) as caught:
            parse_config({"models": {"m": {"type": "yolo", "weights": "m.pt"}},
                          "streams": {"a": {"url": "rtsp://127.0.0.1/a", "model": "m", **filters}}}, Path("."),
                         check_files=False)
        return caught.value.errors

    assert [k for k, _ in errors(label_confidence={"car": 2})] == ["streams.a.label_confidence.car"]
    assert errors(min_area=0.2, max_area=0.1) == [("streams.a", "max_area must be larger than min_area (0.2)")]
