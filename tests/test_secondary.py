"""A second model on each tracked object's crop: the project's colour classifier (trained by
tools/train_colours.py) agrees with ultralytics' own predict, and through a real pipeline and broker
its top label reaches the detections and the events, only for the labels asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detectors.classify import Classifier
from detectors.runtimes import installed
from pipeline import ConfigError, parse_config
from tests.support.media import detections
from tests.support.procs import MODEL, ROOT, Mosquitto, Subscriber, start_pipeline, wait_until
from tools.train_colours import COLOURS, render_crop

CLASSIFIER = ROOT / "models" / "colours-yolo11n-cls.pt"


@pytest.fixture(scope="module")
def crops() -> tuple[list[np.ndarray], list[str]]:
    """Crops the classifier never saw in training (other seeds)."""
    seeds = range(500_000, 500_060)
    return [render_crop(s, COLOURS[s % 3]) for s in seeds], [COLOURS[s % 3] for s in seeds]


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_classifier_agrees_with_ultralytics(tmp_path: Path, crops: tuple[list[np.ndarray], list[str]],
                                            runtime: str) -> None:
    import shutil

    from detectors import prepare_ultralytics_offline

    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    weights = Path(shutil.copyfile(CLASSIFIER, tmp_path / CLASSIFIER.name))
    model = Classifier("colour", weights, runtime, imgsz=64, threads=2)
    model.load()
    assert model.class_names == COLOURS
    ours = model.classify(crops[0])
    prepare_ultralytics_offline()
    from ultralytics import YOLO

    reference = YOLO(str(weights))
    theirs = [reference.predict(c, imgsz=64, verbose=False)[0] for c in crops[0]]
    their_labels = [r.names[int(r.probs.top1)] for r in theirs]
    assert [label for label, _ in ours] == their_labels
    for (_, score), r in zip(ours, theirs, strict=True):
        assert abs(score - float(r.probs.top1conf)) < 0.02
    accuracy = np.mean([label == truth for (label, _), truth in zip(ours, crops[1], strict=True)])
    assert accuracy >= 0.95


def test_secondary_references_are_checked(tmp_path: Path) -> None:
    base = {"models": {"shapes": {"type": "yolo", "weights": str(MODEL)},
                       "colour": {"type": "classify", "weights": str(CLASSIFIER), "imgsz": 64}}}
    cases = {
        "streams.a.model: 'colour' is a classify model": {"url": "rtsp://127.0.0.1/a", "model": "colour"},
        "streams.a.secondary[0].model: 'shapes' is a yolo model": {
            "url": "rtsp://127.0.0.1/a", "model": "shapes", "secondary": [{"model": "shapes"}]},
        "streams.a.secondary[0].model: unknown model 'nope'": {
            "url": "rtsp://127.0.0.1/a", "model": "shapes", "secondary": [{"model": "nope"}]},
    }
    for message, stream in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_config({**base, "streams": {"a": stream}}, tmp_path)


@pytest.mark.slow
async def test_pipeline_adds_the_classifiers_answer_to_detections_and_events(
    tmp_path: Path, mosquitto: Mosquitto, topic_prefix: str
) -> None:
    from streams.synthetic import Actor, ScriptedScene, write_video

    # a red circle, a green square, a blue triangle, crossing at different heights
    truth = {"circle": "red", "square": "green", "triangle": "blue"}
    scene = ScriptedScene("colours", 31, (
        Actor(1, 0, 32, (40, 40, 220), ((1, 60, 70), (9, 580, 70))),
        Actor(2, 1, 32, (50, 210, 40), ((1, 580, 180), (9, 60, 180))),
        Actor(3, 2, 34, (220, 60, 30), ((1, 80, 290), (9, 560, 290))),
    ), 10.0, width=640, height=360)
    video = tmp_path / "colours.mp4"
    write_video(video, scene, scene.seconds)
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320},
                   "colour": {"type": "classify", "weights": str(CLASSIFIER), "imgsz": 64}},
        "streams": {"cam": {"url": str(video), "model": "shapes", "max_fps": 5,
                            "secondary": [{"model": "colour", "labels": ["circle", "square"], "every_s": 1.0}]}},
        "pipeline": {"status_interval": 0},
        "events": {"store": str(tmp_path / "ev" / "events.db"), "update_interval": 1.0},
    }, tmp_path)
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config)

    def attributed() -> list[dict[str, Any]]:
        return [d for m in detections(sub, "cam") for d in m["detections"] if d.get("attributes")]

    try:
        await wait_until(lambda: {d["label"] for d in attributed()} >= {"circle", "square"}, 60,
                         "attributes on circles and squares")
        # and on their events (an object's event starts once its track has lasted events.min_seen_s)
        await wait_until(lambda: {m.json()["after"]["label"] for m in sub.of("/events")
                                  if "attributes" in m.json()["changed"]} >= {"circle", "square"}, 10,
                         "attributes on the events")
        figures = pipeline.running.secondaries.figures()["colour"]
    finally:
        await shutdown()
        sub.close()
    got = attributed()
    assert all(d["label"] in ("circle", "square") for d in got)  # only the labels asked for
    right = [d["attributes"]["colour"]["label"] == truth[d["label"]] for d in got]
    assert np.mean(right) >= 0.95, got[:5]
    assert all(0 <= d["attributes"]["colour"]["score"] <= 1 for d in got)
    # asked once per track and then at most every second: far fewer crops than detections
    tracked = [d for m in detections(sub, "cam") for d in m["detections"] if d.get("track_id")]
    assert 2 <= figures["classified"] < len(tracked)
    assert figures["errors"] == figures["dropped"] == 0
    # the event of each object says what the classifier said
    updates = [m.json() for m in sub.of("/events") if "attributes" in m.json()["changed"]]
    assert {u["after"]["label"] for u in updates} == {"circle", "square"}
    for u in updates:
        assert u["after"]["attributes"]["colour"]["label"] == truth[u["after"]["label"]]


def test_each_use_filters_the_crops_it_classifies() -> None:
    """A use's own `confidence` and `min_area`: crops of weak detections and tiny boxes are not sent
    to the classifier (the real colour model here), the others are."""
    import time

    import cv2

    from detectors.base import Detections
    from pipeline.config import ModelConfig, SecondaryConfig
    from pipeline.core.secondary import ClassifyWorker, StreamSecondary
    from streams.frame import Frame

    worker = ClassifyWorker("colours", ModelConfig.model_validate({"type": "classify", "weights": str(CLASSIFIER)}))
    try:
        use = SecondaryConfig(model="colours", confidence=0.5, min_area=0.01)
        image = np.zeros((200, 200, 3), np.uint8)
        image[20:60, 20:60] = cv2.resize(render_crop(1, COLOURS[0]), (40, 40))
        frame = Frame("cam", 0, image, time.time(), None, 0.0, time.monotonic())
        det = Detections(np.array([[20, 20, 60, 60], [100, 100, 140, 140], [150, 150, 160, 160]], np.float32),
                         np.array([0.9, 0.3, 0.9], np.float32), np.zeros(3, np.int32), ("car", "car", "car"))
        uses = StreamSecondary("cam", [use], {"colours": worker})
        uses.attributes(det, frame, np.array([1, 2, 3]))
        deadline = time.monotonic() + 30
        while worker.answer("cam", 1) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.answer("cam", 1) is not None  # 0.9 and 4% of the frame: classified
        assert worker.classified == 1, worker.figures()  # 0.3 (weak) and 0.25% (tiny): not
        assert worker.answer("cam", 2) is None
        assert worker.answer("cam", 3) is None
    finally:
        worker.close()
