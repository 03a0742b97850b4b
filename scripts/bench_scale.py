#!/usr/bin/env python3
"""How the feature store and the heads grow with the number of rows (`make bench-scale`).

For each size N (default 10k, 100k and 1M rows of 2048 float32 features, InceptionV3's shape)
a synthetic store is built without computing anything: seeded random features around one
centre per class (so a head has something to learn), content hashes = sha256 of the row
number, written as segments of 50k rows with `FeatureStore.write_segment` and indexed by one
`finish` under the writer. Then, on that store:

- add 1,000 rows the way extraction does (commits of 16 rows, then `finish`): wall time and
  bytes written (the `write_bytes` of /proc/self/io: what reached the block layer, or `wchar`
  where that reads 0), split into opening the writer, committing and finishing;
- an unchanged rerun: a writer opened and finished with nothing new (should write 0 bytes),
  and `store.known()` / `store.index()` (every content hash: O(n));
- feature reads: `store.load()` where the features fit the memory allowance, and a streamed
  pass over chunks of 16k rows through one `store.snapshot()` (as streamed heads read), both after dropping the store's files from
  the page cache (posix_fadvise DONTNEED: our files only), plus the warm latency of one chunk;
- a logistic-regression head trained in a subprocess (peak RSS is its own ru_maxrss) on every
  row, held in memory or streamed from the store as `--max-memory` decides, for a capped number
  of L-BFGS iterations (time per pass over the data is the comparable figure).

The file-system part of a rerun is measured once on a few thousand real tiny PNG files
extracted with the `pixels` backbone: the rerun time per file, scaled to 10k images.

Prints a markdown table, writes `OUT/results.json` and a log-log plot (`--plot`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_scale_measure  # noqa: E402 - Meter reads the write counter main picks
from bench_scale_measure import Meter, available_memory, drop_from_page_cache, peak_rss, pick_write_counter  # noqa: E402
from bench_scale_report import ADD_ROWS, MB, fmt, median, report  # noqa: E402
from bench_scale_synthetic import CLASSES, SEED, centres, open_store, synthetic_rows  # noqa: E402

SEGMENT_ROWS = 50_000
COMMIT_ROWS = 16  # extraction's default batch size
CHUNK_ROWS = 16_384


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the steps ---------------------------------------------------------------------------------


def build(store, n: int, dim: int, centre: np.ndarray) -> dict:
    generate = write = 0.0
    written = 0
    for start in range(0, n, SEGMENT_ROWS):
        stop = min(n, start + SEGMENT_ROWS)
        t = time.perf_counter()
        hashes, features, paths = synthetic_rows(start, stop, dim, centre)
        generate += time.perf_counter() - t
        with Meter() as m:
            store.write_segment(f"{start:020d}-synthetic", hashes, features, paths)
        write += m.seconds
        written += m.written
        del features
    with Meter() as m:
        with store.writer() as writer:
            writer.finish()
    return {
        "generate_s": generate,
        "write_segments_s": write,
        "index_s": m.seconds,
        "bytes_written": written + m.written,
        "segments": -(-n // SEGMENT_ROWS),
    }


def add_rows(store, start: int, dim: int, centre: np.ndarray) -> dict:
    """ADD_ROWS new rows through the normal path: writer, commits of COMMIT_ROWS, finish."""
    hashes, features, paths = synthetic_rows(start, start + ADD_ROWS, dim, centre)
    before = {p.name for p in store.segment_files()}
    with Meter() as total:
        with Meter() as opening:
            context = store.writer()
            writer = context.__enter__()
        try:
            with Meter() as committing:
                for at in range(0, ADD_ROWS, COMMIT_ROWS):
                    writer.commit(
                        hashes[at : at + COMMIT_ROWS], features[at : at + COMMIT_ROWS], paths[at : at + COMMIT_ROWS]
                    )
            with Meter() as finishing:
                writer.finish()
        finally:
            context.__exit__(None, None, None)
    new = [p for p in store.segment_files() if p.name not in before]
    return {
        "seconds": total.seconds,
        "bytes_written": total.written,
        "open_s": opening.seconds,
        "open_bytes": opening.written,
        "commit_s": committing.seconds,
        "commit_bytes": committing.written,
        "finish_s": finishing.seconds,
        "finish_bytes": finishing.written,
        "new_segment_rows": [_rows_of(p) for p in new],
        "index_bytes": store.path.stat().st_size,
        "payload_bytes": ADD_ROWS * dim * 4,
    }


def _rows_of(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as handle:
        return int(handle["features"].shape[0])


def unchanged(store, repeats: int = 3) -> dict:
    runs = []
    for _ in range(repeats):
        with Meter() as m:
            with store.writer() as writer:
                changed = writer.finish()
        runs.append((m.seconds, m.written, changed))
    known = []
    for _ in range(repeats):
        t = time.perf_counter()
        hashes, _ = store.known()
        known.append(time.perf_counter() - t)
    t = time.perf_counter()
    store.index()
    index_s = time.perf_counter() - t
    return {
        "finish_s": median([r[0] for r in runs]),
        "finish_bytes": max(r[1] for r in runs),
        "changed": any(r[2] for r in runs),
        "known_s": median(known),
        "index_s": index_s,
        "rows": len(hashes),
    }


def reads(store, rows: int, dim: int, load_fraction: float) -> dict:
    out: dict = {"feature_bytes": rows * dim * 4}
    allowance = load_fraction * available_memory()
    if rows * dim * 4 * 1.2 <= allowance:
        drop_from_page_cache(store.files())
        t = time.perf_counter()
        loaded = store.load()
        seconds = time.perf_counter() - t
        assert loaded.features.shape == (rows, dim)
        del loaded
        out.update(load_s=seconds, load_MBps=rows * dim * 4 / MB / seconds, load_rows_per_s=rows / seconds)
    else:
        out["load_skipped"] = f"{rows * dim * 4 / 2**30:.1f} GiB > {load_fraction:.0%} of available memory"
    drop_from_page_cache(store.files())
    t = time.perf_counter()
    chunks = 0
    snapshot = store.snapshot()  # what a streamed head reads through: the layout is read once per pass
    for start in range(0, rows, CHUNK_ROWS):
        block = snapshot.read_rows_at(np.arange(start, min(rows, start + CHUNK_ROWS)))
        chunks += 1
    seconds = time.perf_counter() - t
    del block
    out.update(
        stream_s=seconds,
        stream_MBps=rows * dim * 4 / MB / seconds,
        stream_rows_per_s=rows / seconds,
        stream_chunks=chunks,
    )
    import h5py

    drop_from_page_cache(store.files())
    t = time.perf_counter()
    with h5py.File(store.path, "r") as handle:  # the same chunks straight from the index's virtual dataset
        dataset = handle["features"]
        for start in range(0, rows, CHUNK_ROWS):
            block = dataset[start : min(rows, start + CHUNK_ROWS)]
    seconds = time.perf_counter() - t
    del block
    out.update(raw_stream_s=seconds, raw_stream_MBps=rows * dim * 4 / MB / seconds)
    latency = []
    for _ in range(3):  # warm: the same chunk again, so this is the per-call overhead plus a memory copy
        t = time.perf_counter()
        snapshot.read_rows_at(np.arange(0, min(rows, CHUNK_ROWS)))
        latency.append(time.perf_counter() - t)
    out["chunk_warm_s"] = median(latency)
    return out


def head(cache: Path, rows: int, dim: int, max_memory: str, iters: int, kind: str = "logreg") -> dict:
    """Train a head in a subprocess on every row; its peak RSS is its own VmHWM."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--head-worker",
        str(cache),
        "--dim",
        str(dim),
        "--rows",
        str(rows),
        "--max-memory",
        max_memory,
        "--head-iters",
        str(iters),
        "--head",
        kind,
    ]
    t = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    wall = time.perf_counter() - t
    if done.returncode != 0:
        log(f"head worker failed:\n{done.stderr[-3000:]}")
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def head_worker(args) -> None:
    """In its own process: match rows (the store's index), plan memory, fit, report peak RSS."""
    warnings.filterwarnings("ignore")
    from bottleneck.learn.dataset import FeatureRows
    from bottleneck.learn.heads import make_head
    from bottleneck.learn.memory import parse_size, plan_memory

    store = open_store(Path(args.head_worker), args.dim)
    baseline = peak_rss()
    t = time.perf_counter()
    snapshot = store.snapshot()  # every row's hash, read once: it matches rows and then serves every chunk
    n = min(args.rows, snapshot.rows)
    index_s = time.perf_counter() - t
    y = np.array([f"c{i % CLASSES}" for i in range(n)])
    budget = parse_size(args.max_memory)
    params = {"max_iter": args.head_iters} if args.head == "logreg" else {"epochs": args.head_iters, "patience": 1000}
    model = make_head(args.head, random_state=SEED, **params)
    plan = plan_memory(n, args.dim, budget, 64 if args.head == "keras" else 0)
    rows = FeatureRows(store=snapshot, rows=np.arange(n), dim=args.dim, chunk_rows=plan.chunk_rows)
    t = time.perf_counter()
    if plan.streamed:
        read_s = 0.0
        model.fit_rows(rows, y, chunk_rows=plan.chunk_rows)
    else:
        X = rows.materialise()
        read_s = time.perf_counter() - t
        model.fit(X, y)
    fit_s = time.perf_counter() - t - read_s
    passes = getattr(model, "passes_", None)
    if passes is None and args.head == "logreg":
        passes = int(model.pipeline_[-1].n_iter_.max()) + 1  # in memory: about one evaluation per iteration, + scaler
    if passes is None and args.head == "keras":
        passes = len((model.history_ or {}).get("loss", [])) + (1 if plan.streamed else 0)
    sample = np.random.default_rng(SEED).choice(n, min(n, 2000), replace=False)
    sample.sort()
    accuracy = float(np.mean(model.predict(rows.take(sample)) == y[sample]))
    peak = peak_rss()
    print(
        json.dumps(
            {
                "rows": n,
                "mode": plan.mode,
                "chunk_rows": plan.chunk_rows,
                "max_memory_bytes": budget,
                "index_s": index_s,
                "read_s": read_s,
                "fit_s": fit_s,
                "passes": passes,
                "seconds_per_pass": (fit_s + read_s) / passes if passes else None,
                "converged": getattr(model, "converged_", None),
                "train_accuracy_sample": accuracy,
                "baseline_rss_bytes": baseline,
                "peak_rss_bytes": peak,
                "solver": getattr(model, "solver_", None),
            }
        )
    )


