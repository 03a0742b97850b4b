#!/usr/bin/env python
"""`make bench`: how fast `bottleneck features` is, against the model alone and a naive loop.

All figures come from one run on this machine, so compare the ratios, not absolute times.

- model alone: the bare backbone in one `tf.function` on pre-decoded uint8 tensors, per batch size;
Ours, the model alone and the naive loop run in paired rounds and the medians are reported.

- ours: `extract_features` end to end (read, hash, decode, resize, backbone, HDF5 commits) on
  realistic 500x375 JPEGs, model already built (steady-state throughput);
- naive: what the old `retrain.py` does: decode one image, one model call per image, one text
  file of comma-separated floats per image;
- rerun: the whole `bottleneck features` command, as a new process, over an unchanged folder;
- predict: `bottleneck predict` on as many new photos, with a logreg run trained on the first round's
  cache (same pipeline as `features`, so the same images/s is expected).

Photos: crops and flips of the two photographs scikit-learn ships, so nothing is downloaded.
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
from statistics import median

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bottleneck.backbones.runtime import get_feature_model  # noqa: E402
from bottleneck.backbones.spec import BackboneSpec  # noqa: E402
from bottleneck.features.decode import decode_image  # noqa: E402
from bottleneck.features.extract import extract_features  # noqa: E402


def make_photos(root: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct 500x375 JPEGs (quality 90) cut from scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    paths = []
    for i in range(count):
        label = ["china", "flower"][i % 2]
        photo = photos[i % 2]
        scale = rng.uniform(0.6, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        image = photo.crop((x, y, x + w, y + h)).resize((500, 375), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{label}_{i:05d}.jpg"
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def model_alone(spec: BackboneSpec, batch_size: int, images: int) -> float:
    """Images/s of the bare backbone on pre-decoded tensors."""
    model = get_feature_model(spec, "keras")
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, spec.input_size, spec.input_size, 3), np.uint8)
    model(batch)  # warm-up: tracing and first-call allocations
    calls = max(1, images // batch_size)
    start = time.perf_counter()
    for _ in range(calls):
        model(batch)
    return calls * batch_size / (time.perf_counter() - start)


def ours(
    spec: BackboneSpec, data: Path, cache: Path, batch_size: int, runtime: str = "keras", converted: Path | None = None
) -> dict:
    """`extract_features` end to end with the model already built (OpenVINO: already converted)."""
    if converted is not None:  # share one conversion between rounds, as a cache folder does between runs
        cache.mkdir(parents=True, exist_ok=True)
        link = cache / f"{spec.fingerprint()}.openvino"
        if not link.exists():
            link.symlink_to(converted, target_is_directory=True)
    result = extract_features(data, cache, spec, batch_size=batch_size, runtime=runtime)
    assert result.computed == result.images, result
    return {"images_per_second": result.computed / result.seconds, "seconds": result.seconds}


def predict_speed(run_dir: Path, folder: Path, batch_size: int) -> float:
    """Computed images/s of `predict_images` on photos it has never seen (model already built)."""
    from bottleneck.features.extract import ExtractOptions
    from bottleneck.use.predict import predict_images

    result = predict_images(run_dir, [str(folder)], options=ExtractOptions(batch_size=batch_size))
    assert result.computed == len(result.predictions) and not result.failed, result
    return result.computed / result.seconds


def train_logreg_run(data: Path, cache: Path, runs: Path, spec: BackboneSpec) -> Path:
    from bottleneck.learn.runs import HeadConfig, train_head

    return train_head(data, cache, runs, spec, HeadConfig("logreg")).run_dir


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    """float32 matrix-multiply speed of this machine (all cores): the ceiling for a conv net."""
    a = np.random.default_rng(0).random((n, n), np.float32)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


INCEPTION_V3_GFLOP_AT_299 = 11.4  # multiply-adds counted twice, for one 299x299 image


def naive(spec: BackboneSpec, paths: list[Path], out: Path) -> float:
    """retrain.py's way: one image per model call, one text file of floats per image."""
    model = get_feature_model(spec, "keras")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in paths:
        pixels = decode_image(path.read_bytes(), spec.input_size)
        values = model(pixels[None])[0]
        (out / f"{path.name}_inception_v3.txt").write_text(",".join(str(float(v)) for v in values))
    return len(paths) / (time.perf_counter() - start)


