#!/usr/bin/env python
"""`make bench-gpu`: model-only and end-to-end images/s per Keras backend, precision and batch size.

For every backend installed (each in a process of its own: Keras picks its backend once per
process) and every batch size, on realistic 500x375 JPEGs (crops of scikit-learn's sample photos):

- decode: read + decode + resize on all CPU cores (the threads `features` uses), no model;
- model only: the compiled feature network on pre-decoded uint8 batches (host to device included);
- end to end: `extract_features` into a fresh cache (read, hash, decode, model, HDF5 commits);

then end to end / model only, and which stage limits (the slower of decode and model). Mixed
precision is measured where the backend sees a GPU. Reference: Keras' applications table gives
InceptionV3 6.9 ms per batch of 32 on a GPU (about 4,600 images/s). Runs on a CPU too (small
`--images`), as a smoke test and for the per-backend CPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

KERAS_REFERENCE = {"model": "InceptionV3", "ms_per_batch_of_32": 6.9, "images_per_second": round(32 / 0.0069)}


def measure_decode(paths: list[Path], size: int, workers: int) -> float:
    """Images/s of reading, hashing and decoding on `workers` threads, as `features` does it."""
    from bottleneck.features.decode import decode_image
    from bottleneck.features.engines.local import bounded_map
    from bottleneck.features.hashing import sha256_bytes

    def prepare(path: Path) -> np.ndarray:
        data = path.read_bytes()
        sha256_bytes(data)
        return decode_image(data, size)

    started = time.perf_counter()
    for _ in bounded_map(prepare, paths, workers, 4 * workers):
        pass
    return len(paths) / (time.perf_counter() - started)


def measure_model(model, batch_size: int, images: int, size: int) -> float:
    """Images/s of the compiled network alone on one pre-decoded uint8 batch, called repeatedly."""
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    model(batch)  # compile, allocate
    calls = max(2, images // batch_size)
    started = time.perf_counter()
    for _ in range(calls):
        model(batch)
    return calls * batch_size / (time.perf_counter() - started)


def measure_end_to_end(data: Path, spec, batch_size: int, workers: int) -> float:
    from bottleneck.features.extract import extract_features

    with tempfile.TemporaryDirectory(prefix="bench-gpu-cache-") as cache:
        result = extract_features(data, cache, spec, batch_size=batch_size, workers=workers)
        return result.computed / result.seconds


def worker(args: argparse.Namespace) -> dict:
    """One backend, in this process: every precision and batch size."""
    from bottleneck.backbones.backend import accelerators, use_backend

    backend = use_backend(args.backend)
    from bottleneck.backbones.runtime import get_feature_model
    from bottleneck.backbones.spec import BackboneSpec

    devices = accelerators(backend)
    data = Path(args.photos)
    paths = sorted(data.rglob("*.jpg"))
    workers = os.cpu_count() or 1
    size = args.image_size
    rows = []
    decode = measure_decode(paths, size, workers)
    precisions = ["float32", "mixed"] if devices and not args.float32_only else ["float32"]
    for precision in precisions:
        spec = BackboneSpec(architecture=args.backbone, weights="none", image_size=size, precision=precision)
        model = get_feature_model(spec, "keras")
        for batch_size in args.batch_sizes:
            model_only = measure_model(model, batch_size, args.images, size)
            end_to_end = measure_end_to_end(data, spec, batch_size, workers)
            rows.append(
                {
                    "precision": precision,
                    "batch_size": batch_size,
                    "model_only": round(model_only, 1),
                    "end_to_end": round(end_to_end, 1),
                    "end_to_end_vs_model": round(end_to_end / model_only, 3),
                    "limit": "decode" if decode < model_only else "model",
                }
            )
            print(json.dumps({"progress": rows[-1], "backend": backend}), file=sys.stderr, flush=True)
    return {
        "backend": backend,
        "devices": list(devices) or ["CPU"],
        "cpu_cores": workers,
        "decode_images_per_second": round(decode, 1),
        "rows": rows,
    }


def installed_backends() -> list[str]:
    from bottleneck.backbones.backend import BACKENDS, is_installed

    return [b for b in BACKENDS if is_installed(b)]


def print_table(results: list[dict]) -> None:
    print(
        f"\n{'backend':<11} {'device':<28} {'precision':<9} {'batch':>5} {'decode/s':>9} {'model/s':>9} "
        f"{'end-to-end/s':>12} {'e2e/model':>9}  limit"
    )
    for result in results:
        if "error" in result:
            print(f"{result['backend']:<11} error: {result['error']}")
            continue
        for row in result["rows"]:
            print(
                f"{result['backend']:<11} {result['devices'][0][:28]:<28} {row['precision']:<9} {row['batch_size']:>5} "
                f"{result['decode_images_per_second']:>9.1f} {row['model_only']:>9.1f} {row['end_to_end']:>12.1f} "
                f"{row['end_to_end_vs_model']:>9.3f}  {row['limit']}"
            )
    print(
        f"Keras' reference: {KERAS_REFERENCE['model']} {KERAS_REFERENCE['ms_per_batch_of_32']} ms per batch of 32 "
        f"on its GPU (about {KERAS_REFERENCE['images_per_second']} images/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cache/bench-gpu", help="where the photos and results.json go")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every one installed)")
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch-sizes", default="32,64,128,256")
    parser.add_argument("--images", type=int, default=2048, help="photos end to end, and images per model-only figure")
    parser.add_argument("--float32-only", action="store_true", help="skip mixed precision")
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # worker mode: one backend, in this process
    parser.add_argument("--photos", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    if args.backend:
        print(json.dumps(worker(args)))
        return
    out = Path(args.out)
    photos = out / "photos"
    if len(list(photos.rglob("*.jpg"))) != args.images:
        import shutil

        from bench import make_photos

        shutil.rmtree(photos, ignore_errors=True)
        make_photos(photos, args.images)
    results = []
    for backend in args.backends.split(",") if args.backends else installed_backends():
        command = [
            sys.executable,
            __file__,
            "--backend",
            backend,
            "--photos",
            str(photos),
            "--backbone",
            args.backbone,
            "--image-size",
            str(args.image_size),
            "--batch-sizes",
            ",".join(map(str, args.batch_sizes)),
            "--images",
            str(args.images),
        ] + (["--float32-only"] if args.float32_only else [])
        env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        lines = done.stdout.strip().splitlines()
        results.append(
            json.loads(lines[-1])
            if done.returncode == 0 and lines
            else {"backend": backend, "error": f"exit {done.returncode}"}
        )
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "images": args.images,
        "image_size": args.image_size,
        "backbone": args.backbone,
        "keras_reference": KERAS_REFERENCE,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print_table(results)
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
