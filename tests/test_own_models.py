"""Your own model files: ONNX (dynamic and fixed shapes), OpenVINO IR, class names from the config,
clear refusals of what is not a detector, and the runtime choice per file kind.

The files are exported from the project's own weights by ultralytics itself (in a child process);
each must find what ultralytics' `predict` finds on the `.pt` (F1 >= 0.99 at IoU 0.9).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from detectors import ModelLoadError
from detectors.export import ensure_export
from detectors.modelfile import ModelFileError, model_kind, read_names_file
from detectors.runtimes import build_detector, installed, resolve_backend
from detectors.tensorrt import read_engine_file
from pipeline import ConfigError, load_config, parse_config
from pipeline.core.devices import DeviceInfo
from pipeline.core.planning import plan_models
from streams.synthetic import MovingScene, render_image
from tests.support.media import detections, iou
from tests.support.procs import MODEL, ROOT, Mosquitto, Subscriber, start_pipeline, wait_until

CONF = 0.3


def ultralytics_export(source: Path | str, folder: Path, **kwargs: Any) -> Path:
    """What `YOLO(source).export(**kwargs)` writes, made in a child process (torch stays out of here)."""
    code = ("import json, sys\n"
            "from detectors.offline import prepare_ultralytics_offline\n"
            "prepare_ultralytics_offline()\n"
            "from ultralytics import YOLO\n"
            "print('EXPORTED', YOLO(sys.argv[1]).export(**json.loads(sys.argv[2])))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(source), json.dumps({"verbose": False, **kwargs})],
                          cwd=folder, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("EXPORTED ")]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert lines, proc.stdout[-2000:]
    return folder / lines[-1].removeprefix("EXPORTED ")  # (relative to its working folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The user's files, as ultralytics exports them, each under a name of the user's choosing."""
    work = tmp_path_factory.mktemp("exports")
    pt = work / "shapes.pt"
    shutil.copyfile(MODEL, pt)
    mine = tmp_path_factory.mktemp("mine")
    out = {"pt": pt}
    out["onnx-dynamic"] = Path(shutil.copyfile(ensure_export(pt, 320, "onnx"), mine / "dynamic.onnx"))
    ir = ensure_export(pt, 320, "openvino")
    out["ir-folder"] = Path(shutil.copytree(ir, mine / "shapes_openvino_model"))
    out["ir-xml"] = out["ir-folder"] / f"{pt.stem}.xml"
    static = ultralytics_export(pt, work, format="onnx", imgsz=320, dynamic=False, simplify=False, opset=17)
    out["onnx-fixed"] = Path(shutil.copyfile(static, mine / "fixed-320.onnx"))
    # a classification model (untrained, built from ultralytics' own yaml): not a detector
    cls = ultralytics_export("yolo11n-cls.yaml", work, format="onnx", imgsz=64, simplify=False, opset=17)
    out["classify"] = Path(shutil.copyfile(cls, mine / "classifier.onnx"))
    return out


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    out = [render_image(s)[0] for s in range(920_000, 920_008)]
    return out + [img for img, _ in list(MovingScene(seed=37).frames(60))[::6]]


@pytest.fixture(scope="module")
def reference(files: dict[str, Path], images: list[np.ndarray]) -> list[SimpleNamespace]:
    """ultralytics' own `predict` on the `.pt`, one image at a time."""
    from detectors import prepare_ultralytics_offline

    prepare_ultralytics_offline()
    from ultralytics import YOLO

    model = YOLO(str(files["pt"]))
    out = []
    for img in images:
        r = model.predict(img, imgsz=320, conf=CONF, verbose=False)[0]
        out.append(SimpleNamespace(labels=[r.names[int(c)] for c in r.boxes.cls], boxes=r.boxes.xyxy.numpy()))
    return out