def cli_rerun_seconds(data: Path, cache: Path, spec: BackboneSpec) -> float:
    """Wall time of a whole `bottleneck features` process over a folder already in the cache."""
    command = [
        sys.executable,
        "-m",
        "bottleneck",
        "features",
        str(data),
        "--cache",
        str(cache),
        "--weights",
        spec.weights,
        "--image-size",
        str(spec.input_size),
        "--json",
        "--no-progress",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["computed"] == 0, summary
    return seconds


def rerun_at_scale(count: int, work: Path) -> dict:
    """Fill a cache with `count` small images at the smallest input size, then time an unchanged rerun."""
    spec = BackboneSpec(weights="none", image_size=75)
    data, cache = work / "many", work / "many-cache"
    rng = np.random.default_rng(1)
    for i in range(count):
        folder = data / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(folder / f"{i:06d}.png")
    first = extract_features(data, cache, spec, batch_size=64)
    return {
        "images": count,
        "first_run_seconds": round(first.seconds, 1),
        "unchanged_rerun_seconds": round(cli_rerun_seconds(data, cache, spec), 2),
    }


def cache_read_and_logreg(work: Path, rows: int, classes: int = 10, dim: int = 2048) -> dict:
    """Read `rows` x `dim` float32 features back from a store (vs a raw read of the file), train logreg on them."""
    from bottleneck.features.store import FeatureStore
    from bottleneck.learn.heads import LogRegHead

    rng = np.random.default_rng(2)
    store = FeatureStore(work / "big-cache", "bench-store", dim, {"pretrained": False})
    labels = rng.integers(0, classes, rows)
    centres = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    with store.writer() as writer:
        for start in range(0, rows, 5000):
            part = labels[start : start + 5000]
            features = centres[part] + rng.normal(0, 12, (len(part), dim)).astype(np.float32)  # overlapping classes
            writer.commit([f"{i:064x}" for i in range(start, start + len(part))], features, [""] * len(part))
        writer.finish()
    megabytes = rows * dim * 4 / 1e6
    start = time.perf_counter()
    with open(store.path, "rb") as handle:  # the disk's own speed for this file (page cache warm, as ours)
        while handle.read(64 << 20):
            pass
    raw = time.perf_counter() - start
    start = time.perf_counter()
    loaded = store.load()
    ours_seconds = time.perf_counter() - start
    assert loaded.features.shape == (rows, dim)
    start = time.perf_counter()
    head = LogRegHead().fit(loaded.features, labels.astype(str))
    train_seconds = time.perf_counter() - start
    accuracy = float(np.mean(head.predict(loaded.features) == labels.astype(str)))
    return {
        "rows": rows,
        "megabytes": round(megabytes),
        "load_mb_per_second": round(megabytes / ours_seconds),
        "raw_read_mb_per_second": round(megabytes / raw),
        "logreg_train_seconds": round(train_seconds, 1),
        "logreg_train_accuracy": round(accuracy, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96, help="photos for each end-to-end measurement")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument(
        "--rounds", type=int, default=3, help="paired rounds of model alone / ours / naive (median taken)"
    )
    parser.add_argument("--rerun-images", type=int, default=10000, help="images in the unchanged-rerun test (0: skip)")
    parser.add_argument(
        "--cache-rows", type=int, default=50000, help="rows in the cache-read and logreg test (0: skip)"
    )
    parser.add_argument(
        "--no-openvino",
        dest="openvino",
        action="store_false",
        help="skip the OpenVINO runtime (measured by default when it is installed)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    args = parser.parse_args()
    if args.openvino:
        try:
            import openvino  # noqa: F401
        except ImportError:
            args.openvino = False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Random weights run exactly as fast as ImageNet's, and need no download.
    spec = BackboneSpec(weights="none", image_size=args.image_size)
    figures: dict = {"image_size": args.image_size, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bottleneck-bench-") as tmp:
        work = Path(tmp)
        paths = make_photos(work / "photos", args.images)
        sweep = {b: model_alone(spec, b, max(args.images // 2, b * 3)) for b in map(int, args.batch_sizes.split(","))}
        best_batch = max(sweep, key=sweep.get)
        figures["model_alone_sweep_images_per_second"] = {str(b): round(v, 2) for b, v in sweep.items()}
        figures["best_batch_size"] = best_batch
        if args.openvino:  # convert once, as the cache keeps it between runs; not part of any timing
            from bottleneck.backbones.openvino import convert_to_openvino

            convert_to_openvino(spec, work / "ov-converted")
        # Paired rounds (model alone, ours, naive in turn): drift on a shared machine hits all three.
        rounds = []
        for round_number in range(args.rounds):
            alone = model_alone(spec, best_batch, args.images)
            end_to_end = ours(spec, work / "photos", work / f"cache-{round_number}", best_batch)["images_per_second"]
            loop = naive(spec, paths, work / f"naive-{round_number}")
            if round_number == 0:
                run_dir = train_logreg_run(work / "photos", work / "cache-0", work / "runs", spec)
            fresh = work / f"new-{round_number}"
            make_photos(fresh, args.images, seed=100 + round_number)
            predicted = predict_speed(run_dir, fresh, best_batch)
            measured = {"model_alone": alone, "ours": end_to_end, "naive": loop, "predict": predicted}
            if args.openvino:
                measured["ours_openvino"] = ours(
                    spec,
                    work / "photos",
                    work / f"ov-cache-{round_number}",
                    best_batch,
                    runtime="openvino",
                    converted=work / "ov-converted",
                )["images_per_second"]
            rounds.append(measured)
        figures["rounds"] = [{k: round(v, 2) for k, v in r.items()} for r in rounds]
        figures["model_alone_images_per_second"] = round(median([r["model_alone"] for r in rounds]), 2)
        figures["ours_images_per_second"] = round(median([r["ours"] for r in rounds]), 2)
        figures["naive_images_per_second"] = round(median([r["naive"] for r in rounds]), 2)
        figures["ours_vs_model_alone"] = round(median([r["ours"] / r["model_alone"] for r in rounds]), 3)
        figures["ours_vs_naive"] = round(median([r["ours"] / r["naive"] for r in rounds]), 3)
        figures["predict_images_per_second"] = round(median([r["predict"] for r in rounds]), 2)
        figures["predict_vs_ours"] = round(median([r["predict"] / r["ours"] for r in rounds]), 3)
        if args.openvino:
            peak = matmul_peak_gflops()
            limit = peak / (INCEPTION_V3_GFLOP_AT_299 * (args.image_size / 299) ** 2)
            figures["matmul_peak_gflops"] = round(peak, 1)
            figures["physical_limit_images_per_second"] = round(limit, 2)
            figures["ours_openvino_images_per_second"] = round(median([r["ours_openvino"] for r in rounds]), 2)
            figures["ours_openvino_vs_model_alone"] = round(
                median([r["ours_openvino"] / r["model_alone"] for r in rounds]), 3
            )
            figures["ours_openvino_vs_physical_limit"] = round(figures["ours_openvino_images_per_second"] / limit, 3)
        figures["rerun_unchanged_seconds"] = round(cli_rerun_seconds(work / "photos", work / "cache-0", spec), 2)
        if args.rerun_images:
            figures["rerun_at_scale"] = rerun_at_scale(args.rerun_images, work)
        if args.cache_rows:
            figures["cache_read"] = cache_read_and_logreg(work, args.cache_rows)
    print_table(figures)
    if args.json:
        print(json.dumps(figures))


def print_table(figures: dict) -> None:
    best = figures["best_batch_size"]
    sweep = figures["model_alone_sweep_images_per_second"]
    rows = [("model alone, batch sweep", ", ".join(f"{b}: {v:.2f}" for b, v in sweep.items()) + " images/s")]
    rows += [
        (
            f"model alone, batch {best} (median of {len(figures['rounds'])})",
            f"{figures['model_alone_images_per_second']:.2f} images/s",
        ),
        (f"bottleneck features, batch {best}", f"{figures['ours_images_per_second']:.2f} images/s"),
        ("naive loop (retrain.py style)", f"{figures['naive_images_per_second']:.2f} images/s"),
        ("ours / model alone (paired median)", f"{figures['ours_vs_model_alone']:.3f}"),
        ("ours / naive (paired median)", f"{figures['ours_vs_naive']:.3f}"),
        (f"bottleneck predict on new photos, batch {best}", f"{figures['predict_images_per_second']:.2f} images/s"),
        ("predict / features (paired median)", f"{figures['predict_vs_ours']:.3f}"),
        ("unchanged rerun, whole command", f"{figures['rerun_unchanged_seconds']:.2f} s"),
    ]
    if "ours_openvino_images_per_second" in figures:
        rows += [
            (
                f"bottleneck features --runtime openvino, batch {best}",
                f"{figures['ours_openvino_images_per_second']:.2f} images/s",
            ),
            ("openvino ours / TF model alone (paired median)", f"{figures['ours_openvino_vs_model_alone']:.3f}"),
            (
                f"physical limit ({figures['matmul_peak_gflops']} GFLOP/s matmul peak)",
                f"{figures['physical_limit_images_per_second']:.2f} images/s",
            ),
            ("openvino ours / physical limit", f"{figures['ours_openvino_vs_physical_limit']:.3f}"),
        ]
    if "rerun_at_scale" in figures:
        scale = figures["rerun_at_scale"]
        rows.append((f"unchanged rerun, {scale['images']:,} images", f"{scale['unchanged_rerun_seconds']:.2f} s"))
    if "cache_read" in figures:
        read = figures["cache_read"]
        rows.append(
            (
                f"load {read['rows']:,} x 2048 features ({read['megabytes']} MB)",
                f"{read['load_mb_per_second']} MB/s (raw read of the file: {read['raw_read_mb_per_second']} MB/s)",
            )
        )
        rows.append((f"logreg head on {read['rows']:,} x 2048", f"{read['logreg_train_seconds']} s"))
    width = max(len(r[0]) for r in rows)
    print(f"\nInceptionV3 at {figures['image_size']}x{figures['image_size']}, {figures['cores']} cores, one run:")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
