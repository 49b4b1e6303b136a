"""Export a YOLO `.pt` with ultralytics' exporter, in a child process, cached next to the weights.

The serving process keeps one inference runtime: exporting needs torch and ultralytics, so it
runs in a separate Python process once, and the result is cached under a name keyed by what
changes it: weights content, format, imgsz, batch (dynamic), precision, opset and the exporter's
version. A second start with the same inputs reuses the file; a change of any of them exports
anew (old exports are left for the user to delete). An `int8` export is the float OpenVINO export
quantized on a folder of calibration images (`detectors.quantize`), keyed by those images too.

    python -m detectors.export WEIGHTS.pt OUT FORMAT IMGSZ PRECISION [CALIBRATION]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from streams import default_state_dir

from .base import ModelLoadError

OPSET = 17
FORMATS = {"onnx": ".onnx", "openvino": "_openvino_model"}  # file / folder suffix
PRECISIONS = ("fp32", "fp16", "int8")  # int8: OpenVINO only, calibrated (detectors.quantize)


def exporter_version() -> str:
    try:
        return metadata.version("ultralytics")
    except metadata.PackageNotFoundError:
        return "none"


def _weights_digest(weights: Path) -> str:
    h = hashlib.sha256()
    with weights.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path(weights: Path, imgsz: int, fmt: str = "onnx", precision: str = "fp32",
               calibration: Path | None = None) -> Path:
    """Where the export for these inputs lives (next to the weights, else in the state dir)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    calibrated = ""
    if precision == "int8":
        from .quantize import RECIPE, calibration_digest, nncf_version

        if fmt != "openvino" or calibration is None:
            raise ValueError("an int8 export is an OpenVINO one, calibrated on a folder of images")
        calibrated = f"|calibration={calibration_digest(calibration)}|nncf={nncf_version()}|recipe={RECIPE}"
    key = hashlib.sha256(
        f"{_weights_digest(weights)}|{fmt}|imgsz={imgsz}|batch=dynamic|{precision}|opset={OPSET}"
        f"|ultralytics={exporter_version()}{calibrated}".encode()
    ).hexdigest()[:12]
    name = f"{weights.stem}.{imgsz}.{precision}.{key}{FORMATS[fmt]}"
    if os.access(weights.parent, os.W_OK):
        return weights.parent / name
    return default_state_dir() / "exports" / name


def ensure_export(weights: Path, imgsz: int, fmt: str = "onnx", precision: str = "fp32",
                  timeout: float = 900, calibration: Path | None = None) -> Path:
    """The cached export of `weights`, made (in a child process) when missing."""
    out = cache_path(weights, imgsz, fmt, precision, calibration)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exporting(out):  # slots loading at once (threads or processes): one exports, the others wait for it
        if not out.exists():
            _run_export(weights, out, fmt, imgsz, precision, calibration, timeout)
    return out


@contextmanager
def _exporting(out: Path) -> Iterator[None]:
    import fcntl

    with open(out.parent / f".{out.name}.lock", "w") as fh:  # one open file per caller: flock excludes each
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _run_export(weights: Path, out: Path, fmt: str, imgsz: int, precision: str, calibration: Path | None,
                timeout: float) -> None:
    proc = subprocess.run([sys.executable, "-m", "detectors.export", str(weights), str(out), fmt, str(imgsz),
                           precision, *([str(calibration)] if calibration else [])],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=str(Path(__file__).resolve().parent.parent))
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(f"{fmt} export of {weights} failed: {' | '.join(tail)}")


def ensure_onnx(weights: Path, imgsz: int, timeout: float = 900) -> Path:
    return ensure_export(weights, imgsz, "onnx", "fp32", timeout)


def _quantized(weights: Path, out: Path, imgsz: int, calibration: Path) -> None:  # in the child process
    """The float OpenVINO export (made first if missing), quantized to INT8 into `out`."""
    from .quantize import quantize

    source = ensure_export(weights, imgsz, "openvino", "fp32")
    xml = next(source.glob("*.xml"))
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    quantize(xml, part / xml.name, calibration, imgsz)
    for extra in source.iterdir():  # the export's metadata (class names, stride) goes with it
        if extra.suffix not in (".xml", ".bin"):
            shutil.copyfile(extra, part / extra.name)
    os.replace(part, out)


def _export(weights: Path, out: Path, fmt: str, imgsz: int, precision: str,
            calibration: Path | None = None) -> None:  # in the child process
    from .offline import prepare_ultralytics_offline

    if precision == "int8":
        assert calibration is not None
        _quantized(weights, out, imgsz, calibration)
        return
    with tempfile.TemporaryDirectory(prefix="framegrid-export-") as tmp:
        prepare_ultralytics_offline()
        from ultralytics import YOLO

        work = Path(tmp) / weights.name
        shutil.copyfile(weights, work)
        kwargs: dict[str, object] = {"format": fmt, "imgsz": imgsz, "dynamic": True, "verbose": False,
                                     "half": precision == "fp16"}
        if fmt == "onnx":
            kwargs.update(simplify=False, opset=OPSET)
        produced = Path(YOLO(str(work)).export(**kwargs))
        part = out.with_name(out.name + ".part")
        if part.exists():
            shutil.rmtree(part) if part.is_dir() else part.unlink()
        if produced.is_dir():
            shutil.copytree(produced, part)
        else:
            shutil.copyfile(produced, part)
        os.replace(part, out)  # atomic: a concurrent reader never sees half an export


if __name__ == "__main__":
    _export(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5],
            Path(sys.argv[6]) if len(sys.argv) > 6 else None)
