#!/usr/bin/env python
"""`make bench-audit`: `bottleneck audit` on 100,000 images, time and peak memory, with planted problems.

Computing 100,000 real features would take hours here, so the images are tiny distinct PNG files
and their 2048-d features (InceptionV3's size) are written straight into the store they would
have, under a backbone named by a stand-in weights file: class clusters with spread, plus planted
near-duplicate pairs (half of them across splits), label flips and far outliers. The audit itself
runs as the real command in a new process; recall and precision on the planted cases are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bottleneck.backbones.spec import BackboneSpec  # noqa: E402
from bottleneck.features.hashing import sha256_bytes  # noqa: E402


def write_images(data: Path, count: int, classes: int) -> list[tuple[str, str, str]]:
    """`count` distinct 4x4 PNGs, round-robin over classes; (relpath, label, content hash) of each."""
    rows = []
    for i in range(count):
        label = f"class{i % classes:02d}"
        folder = data / label
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.frombuffer(i.to_bytes(48, "little"), np.uint8).reshape(4, 4, 3)
        path = folder / f"img{i:07d}.png"
        Image.fromarray(pixels).save(path, optimize=False)
        rows.append((f"{label}/{path.name}", label, sha256_bytes(path.read_bytes())))
    return rows


def synthetic_features(
    labels: list[str], classes: int, dim: int, planted: int, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """Class clusters, and planted near-duplicates, label flips (rows drawn from another class) and outliers."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    y = np.array([int(label[-2:]) for label in labels])
    X = centres[y] + rng.normal(0, 1.6, (len(y), dim)).astype(np.float32)
    X = np.maximum(X, 0)  # pooled ReLU features are non-negative
    chosen = rng.choice(len(y), size=4 * planted, replace=False)
    dup_a, dup_b, flips, outliers = np.split(chosen, 4)
    dup_b = np.array([b for a, b in zip(dup_a, dup_b)])
    X[dup_b] = X[dup_a] + rng.normal(0, 0.02, (planted, dim)).astype(np.float32)
    for row in flips:
        other = (y[row] + 1 + rng.integers(0, classes - 1)) % classes
        X[row] = np.maximum(centres[other] + rng.normal(0, 1.6, dim), 0)
    X[outliers] = np.maximum(rng.normal(0, 6.0, (planted, dim)), 0)
    return X, {
        "duplicates": list(zip(dup_a.tolist(), dup_b.tolist())),
        "flips": flips.tolist(),
        "outliers": outliers.tolist(),
    }


def write_store(cache: Path, spec: BackboneSpec, rows: list[tuple[str, str, str]], X: np.ndarray, data: Path) -> None:
    from bottleneck.features.extract import open_store
    from bottleneck.features.hashing import HashIndex

    index = HashIndex(cache)
    try:
        store = open_store(cache, spec, index, None)
        with store.writer() as writer:
            for start in range(0, len(rows), 8192):
                part = rows[start : start + 8192]
                writer.commit(
                    [h for _, _, h in part], X[start : start + len(part)], [str(data / p) for p, _, _ in part]
                )
            writer.finish()
    finally:
        index.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--planted", type=int, default=100, help="pairs, flips and outliers planted, of each")
    parser.add_argument("--out", default="cache/bench-audit")
    parser.add_argument(
        "--max-memory", default="512M", help="the audit's --max-memory: features over it are read in chunks"
    )
    args = parser.parse_args()
    work = Path(args.out)
    data, cache = work / "data", work / "cache"
    weights = work / "stand-in.weights.h5"
    work.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"a stand-in: the audit never builds the network")
    spec = BackboneSpec(weights=str(weights), image_size=75)
    started = time.perf_counter()
    rows = write_images(data, args.images, args.classes)
    X, planted = synthetic_features([label for _, label, _ in rows], args.classes, args.dim, args.planted)
    write_store(cache, spec, rows, X, data)
    print(
        f"{args.images} images and their {args.dim}-d store written in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    del X

    argv = [
        "audit",
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--weights",
        str(weights),
        "--image-size",
        "75",
        "--out",
        str(work / "audit"),
        "--json",
        "--max-memory",
        args.max_memory,
    ]
    # The child reports its own peak (VmHWM of its address space): a parent's ru_maxrss of children would count
    # this process's pages, which the child holds for an instant between fork and exec.
    command = [
        sys.executable,
        "-c",
        "import sys, re; from bottleneck.cli import main; code = main(sys.argv[1:]); "
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), file=sys.stderr); "
        "sys.exit(code)",
        *argv,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(done.stderr)
    peak_mib = int(done.stderr.strip().splitlines()[-1]) / 1024
    result = json.loads(done.stdout.strip().splitlines()[-1])
    path_of = [relpath for relpath, _, _ in rows]
    found_pairs = {tuple(sorted((p["a"], p["b"]))) for p in result["near_duplicates"]}
    want_pairs = {tuple(sorted((path_of[a], path_of[b]))) for a, b in planted["duplicates"]}
    found_issues = {i["path"] for i in result["label_issues"]}
    want_issues = {path_of[i] for i in planted["flips"]}
    found_outliers = {o["path"] for o in result["outliers"]}
    far_out = {o["path"] for o in result["outliers"] if o["far_out"]}
    want_outliers = {path_of[i] for i in planted["outliers"]}
    top_outliers = {o["path"] for o in result["outliers"][: len(want_outliers)]}
    top_issues = {i["path"] for i in result["label_issues"][: len(want_issues) + len(want_outliers)]}

    def score(found: set, wanted: set) -> dict:
        hits = len(found & wanted)
        return {
            "recall": round(hits / len(wanted), 3),
            "precision": round(hits / len(found), 3) if found else None,
            "found": len(found),
        }

    summary = {
        "images": args.images,
        "dim": args.dim,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_mib),
        "stages": result["seconds"],
        "near_duplicates": score(found_pairs, want_pairs),
        "label_issues": score(found_issues, want_issues),
        "outliers": score(found_outliers, want_outliers),
        "far_out_outliers": score(far_out, want_outliers),
        "planted_outliers_in_the_top_ranks": round(len(top_outliers & want_outliers) / len(want_outliers), 3),
        "planted_flips_and_outliers_in_the_top_ranks": round(
            len(top_issues & (want_issues | want_outliers)) / len(top_issues), 3
        )
        if top_issues
        else None,
        "max_memory": args.max_memory,
        # noise outliers belong to no class, so confident learning rightly flags their labels too
        "label_issues_precision_counting_outliers": round(
            len(found_issues & (want_issues | want_outliers)) / max(1, len(found_issues)), 3
        ),
        "cpu_cores": os.cpu_count(),
    }
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
