"""Process-level robustness: the allocator setting made at start (see pipeline.memory for the
measurement behind it), and a payload that cannot be encoded never stopping the publisher."""

from __future__ import annotations

import sys

import pytest

from pipeline import parse_config
from pipeline.memory import fix_mmap_threshold


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_mmap_threshold_is_glibcs_by_default_and_can_be_fixed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # glibc's dynamic threshold by default: a fixed 128 KB one put every converted camera frame on
    # fresh mmap'd pages (8 x 1280x720 at imgsz 320: 120 vs 146 frames/s, see pipeline.memory)
    assert parse_config({}, tmp_path).pipeline.malloc_mmap_threshold_kb == 0
    assert fix_mmap_threshold(128) is True  # glibc accepted it
    assert fix_mmap_threshold(0) is False  # 0 leaves glibc's dynamic threshold alone


def test_unencodable_payload_is_dropped_and_counted_not_raised() -> None:
    """`publish` never raises: a NaN (or an unknown type) drops that message, counted by kind;
    numpy numbers are published as plain JSON numbers."""
    import json

    import numpy as np

    from pipeline import MqttConfig, Publisher

    pub = Publisher(MqttConfig(url="mqtt://127.0.0.1:1"))
    pub.publish("fg/stats", {"fps": float("nan")})
    pub.publish("fg/streams/a/state", {"x": object()})
    pub.publish("fg/streams/a/detections", {"n": np.int64(3), "boxes": np.zeros((1, 4), np.float32)})
    c = pub.counters()
    assert c["dropped_unencodable"] == 2 and c["dropped_by_kind"] == {"stats": 1, "state": 1}
    assert c["buffered"] == 1 and json.loads(pub._buffer[0].payload) == {"n": 3, "boxes": [[0.0, 0.0, 0.0, 0.0]]}