def file_system(work: Path, files: int, repeats: int = 3) -> dict:
    """A rerun over `files` tiny real PNGs already extracted (pixels backbone): seconds per file -> per 10k."""
    from PIL import Image

    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.features.extract import extract_features

    data, cache = work / "files" / "data", work / "files" / "cache"
    rng = np.random.default_rng(SEED)
    for i in range(files):
        folder = data / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{i:06d}.png"
        if not target.exists():
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(target)
    spec = BackboneSpec(architecture="pixels", image_size=8)
    t = time.perf_counter()
    first = extract_features(data, cache, spec)
    first_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        with Meter() as m:
            again = extract_features(data, cache, spec)
        assert again.computed == 0 and again.reused == files, (again.computed, again.reused)
        times.append((m.seconds, m.written))
    t = time.perf_counter()
    cli = subprocess.run(
        [
            str(Path(sys.executable).parent / "bottleneck"),
            "features",
            str(data),
            "--cache",
            str(cache),
            "--backbone",
            "pixels",
            "--image-size",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    cli_s = time.perf_counter() - t
    rerun = median([s for s, _ in times])
    return {
        "files": files,
        "first_extract_s": first_s,
        "computed": first.computed,
        "rerun_s": rerun,
        "rerun_bytes": max(w for _, w in times),
        "rerun_per_10k_s": rerun / files * 10_000,
        "cli_rerun_s": cli_s if cli.returncode == 0 else None,
    }


# ---- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="rows per synthetic store (comma-separated)")
    parser.add_argument("--dim", type=int, default=2048, help="features per row (float32); 2048 like InceptionV3")
    parser.add_argument("--quick", action="store_true", help="a smoke test: sizes 2000,20000 and 300 files")
    parser.add_argument("--files", type=int, default=3000, help="tiny real PNGs for the file-system part of a rerun")
    parser.add_argument("--adds", type=int, default=3, help="additions of 1,000 rows per size")
    parser.add_argument(
        "--max-memory", default="1G", help="the head's memory budget for features (train-head --max-memory)"
    )
    parser.add_argument("--head-iters", type=int, default=10, help="L-BFGS iterations (logreg) at most, so 1M finishes")
    parser.add_argument(
        "--head-iters-large",
        type=int,
        default=2,
        help="L-BFGS iterations at most above 200k rows (every pass reads the whole store)",
    )
    parser.add_argument(
        "--load-fraction",
        type=float,
        default=0.35,
        help="store.load() only where the features fit this share of the available memory",
    )
    parser.add_argument("--no-head", action="store_true", help="skip head training")
    parser.add_argument("--out", default="cache/bench-scale", help="results.json and the synthetic stores go here")
    parser.add_argument("--plot", default="docs/bench-scale.png", help="the PNG plot ('' for none)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    parser.add_argument(
        "--report",
        metavar="RESULTS_JSON",
        default=None,
        help="print the table and draw the plot of an earlier run's results.json, measuring nothing",
    )
    parser.add_argument("--head-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--head", default="logreg", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.head_worker:
        head_worker(args)
        return 0
    if args.report:
        results = json.loads(Path(args.report).read_text())
        report(results, Path(args.plot) if args.plot else None)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench_scale_measure.WRITE_COUNTER = pick_write_counter()
    sizes = [2000, 20000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    files = min(args.files, 300) if args.quick else args.files
    plot_path = Path(args.plot) if args.plot else None
    if args.quick and plot_path and args.plot == parser.get_default("plot"):
        plot_path = out / "bench-scale.png"  # a smoke test does not overwrite the README's plot
    work = out / "work"
    results = {
        "dim": args.dim,
        "sizes": [],
        "max_memory": args.max_memory,
        "head_iters": args.head_iters,
        "head_iters_large": args.head_iters_large,
        "write_counter": bench_scale_measure.WRITE_COUNTER,
        "chunk_rows": CHUNK_ROWS,
        "segment_rows": SEGMENT_ROWS,
        "commit_rows": COMMIT_ROWS,
        "add_rows": ADD_ROWS,
        "cpus": os.cpu_count(),
        "memory_available_at_start": available_memory(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    centre = centres(args.dim)

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2))

    try:
        log(f"file-system part: {files} tiny PNGs, pixels backbone")
        results["file_system"] = file_system(work, files)
        log(
            f"  rerun of {files} unchanged files: {results['file_system']['rerun_s']:.3f} s "
            f"({results['file_system']['rerun_per_10k_s']:.2f} s per 10k)"
        )
        save()
        for n in sizes:
            cache = work / f"n{n}"
            shutil.rmtree(cache, ignore_errors=True)
            store = open_store(cache, args.dim)
            entry: dict = {"rows": n}
            results["sizes"].append(entry)
            log(f"N={n:,}: building ({-(-n // SEGMENT_ROWS)} segments of up to {SEGMENT_ROWS:,} rows)")
            entry["build"] = build(store, n, args.dim, centre)
            log(
                f"  built in {entry['build']['write_segments_s'] + entry['build']['index_s']:.1f} s "
                f"(+{entry['build']['generate_s']:.1f} s making up features)"
            )
            entry["add"] = []
            for a in range(args.adds):
                entry["add"].append(add_rows(store, n + a * ADD_ROWS, args.dim, centre))
                last = entry["add"][-1]
                log(
                    f"  add {ADD_ROWS:,}: {last['seconds']:.2f} s, {last['bytes_written'] / MB:.1f} MB written "
                    f"(open {last['open_s']:.2f} s, commits {last['commit_s']:.2f} s, finish {last['finish_s']:.2f} s; "
                    f"new segment of {last['new_segment_rows']} rows)"
                )
            rows = n + args.adds * ADD_ROWS
            entry["unchanged"] = unchanged(store)
            assert entry["unchanged"]["rows"] == rows, (entry["unchanged"]["rows"], rows)
            log(
                f"  unchanged finish: {entry['unchanged']['finish_s']:.3f} s, {entry['unchanged']['finish_bytes']} bytes; "
                f"known() {entry['unchanged']['known_s']:.3f} s"
            )
            entry["store_bytes"] = sum(p.stat().st_size for p in store.files() if p.is_file())
            entry["reads"] = reads(store, rows, args.dim, args.load_fraction)
            rd = entry["reads"]
            log(
                f"  load: {fmt(rd.get('load_MBps'))} MB/s; streamed: {rd['stream_MBps']:.0f} MB/s in {rd['stream_chunks']} "
                f"chunks; one chunk warm {rd['chunk_warm_s'] * 1000:.0f} ms"
            )
            save()
            if not args.no_head:
                drop_from_page_cache(store.files())
                iters = args.head_iters if n <= 200_000 else args.head_iters_large
                log(f"  head: logreg, --max-memory {args.max_memory}, at most {iters} L-BFGS iterations")
                entry["head"] = head(cache, rows, args.dim, args.max_memory, iters)
                entry["head"]["max_iter"] = iters
                hd = entry["head"]
                if "error" not in hd:
                    log(
                        f"  head: {hd['mode']} ({hd['chunk_rows']} rows per chunk), {hd['fit_s'] + hd['read_s']:.1f} s, "
                        f"{hd['passes']} passes, peak RSS {hd['peak_rss_bytes'] / 2**20:.0f} MiB"
                    )
            save()
            if not args.keep:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        save()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(results, plot_path)
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
