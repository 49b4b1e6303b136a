"""Tracking accuracy on a short rendered scene, scored with TrackEval, beside ultralytics' track()."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.synthetic import tracking_scenes, write_video
from tools.bench_mot import evaluate


@pytest.mark.slow
def test_crossing_paths_keep_their_ids_at_10_fps(tmp_path: Path) -> None:
    scene = next(s for s in tracking_scenes(6.0) if s.name == "crossing")
    video = tmp_path / "crossing.mp4"
    write_video(video, scene, scene.seconds)
    result = evaluate(scene, video, 10.0, min_hits=2, buffer_s=3.0)
    ours, theirs = result["framegrid"], result["ultralytics"]
    assert ours["objects"] == 3
    assert ours["IDF1"] >= 0.85, result
    assert ours["IDF1"] >= theirs["IDF1"], result
    assert ours["MOTA"] >= 0.8, result