def f1(found: list[Any], truth: list[Any], rename: dict[str, str] | None = None) -> tuple[float, int]:
    """F1 of `found` against `truth` over all images: same label (after `rename`), IoU >= 0.9, one to one."""
    tp = fp = fn = 0
    for a, b in zip(found, truth, strict=True):
        free = list(zip([(rename or {}).get(lab, lab) for lab in b.labels], b.boxes, strict=True))
        for lab, box in zip(a.labels, a.boxes, strict=True):
            scores = [(iou(box, bb), i) for i, (lb, bb) in enumerate(free) if lb == lab]
            best = max(scores, default=(0.0, -1))
            if best[0] >= 0.9:
                free.pop(best[1])
                tp += 1
            else:
                fp += 1
        fn += len(free)
    return 2 * tp / max(1, 2 * tp + fp + fn), tp


def detector_for(path: Path, backend: str = "auto", **kwargs: Any) -> Any:
    runtime = resolve_backend(backend, "cpu", model_kind(path))
    det = build_detector(runtime, "mine", path, imgsz=320, confidence=CONF, iou=0.7, device="cpu", threads=2,
                         max_batch=4, **kwargs)
    det.load()
    return det


CASES = [("onnx-dynamic", "onnxruntime"), ("onnx-dynamic", "openvino"), ("onnx-fixed", "onnxruntime"),
         ("onnx-fixed", "openvino"), ("ir-folder", "auto"), ("ir-xml", "openvino")]


@pytest.mark.parametrize(("kind", "backend"), CASES, ids=[f"{k}-{b}" for k, b in CASES])
def test_exported_files_find_what_the_pt_finds(files: dict[str, Path], images: list[np.ndarray],
                                               reference: list[SimpleNamespace], kind: str, backend: str) -> None:
    if backend != "auto" and not installed(backend):
        pytest.skip(f"{backend} is not installed")
    det = detector_for(files[kind], backend)
    try:
        assert det.class_names == ("circle", "square", "triangle")  # from the file's own metadata
        # frames one at a time and in a batch of four (a fixed-batch graph runs it in chunks)
        one = [det.infer([img])[0] for img in images]
        batched = [d for i in range(0, len(images), 4) for d in det.infer(images[i:i + 4])]
    finally:
        det.close()
    for found in (one, batched):
        score, matched = f1(found, reference)
        assert matched >= 40, "too few objects compared to mean anything"
        assert score >= 0.99, f"{kind} on {backend}: F1 {score:.3f}"
    if kind == "onnx-fixed":
        assert det.rect is False
        assert det.fixed_batch == 1


