"""Export a YOLO `.pt` to ONNX in a child process, cached next to the weights.

The serving process keeps one inference runtime: exporting needs torch and ultralytics, so it
runs in a separate Python process once, and the result is cached under a name keyed by what
changes the graph (weights content, imgsz, dynamic batch, opset, exporter version).

    python -m detectors.export WEIGHTS.pt OUT.onnx IMGSZ
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from .base import ModelLoadError
from .offline import default_state_dir

OPSET = 17


def exporter_version() -> str:
    try:
        return metadata.version("ultralytics")
    except metadata.PackageNotFoundError:
        return "none"


def cache_path(weights: Path, imgsz: int) -> Path:
    """Where the exported model for these inputs lives (next to the weights, else the state dir)."""
    h = hashlib.sha256()
    with weights.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    key = hashlib.sha256(
        f"{h.hexdigest()}|imgsz={imgsz}|dynamic=1|opset={OPSET}|ultralytics={exporter_version()}".encode()
    ).hexdigest()[:12]
    name = f"{weights.stem}.{imgsz}.{key}.onnx"
    if os.access(weights.parent, os.W_OK):
        return weights.parent / name
    return default_state_dir() / "exports" / name


def ensure_onnx(weights: Path, imgsz: int, timeout: float = 600) -> Path:
    """The cached ONNX file for `weights`, exporting it (in a child process) when missing."""
    out = cache_path(weights, imgsz)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "detectors.export", str(weights), str(out), str(imgsz)],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=str(Path(__file__).resolve().parent.parent))
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(f"ONNX export of {weights} failed: {' | '.join(tail)}")
    return out


def _export(weights: Path, out: Path, imgsz: int) -> None:  # runs in the child process
    from .offline import prepare_ultralytics_offline

    with tempfile.TemporaryDirectory(prefix="framegrid-export-") as tmp:
        prepare_ultralytics_offline()
        from ultralytics import YOLO

        work = Path(tmp) / weights.name
        shutil.copyfile(weights, work)
        produced = YOLO(str(work)).export(format="onnx", imgsz=imgsz, dynamic=True, simplify=False,
                                          opset=OPSET, verbose=False)
        tmp_out = out.with_suffix(".onnx.part")
        shutil.copyfile(produced, tmp_out)
        os.replace(tmp_out, out)  # atomic: a concurrent reader never sees half a file


if __name__ == "__main__":
    _export(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
