#!/usr/bin/env python
"""`make bench-shards`: the same images as files in class folders and as webdataset tar shards, end to end.

All figures come from one run on this machine, so compare the ratios, not absolute times. Each step
is the whole `bottleneck` command as a new process, files and shards taking turns:

- features: the first extraction (read, hash, decode, resize, backbone, store) into an empty cache;
- rerun: the same command again over unchanged data (nothing to compute; files are settled from
  their stamps, shard members from their shard's);
- train-head: a logistic-regression head on the cached features, less the fit itself (which
  depends on the split, and the split on the images' paths, so it differs between the two);
- read only: the bytes alone, every file read vs every shard read (the page cache is warm, as it is
  for the commands: this is the floor the I/O side can reach).

The default backbone is raw pixels at 32x32, so the pipeline around the model (listing, reading,
hashing, decoding, storing) is what is measured; `--backbone inception_v3` measures a real one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10


def make_images(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` distinct small JPEGs (about 4 KB each), a label each."""
    rng = np.random.default_rng(seed)
    images = []
    for number in range(count):
        label = number % CLASSES
        base = np.full((96, 128, 3), (label * 25, 255 - label * 25, (label * 70) % 256), dtype=np.float32)
        noise = rng.normal(0, 40, (12, 16, 3)).repeat(8, axis=0).repeat(8, axis=1)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
        images.append((f"class{label}", buffer.getvalue()))
    return images


def write_files(root: Path, images: list[tuple[str, bytes]]) -> None:
    for number, (label, data) in enumerate(images):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number:06d}.jpg").write_bytes(data)


def write_shards(root: Path, images: list[tuple[str, bytes]], per_shard: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(images), per_shard):
        with tarfile.open(root / f"train-{start // per_shard:04d}.tar", "w") as archive:
            for number in range(start, min(start + per_shard, len(images))):
                label, data = images[number]
                for name, payload in ((f"{number:06d}.jpg", data), (f"{number:06d}.cls", label.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))


def timed(command: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return seconds, (json.loads(lines[-1]) if lines else {})


def read_all(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        path.read_bytes()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--backbone", default="pixels")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", default="cache/bench-shards")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "bottleneck"]
    backbone = ["--backbone", args.backbone, "--image-size", str(args.image_size)]
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        work = Path(scratch)
        images = make_images(args.images)
        write_files(work / "files", images)
        write_shards(work / "shards", images, args.per_shard)
        sources = {"files": work / "files", "shards": work / "shards"}
        rows: dict[str, dict[str, float]] = {name: {} for name in sources}
        for data in sources.values():  # one warm-up read each, so both start from the page cache
            read_all(sorted(data.rglob("*.*")))
        for step in ("read only", "features", "rerun", "train-head"):  # "train-head" below: all but the fit
            for name, data in sources.items():
                cache = work / f"cache-{name}"
                if step == "read only":
                    rows[name][step] = read_all(sorted(p for p in data.rglob("*") if p.is_file()))
                elif step == "train-head":  # the fit itself is left out: it depends on the split, not on the source
                    seconds, result = timed(
                        [
                            *cli,
                            "train-head",
                            "--data",
                            str(data),
                            "--cache",
                            str(cache),
                            *backbone,
                            "--runs",
                            str(work / f"runs-{name}"),
                            "--json",
                        ]
                    )
                    metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
                    rows[name][step] = seconds - metrics["training_seconds"]
                else:
                    rows[name][step], result = timed(
                        [*cli, "features", str(data), "--cache", str(cache), *backbone, "--no-progress", "--json"]
                    )
                    expected = (args.images, 0) if step == "features" else (0, args.images)
                    assert (result["computed"], result["reused"]) == expected, result
    print(
        f"{args.images} images ({args.images // args.per_shard} shards of {args.per_shard}), backbone "
        f"{args.backbone} at {args.image_size}, {os.cpu_count()} CPUs; seconds, one run"
    )
    print(f"{'step':<12}{'files':>10}{'shards':>10}{'shards/files':>14}")
    for step in rows["files"]:
        files, shards = rows["files"][step], rows["shards"][step]
        print(f"{step:<12}{files:>10.2f}{shards:>10.2f}{shards / files:>14.2f}")
    (out / "bench-shards.json").write_text(
        json.dumps(
            {"images": args.images, "per_shard": args.per_shard, "backbone": args.backbone, "seconds": rows}, indent=2
        )
    )


if __name__ == "__main__":
    main()
