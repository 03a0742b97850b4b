#!/usr/bin/env python
"""`make bench-cpu`: how close each CPU runtime comes to the machine's physical limit, in one run.

The limit is the float32 matrix-multiply peak (`bench.matmul_peak_gflops`) divided by
InceptionV3's 11.4 GFLOP per 299x299 image. Measured in paired rounds, medians reported:

- OpenVINO model only (pre-decoded uint8 batches) and `features --runtime openvino` end to end
  on realistic 500x375 JPEGs (read, hash, decode, model, HDF5 commits);
- TensorFlow (Keras) model only and end to end;
- ONNX Runtime model only, on the same network exported to ONNX through Keras' PyTorch backend
  (`model.export(format="onnx")`; its features are checked against TensorFlow's first), when
  onnxruntime, onnx, onnxscript and torch are installed;
- a row per OpenVINO precision (float32, bf16 where the CPU has it, int8), model only and end to
  end, each against its own limit: the matrix-multiply peak in that precision, measured with
  OpenVINO's own kernels on one large MatMul (int8: the MatMul quantized by NNCF), over InceptionV3's
  11.4 G(FL)OP per image; and decoding alone, the stage that counts once the model is fast.
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
            os.symlink(converted.resolve(), Path(cache) / converted.name)
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
        done = subprocess.run(
            [sys.executable, "-c", _EXPORT_ONNX, str(path), str(size)],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"},
            cwd=ROOT,
        )
        if done.returncode:
            return None, "export failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch.astype(np.float32)})[0]

    pixels, expected = reference
    got = run(pixels)
    spread = np.median(np.linalg.norm(expected - expected.mean(0), axis=1))
    return (
        run,
        f"features off TensorFlow's by {np.linalg.norm(got - expected, axis=1).max() / spread:.1e} of the spread",
    )


#: Convolutions shaped like InceptionV3's (channels in, out, height and width, kernel, batch): the peak in a
#: precision is the fastest of them, as OpenVINO's own kernels run them.
PEAK_CONVOLUTIONS = (
    (512, 512, 56, 1, 4),
    (256, 256, 28, 3, 8),
    (192, 192, 35, 3, 8),
    (384, 384, 17, 3, 16),
    (64, 64, 147, 3, 2),
)


def openvino_peak(precision: str, repeats: int = 5) -> float:
    """G(FL)OP/s of the fastest of `PEAK_CONVOLUTIONS` run by OpenVINO in `precision` (int8: quantized by NNCF).

    Convolutions, not a MatMul: OpenVINO's int8 MatMul on AVX2 ran no faster than float32 here, while its int8
    convolutions (what InceptionV3 is made of) ran up to 3x faster.
    """
    import contextlib
    import io

    import openvino as ov
    import openvino.opset13 as ops

    from bottleneck.backbones.openvino import compile_on_cpu

    rng = np.random.default_rng(0)
    best = 0.0
    for channels_in, channels_out, side, kernel, batch in PEAK_CONVOLUTIONS:
        weights = rng.normal(0, 0.05, (channels_out, channels_in, kernel, kernel)).astype(np.float32)
        pixels = ops.parameter([batch, channels_in, side, side], np.float32, name="x")
        pad = [kernel // 2, kernel // 2]
        model = ov.Model([ops.relu(ops.convolution(pixels, ops.constant(weights), [1, 1], pad, pad, [1, 1]))], [pixels])
        data = np.abs(rng.normal(0, 1, (batch, channels_in, side, side))).astype(np.float32)
        if precision == "int8":
            import nncf

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                model = nncf.quantize(
                    model, nncf.Dataset([data]), subset_size=1, preset=nncf.QuantizationPreset.PERFORMANCE
                )
        compiled = compile_on_cpu(model, precision)
        compiled(data)
        started = time.perf_counter()
        for _ in range(repeats):
            compiled(data)
        flops = 2 * batch * side * side * channels_in * channels_out * kernel * kernel
        best = max(best, flops * repeats / (time.perf_counter() - started) / 1e9)
    return best


def decode_only(photos: Path, size: int, threads: int) -> float:
    """Images/s of reading and decoding the photos to `size` on `threads` threads: the pipeline without a model."""
    from concurrent.futures import ThreadPoolExecutor

    from bottleneck.features.decode import decode_image

    paths = sorted(photos.rglob("*.jpg"))
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda path: decode_image(path.read_bytes(), size), paths))
    return len(paths) / (time.perf_counter() - started)


def precision_rows(photos: Path, work: Path, batch: np.ndarray, calls: int, batch_size: int) -> dict:
    """For each OpenVINO precision this CPU runs: its limit, the model alone and end to end (images/s)."""
    from dataclasses import replace

    from bottleneck.backbones.openvino import cpu_capabilities
    from bottleneck.backbones.runtime import get_feature_model
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.features.calibration import settle_calibration
    from bottleneck.features.discover import discover_images

    spec = BackboneSpec(weights="none")
    precisions = ["float32"] + (["bf16"] if "BF16" in cpu_capabilities() else []) + ["int8"]
    rows = {}
    for precision in precisions:
        chosen = replace(spec, precision=precision)
        started = time.monotonic()
        if precision == "int8":  # calibrated once on the photos and kept in the work folder, like a cache
            chosen = settle_calibration(
                chosen,
                work,
                [image.path for image in discover_images(photos).images],
                log=lambda line: print(line, flush=True),
            )
        model = get_feature_model(chosen, "openvino", work)
        prepared = time.monotonic() - started
        links = [work / name for name in os.listdir(work) if name.endswith(".openvino")]
        with tempfile.TemporaryDirectory(prefix="bench-cpu-") as cache:
            for link in links:  # conversions and quantizations are cached; never part of a timing
                os.symlink(link.resolve(), Path(cache) / link.name)
            from bottleneck.features.extract import extract_features

            result = extract_features(photos, cache, chosen, batch_size=batch_size, runtime="openvino")
            end_to_end = result.computed / result.seconds
        rows[precision] = {
            "limit": openvino_peak(precision) / GFLOP_PER_IMAGE,
            "model": images_per_second(model, batch, calls),
            "end_to_end": end_to_end,
            "prepare_s": round(prepared, 1),
        }
    return rows


def runtime_rounds(photos: Path, work: Path, spec, batch: np.ndarray, calls: int, args) -> tuple[list[dict], str]:
    """Paired rounds of each runtime, model only and end to end, against the float32 sgemm limit."""
    from bottleneck.backbones.runtime import get_feature_model

    keras_model = get_feature_model(spec, "keras")
    openvino_model = get_feature_model(spec, "openvino", work)
    converted = work / f"{spec.fingerprint()}.openvino"
    onnx_run, onnx_note = onnx_session(work, spec.input_size, (batch[:4], keras_model(batch[:4])))
    rounds = []
    for number in range(args.rounds):
        measured = {
            "limit": matmul_peak_gflops() / GFLOP_PER_IMAGE,
            "openvino_model": images_per_second(openvino_model, batch, calls),
            "openvino_end_to_end": end_to_end(photos, spec, "openvino", args.batch_size, converted),
            "tensorflow_model": images_per_second(keras_model, batch, calls),
            "tensorflow_end_to_end": end_to_end(photos, spec, "keras", args.batch_size, None),
        }
        if onnx_run is not None:
            measured["onnxruntime_model"] = images_per_second(onnx_run, batch, calls)
        rounds.append(measured)
        print(f"round {number + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in measured.items()), flush=True)
    return rounds, onnx_note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cache/bench-cpu")
    parser.add_argument("--images", type=int, default=96, help="photos end to end (default: 96)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions-only", action="store_true", help="only the per-precision rows and decoding")
    args = parser.parse_args()
    from bottleneck.backbones.openvino import cpu_capabilities, cpu_flags
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
    rounds, onnx_note = [], "not measured (--precisions-only)"
    if not args.precisions_only:
        rounds, onnx_note = runtime_rounds(photos, work, spec, batch, calls, args)
    precisions = [precision_rows(photos, work, batch, calls, args.batch_size) for _ in range(args.rounds)]
    per_precision = {}
    for name in precisions[0]:
        runs = [round_[name] for round_ in precisions]
        per_precision[name] = {key: round(median(r[key] for r in runs), 2) for key in ("limit", "model", "end_to_end")}
        per_precision[name]["model_vs_limit"] = round(median(r["model"] / r["limit"] for r in runs), 3)
        per_precision[name]["end_to_end_vs_limit"] = round(median(r["end_to_end"] / r["limit"] for r in runs), 3)
        per_precision[name]["end_to_end_vs_model"] = round(median(r["end_to_end"] / r["model"] for r in runs), 3)
        per_precision[name]["end_to_end_vs_float32"] = round(
            median(r["end_to_end"] / round_["float32"]["end_to_end"] for r, round_ in zip(runs, precisions)), 3
        )
        per_precision[name]["first_run_prepare_s"] = runs[0]["prepare_s"]
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in per_precision[name].items()), flush=True)
    decoding = median(decode_only(photos, size, os.cpu_count() or 1) for _ in range(args.rounds))
    figures, ratios = {}, {}
    if rounds:
        figures = {name: round(median(r[name] for r in rounds), 2) for name in rounds[0]}
        ratios = {
            f"{name}_vs_limit": round(median(r[name] / r["limit"] for r in rounds), 3)
            for name in rounds[0]
            if name != "limit"
        }
        ratios["openvino_end_to_end_vs_model"] = round(
            median(r["openvino_end_to_end"] / r["openvino_model"] for r in rounds), 3
        )
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_cores": os.cpu_count(),
        "batch_size": args.batch_size,
        "cpu_flags": sorted(flag for flag in cpu_flags() if flag.startswith(("avx512", "amx", "avx_vnni", "avx2"))),
        "openvino_capabilities": list(cpu_capabilities()),
        "images_per_second": figures,
        "ratios": ratios,
        "onnx": onnx_note,
        "per_precision": per_precision,
        "decode_only_images_per_second": round(decoding, 1),
    }
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
