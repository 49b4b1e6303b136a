"""Tracking accuracy on a short rendered scene, scored with TrackEval, beside ultralytics' track()."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.synthetic import tracking_scenes, write_video
from tools.bench_mot import evaluate


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fps"), [("crossing", 10.0), ("occlusion", 25.0)])
def test_ids_hold_through_crossings_and_occlusion(tmp_path: Path, name: str, fps: float) -> None:
    scene = next(s for s in tracking_scenes(6.0) if s.name == name)
    video = tmp_path / f"{name}.mp4"
    write_video(video, scene, scene.seconds)
    result = evaluate(scene, video, fps)
    ours, theirs = result["framegrid"], result["ultralytics"]
    assert ours["objects"] == len(scene.actors)
    assert ours["IDF1"] >= 0.85, result
    assert ours["IDF1"] >= theirs["IDF1"], result
    assert ours["MOTA"] >= 0.8, result
