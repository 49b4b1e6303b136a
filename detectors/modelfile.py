"""What kind of model file a `weights` path is, which runtimes can run it, and whether it is a detector.

A user brings a model as ultralytics makes them: a `.pt`, an ONNX file (dynamic or fixed shapes),
an OpenVINO IR (the `_openvino_model` folder or its `.xml`) or, on NVIDIA GPUs, a TensorRT
`.engine`. Each of them must be a YOLOv8 / YOLO11 detection head: one image input
`[batch, 3, h, w]` and one output `[batch, 4 + classes, anchors]` (boxes as centre x, centre y,
width, height, then one score per class). Classification, segmentation, pose and NMS-free
(end-to-end) heads are refused at load with what was found and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KINDS = ("pt", "yaml", "onnx", "openvino", "engine")
# which runtimes run each kind; a `.pt` (or `.yaml`) is exported once for the exported-graph runtimes
RUNTIMES = {
    "pt": ("torch", "onnxruntime", "openvino"),
    "yaml": ("torch", "onnxruntime", "openvino"),
    "onnx": ("onnxruntime", "openvino"),
    "openvino": ("openvino",),
    "engine": ("tensorrt",),
}
ACCEPTED = ("a .pt, .onnx or TensorRT .engine file, an OpenVINO IR folder or its .xml (or a .yaml for an "
            "untrained model)")


class ModelFileError(ValueError):
    """A model file that framegrid cannot serve as a detector; the message says what was expected."""


def model_kind(path: Path) -> str:
    """The kind of a `weights` path, from its name (a name without a suffix is an IR folder)."""
    suffix = path.suffix.lower()
    kinds = {".pt": "pt", ".yaml": "yaml", ".yml": "yaml", ".onnx": "onnx", ".xml": "openvino", ".engine": "engine"}
    if suffix in kinds:
        return kinds[suffix]
    if suffix == "" or path.name.endswith("_openvino_model") or path.is_dir():
        return "openvino"
    raise ModelFileError(f"must be {ACCEPTED}, got {path.name}")


def runtime_refusal(backend: str, kind: str) -> str | None:
    """Why `backend` cannot run a file of this kind (None when it can; `auto` always can)."""
    if backend == "auto" or backend in RUNTIMES[kind]:
        return None
    return f"backend {backend} cannot run {_kind_name(kind)}; use auto or {' or '.join(RUNTIMES[kind])}"


def _kind_name(kind: str) -> str:
    return {"pt": "a .pt file", "yaml": "a .yaml model", "onnx": "an ONNX file", "openvino": "an OpenVINO IR",
            "engine": "a TensorRT engine"}[kind]


def read_names_file(path: Path) -> tuple[str, ...]:
    """Class names from a text file: one per line, in class-id order (blank lines and `#` comments skipped)."""
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.lstrip().startswith("#"))
    if not names:
        raise ModelFileError(f"{path}: no class names (one per line, in class-id order)")
    return names


def dims(shape: Sequence[object]) -> tuple[int, ...]:
    """A graph's shape as ints, -1 for a dynamic (named or unknown) dimension."""
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)


def flag(value: object) -> bool:
    """A metadata flag that may be a bool or its string ("True", "false")."""
    return value is True or str(value).strip().lower() == "true"


@dataclass(frozen=True)
class GraphFacts:
    """What a loaded graph says about itself: its input and output shapes (-1 = dynamic) and metadata."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    outputs: int = 1
    task: str | None = None  # ultralytics' metadata ("detect", "classify", ...), when present
    end2end: bool = False

    @property
    def fixed_batch(self) -> int | None:
        return self.input_shape[0] if self.input_shape and self.input_shape[0] > 0 else None

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        h, w = self.input_shape[2:4]
        return (h, w) if h > 0 and w > 0 else None


def check_detection_head(model: str, path: Path, facts: GraphFacts, names: Sequence[str]) -> int:
    """The number of classes of a YOLOv8/YOLO11 detection graph; a clear error for anything else."""
    expected = "expected a YOLOv8/YOLO11 detection model: input [batch, 3, h, w], output [batch, 4 + classes, anchors]"
    where = f"model {model}: {path.name}"
    if facts.task not in (None, "detect"):
        raise ModelFileError(f"{where} is a {facts.task} model; {expected}")
    if facts.end2end:
        raise ModelFileError(f"{where} is an end-to-end (NMS-free) export; {expected} (export with nms=False, "
                             "end2end=False)")
    if len(facts.input_shape) != 4 or facts.input_shape[1] not in (3, -1):
        raise ModelFileError(f"{where} takes input {list(facts.input_shape)}; {expected}")
    out = facts.output_shape
    if facts.outputs != 1:
        raise ModelFileError(f"{where} has {facts.outputs} outputs (a segmentation model?); {expected}")
    if len(out) != 3:
        kind = "a classification model" if len(out) == 2 else "not a detection model"
        raise ModelFileError(f"{where} is {kind} (output {list(out)}); {expected}")
    if out[1] <= 4 or (out[2] > 0 and out[2] < out[1]):
        raise ModelFileError(f"{where} gives output {list(out)}; {expected}")
    classes = out[1] - 4
    if names and len(names) != classes:
        raise ModelFileError(f"{where} has {classes} classes but {len(names)} names were given "
                             f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    return classes
