#!/usr/bin/env python
"""`make bench-cpu`: how close each CPU runtime comes to the machine's physical limit, in one run.

The limit is the float32 matrix-multiply peak (`bench.matmul_peak_gflops`) divided by
InceptionV3's 11.4 GFLOP per 299x299 image. Measured in paired rounds, medians reported:

- OpenVINO model only (pre-decoded uint8 batches) and `features --runtime openvino` end to end
  on realistic 500x375 JPEGs (read, hash, decode, model, HDF5 commits);
- TensorFlow (Keras) model only and end to end;
- ONNX Runtime model only, on the same network exported to ONNX through Keras' PyTorch backend
  (`model.export(format="onnx")`; its features are checked against TensorFlow's first), when
  onnxruntime, onnx, onnxscript and torch are installed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import make_photos, matmul_peak_gflops  # noqa: E402

GFLOP_PER_IMAGE = 11.4  # InceptionV3 at 299x299, multiply-adds counted twice

_EXPORT_ONNX = """
import sys, numpy as np
from bottleneck.backbones.backend import use_backend
use_backend("torch")
from bottleneck.backbones.build import build_feature_network
from bottleneck.backbones.spec import BackboneSpec
network = build_feature_network(BackboneSpec(weights="none", image_size=int(sys.argv[2])))
network(np.zeros((1, int(sys.argv[2]), int(sys.argv[2]), 3), np.float32))
network.export(sys.argv[1], format="onnx", verbose=False)
"""


def images_per_second(run, batch: np.ndarray, calls: int) -> float:
    run(batch)
    started = time.perf_counter()
    for _ in range(calls):
        run(batch)
    return calls * len(batch) / (time.perf_counter() - started)


def end_to_end(photos: Path, spec, runtime: str, batch_size: int, converted: Path | None) -> float:
    from bottleneck.features.extract import extract_features

    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as cache:
        if converted is not None:  # the conversion is cached per fingerprint; never part of a timing
            os.symlink(converted, Path(cache) / converted.name)
        result = extract_features(photos, cache, spec, batch_size=batch_size, runtime=runtime)
        return result.computed / result.seconds


def onnx_session(work: Path, size: int, reference):
    """An ONNX Runtime session of the feature network, checked against TensorFlow; None if not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None, "onnxruntime not installed"
    path = work / "inception.onnx"
    if not path.exists():
        done = subprocess.run([sys.executable, "-c", _EXPORT_ONNX, str(path), str(size)], capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}, cwd=ROOT)
        if done.returncode:
            return None, "export failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch.astype(np.float32)})[0]

    pixels, expected = reference
    got = run(pixels)
    spread = np.median(np.linalg.norm(expected - expected.mean(0), axis=1))
    return run, f"features off TensorFlow's by {np.linalg.norm(got - expected, axis=1).max() / spread:.1e} of the spread"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cache/bench-cpu")
    parser.add_argument("--images", type=int, default=96, help="photos end to end (default: 96)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from bottleneck.backbones.build import get_feature_model
    from bottleneck.backbones.spec import BackboneSpec

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    photos = work / "photos"
    if len(list(photos.rglob("*.jpg"))) != args.images:
        shutil.rmtree(photos, ignore_errors=True)
        make_photos(photos, args.images)
    spec = BackboneSpec(weights="none")  # no ImageNet download here; the same speed
    size = spec.input_size
    batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
    calls = max(2, args.images // args.batch_size)
    keras_model = get_feature_model(spec, "keras")
    openvino_model = get_feature_model(spec, "openvino", work)
    converted = work / f"{spec.fingerprint()}.openvino"
    onnx_run, onnx_note = onnx_session(work, size, (batch[:4], keras_model(batch[:4])))
    rounds = []
    for number in range(args.rounds):
        measured = {"limit": matmul_peak_gflops() / GFLOP_PER_IMAGE,
                    "openvino_model": images_per_second(openvino_model, batch, calls),
                    "openvino_end_to_end": end_to_end(photos, spec, "openvino", args.batch_size, converted),
                    "tensorflow_model": images_per_second(keras_model, batch, calls),
                    "tensorflow_end_to_end": end_to_end(photos, spec, "keras", args.batch_size, None)}
        if onnx_run is not None:
            measured["onnxruntime_model"] = images_per_second(onnx_run, batch, calls)
        rounds.append(measured)
        print(f"round {number + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in measured.items()), flush=True)
    figures = {name: round(median(r[name] for r in rounds), 2) for name in rounds[0]}
    ratios = {f"{name}_vs_limit": round(median(r[name] / r["limit"] for r in rounds), 3) for name in rounds[0] if name != "limit"}
    ratios["openvino_end_to_end_vs_model"] = round(median(r["openvino_end_to_end"] / r["openvino_model"] for r in rounds), 3)
    summary = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "batch_size": args.batch_size,
               "images_per_second": figures, "ratios": ratios, "onnx": onnx_note}
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
