"""Write a tiny piper voice: an ONNX model with piper's inputs and output, and its `.onnx.json`.

    .venv/bin/python -m tools.make_tiny_piper OUT_DIR [--name tiny] [--rate 22050]

Real piper voices are VITS models (tens of MB) downloaded from the piper-voices collection; none can
be fetched here. This one has the same interface (`input` phoneme ids [1, n] int64, `input_lengths`
[1], `scales` [3] float32 -> audio [1, 1, samples] float32) and piper's phoneme map for espeak-ng's
`en-us`, so the real `piper` package phonemises, runs and streams it: each phoneme id becomes
`HOP` samples of a tone at 120 + 12 x id Hz, stretched by the length scale. It tests plumbing, not
voices.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HOP = 512  # samples per phoneme id (at length scale 1)


def make(out: Path, name: str = "tiny", rate: int = 22050) -> Path:
    """Write `<name>.onnx` and `<name>.onnx.json` into `out` -> the .onnx path."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP

    out.mkdir(parents=True, exist_ok=True)
    consts = {
        "base": np.array(120.0, np.float32), "step": np.array(12.0, np.float32),
        "two_pi_over_rate": np.array(2 * np.pi / rate, np.float32), "gain": np.array(0.3, np.float32),
        "hop": np.array([HOP], np.float32), "one": np.array(1.0, np.float32), "zero": np.array(0.0, np.float32),
        "idx1": np.array([1], np.int64), "axes2": np.array([2], np.int64), "flat": np.array([1, 1, -1], np.int64),
    }
    nodes = [
        # samples per phoneme: HOP x length scale (scales = [noise, length, noise_w])
        helper.make_node("Gather", ["scales", "idx1"], ["length"], axis=0),
        helper.make_node("Mul", ["hop", "length"], ["samples_f"]),
        helper.make_node("Cast", ["samples_f"], ["samples"], to=TensorProto.INT64),
        helper.make_node("Squeeze", ["samples"], ["count"]),
        helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "count_f", "one"], ["t"]),  # [L]
        helper.make_node("Cast", ["input"], ["ids_f"], to=TensorProto.FLOAT),  # [1, n]
        helper.make_node("Mul", ["ids_f", "step"], ["rise"]),
        helper.make_node("Add", ["rise", "base"], ["freq"]),
        helper.make_node("Unsqueeze", ["freq", "axes2"], ["freq3"]),  # [1, n, 1]
        helper.make_node("Mul", ["freq3", "t"], ["cycles"]),  # [1, n, L]
        helper.make_node("Mul", ["cycles", "two_pi_over_rate"], ["phase"]),
        helper.make_node("Sin", ["phase"], ["wave"]),
        helper.make_node("Mul", ["wave", "gain"], ["quiet"]),
        helper.make_node("Reshape", ["quiet", "flat"], ["output"]),  # [1, 1, n x L]
    ]
    graph = helper.make_graph(
        nodes, "tiny-piper",
        [helper.make_tensor_value_info("input", TensorProto.INT64, [1, "n"]),
         helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, "samples"])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = out / f"{name}.onnx"
    onnx.save(model, str(path))
    config = {
        "audio": {"sample_rate": rate}, "espeak": {"voice": "en-us"}, "phoneme_type": "espeak",
        "num_symbols": 256, "num_speakers": 1, "phoneme_id_map": DEFAULT_PHONEME_ID_MAP,
        "inference": {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8},
    }
    Path(f"{path}.json").write_text(json.dumps(config, ensure_ascii=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--name", default="tiny")
    ap.add_argument("--rate", type=int, default=22050)
    args = ap.parse_args()
    print(make(args.out, args.name, args.rate))


if __name__ == "__main__":
    main()