def test_config_names_rename_the_classes(files: dict[str, Path], images: list[np.ndarray],
                                         reference: list[SimpleNamespace], tmp_path: Path) -> None:
    names = tmp_path / "labels.txt"
    names.write_text("# one per line, in class-id order\nball\n\nbox\nwedge\n")
    assert read_names_file(names) == ("ball", "box", "wedge")
    det = detector_for(files["onnx-dynamic"], names=read_names_file(names))
    try:
        found = [det.infer([img])[0] for img in images]
    finally:
        det.close()
    assert det.class_names == ("ball", "box", "wedge")
    score, _ = f1(found, reference, rename={"circle": "ball", "square": "box", "triangle": "wedge"})
    assert score >= 0.99
    with pytest.raises(ModelLoadError, match="has 3 classes but 2 names were given"):
        detector_for(files["onnx-dynamic"], names=("a", "b"))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_classifier_is_refused_with_what_was_expected(files: dict[str, Path], backend: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        detector_for(files["classify"], backend)
    msg = str(info.value)
    assert "classifier.onnx is a classify model" in msg
    assert "expected a YOLOv8/YOLO11 detection model" in msg


def test_runtime_choice_per_file_kind(tmp_path: Path) -> None:
    assert model_kind(Path("a.onnx")) == "onnx"
    assert model_kind(Path("best_openvino_model")) == "openvino"
    assert model_kind(Path("x/best.xml")) == "openvino"
    assert model_kind(Path("best.engine")) == "engine"
    with pytest.raises(ModelFileError, match=r"must be a \.pt, \.onnx or TensorRT \.engine file"):
        model_kind(Path("best.tflite"))
    assert resolve_backend("auto", "cpu", "openvino") == "openvino"
    assert resolve_backend("auto", "cpu", "onnx") in ("openvino", "onnxruntime")
    assert resolve_backend("auto", "cuda:0", "onnx") == "onnxruntime"
    assert resolve_backend("auto", "cuda:1", "pt") == "torch"
    with pytest.raises(ValueError, match=r"backend torch cannot run an ONNX file; use auto or onnxruntime or openvino"):
        resolve_backend("torch", "cpu", "onnx")
    with pytest.raises(ValueError, match="TensorRT engine runs only on an NVIDIA GPU"):
        resolve_backend("auto", "cpu", "engine")
    # ultralytics' engine header: 4-byte length, JSON metadata, then the engine itself
    meta = json.dumps({"names": {0: "a", 1: "b"}, "stride": 32, "task": "detect"}).encode()
    engine = tmp_path / "m.engine"
    engine.write_bytes(len(meta).to_bytes(4, "little") + meta + b"\x00ENGINE")
    assert read_engine_file(engine) == ({"names": {"0": "a", "1": "b"}, "stride": 32, "task": "detect"},
                                        b"\x00ENGINE")
    bare = tmp_path / "bare.engine"
    bare.write_bytes(b"\xff\xff\xff\x7fengine bytes")
    assert read_engine_file(bare) == ({}, b"\xff\xff\xff\x7fengine bytes")


def write(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n[models.m]\ntype = "yolo"\n{model}\n'
                    '[streams.cam]\nurl = "rtsp://127.0.0.1:8554/cam"\nmodel = "m"\n')
    return path


def test_config_takes_model_files_and_names_what_is_wrong(files: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("onnx-dynamic", "onnx-fixed", "ir-folder", "ir-xml"):
        cfg = load_config(write(tmp_path, f'weights = "{files[kind]}"\nnames = ["a", "b", "c"]'))
        assert cfg.models["m"].label_names() == ("a", "b", "c")
    bad = {
        'weights = "best.tflite"': ("models.m.weights", "must be a .pt, .onnx or TensorRT .engine file"),
        'weights = "mine/best.onnx"': ("models.m.weights", f"model file not found: {tmp_path / 'mine' / 'best.onnx'}"),
        f'weights = "{files["onnx-dynamic"]}"\nbackend = "torch"':
            ("models.m", "backend torch cannot run an ONNX file"),
        f'weights = "{files["onnx-dynamic"]}"\nclasses_file = "labels.txt"':
            ("models.m.classes_file", f"file not found: {tmp_path / 'labels.txt'}"),
        f'weights = "{files["onnx-dynamic"]}"\nnames = ["a"]\nclasses_file = "labels.txt"':
            ("models.m", "set names or classes_file, not both"),
    }
    for text, (key, message) in bad.items():
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text))
        assert any(k == key and message in m for k, m in info.value.errors), (text, info.value.errors)
    # an engine loads as config, and planning on a CPU-only machine says where it can run
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    cfg = load_config(write(tmp_path, f'weights = "{engine}"'))
    with pytest.raises(ConfigError) as info:
        plan_models(cfg.models, ["m"], cfg.devices, [DeviceInfo("cpu", "cpu", "test CPU", 0, 0, cores=2)])
    assert info.value.errors[0][0] == "models.m.backend"
    assert "runs only on an NVIDIA GPU" in info.value.errors[0][1]


@pytest.mark.slow
async def test_pipeline_publishes_an_onnx_models_renamed_labels(
    files: dict[str, Path], videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str
) -> None:
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"mine": {"type": "yolo", "weights": str(files["onnx-fixed"]), "imgsz": 320,
                            "names": ["ball", "box", "wedge"], "batch_size": 2}},
        "streams": {"a": {"url": str(videos["cam1"]), "model": "mine", "max_fps": 5},
                    "b": {"url": str(videos["cam2"]), "model": "mine", "max_fps": 5}},
        "pipeline": {"status_interval": 0},
    }, files["pt"].parent)
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    _, shutdown = await start_pipeline(config)
    try:
        await wait_until(lambda: all(len(detections(sub, s)) >= 5 for s in "ab"), 60, "both streams detecting")
    finally:
        await shutdown()
        sub.close()
    labels = {o["label"] for s in "ab" for d in detections(sub, s) for o in d["detections"]}
    assert labels
    assert labels <= {"ball", "box", "wedge"}
