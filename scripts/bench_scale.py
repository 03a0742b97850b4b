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
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FINGERPRINT = "synthetic-bench-scale"
CLASSES = 10
SEGMENT_ROWS = 50_000
ADD_ROWS = 1_000
COMMIT_ROWS = 16  # extraction's default batch size
CHUNK_ROWS = 16_384
SEED = 0
MB = 1e6


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- measuring ---------------------------------------------------------------------------------


def io_counters() -> dict[str, int]:
    try:
        with open("/proc/self/io", encoding="ascii") as handle:
            return {k: int(v) for k, v in (line.split(": ") for line in handle.read().splitlines() if line)}
    except OSError:
        return {}


WRITE_COUNTER = "write_bytes"


def pick_write_counter() -> str:
    """write_bytes when this kernel accounts it (it counts what reaches the disk), else wchar."""
    probe = Path(f".bench-scale-io-{os.getpid()}")
    before = io_counters()
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        probe.unlink(missing_ok=True)
    after = io_counters()
    if after.get("write_bytes", 0) - before.get("write_bytes", 0) > 0:
        return "write_bytes"
    return "wchar"


class Meter:
    """Wall time and bytes written by this process inside a `with` block."""

    def __enter__(self) -> Meter:
        self._io = io_counters()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t
        self.written = io_counters().get(WRITE_COUNTER, 0) - self._io.get(WRITE_COUNTER, 0)


def median(values):
    return float(statistics.median(values))


def available_memory() -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM): unlike ru_maxrss, not inherited from the parent across exec."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_from_page_cache(paths) -> None:
    """Evict these files' (clean) pages, so the next read comes from the disk; other files are untouched."""
    for path in paths:
        if not Path(path).is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- synthetic rows ----------------------------------------------------------------------------


def centres(dim: int) -> np.ndarray:
    return (np.random.default_rng(SEED).standard_normal((CLASSES, dim)) * 0.1).astype(np.float32)


def synthetic_rows(start: int, stop: int, dim: int, centre: np.ndarray):
    """Hashes, features and paths of rows start..stop-1 (the same for every run: seeded by `start`)."""
    rng = np.random.default_rng([SEED, start])
    numbers = np.arange(start, stop)
    features = rng.standard_normal((stop - start, dim), dtype=np.float32)
    features += centre[numbers % CLASSES]
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in numbers]
    paths = [f"synthetic/c{i % CLASSES}/{i:08d}.png" for i in numbers]
    return hashes, features, paths


def open_store(cache: Path, dim: int):
    from bottleneck.features.store import FeatureStore

    attrs = {
        "architecture": "synthetic",
        "feature_dim": dim,
        "pretrained": True,
        "warning": "",
        "input_size": 0,
        "pooling": "avg",
        "layer": "",
        "preprocessing": "none",
    }
    return FeatureStore(cache, FINGERPRINT, dim, attrs, dtype="float32")


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


# ---- report ------------------------------------------------------------------------------------


def fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def table(results: dict) -> str:
    fs = results.get("file_system") or {}
    lines = [
        "| rows | store | add 1,000: s (open / commits / finish) | add 1,000: MB written | unchanged finish: s / bytes | known(): s "
        "| rerun per 10k images: s | load(): MB/s | snapshot, 16k chunks: MB/s | same chunks, h5py: MB/s | one chunk: ms "
        "| head (logreg) | s per pass | peak RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for entry in results["sizes"]:
        n = entry["rows"]
        adds = entry.get("add", [])
        rerun = entry.get("unchanged", {})
        rd = entry.get("reads", {})
        hd = entry.get("head", {})
        per_10k = None
        if fs and rerun:
            per_10k = fs["rerun_per_10k_s"] + rerun["finish_s"] * 10_000 / n
        head_cell = "–"
        if hd and "error" not in hd:
            head_cell = f"{hd['mode']}, {hd['passes']} passes, {fmt(hd['fit_s'] + hd['read_s'])} s"
        elif hd:
            head_cell = "failed"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{n:,}",
                    f"{entry['store_bytes'] / 2**30:.2f} GiB",
                    (
                        f"{fmt(median([a['seconds'] for a in adds]))} ({fmt(median([a['open_s'] for a in adds]), 2)} / "
                        f"{fmt(median([a['commit_s'] for a in adds]), 2)} / {fmt(median([a['finish_s'] for a in adds]), 2)})"
                    )
                    if adds
                    else "–",
                    fmt(statistics.mean(a["bytes_written"] for a in adds) / MB) if adds else "–",
                    f"{fmt(rerun.get('finish_s'))} / {rerun.get('finish_bytes', '–')}" if rerun else "–",
                    fmt(rerun.get("known_s")),
                    fmt(per_10k),
                    fmt(rd.get("load_MBps")) if "load_MBps" in rd else ("skipped" if rd else "–"),
                    fmt(rd.get("stream_MBps")),
                    fmt(rd.get("raw_stream_MBps")),
                    fmt(rd["chunk_warm_s"] * 1000) if "chunk_warm_s" in rd else "–",
                    head_cell,
                    fmt(hd.get("seconds_per_pass")),
                    f"{hd['peak_rss_bytes'] / 2**20:,.0f} MiB" if "peak_rss_bytes" in hd else "–",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot(results: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [e for e in results["sizes"] if e.get("add")]
    if not sizes:
        return
    n = np.array([e["rows"] for e in sizes], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))

    def series(axis, values, label, style):
        pairs = [(x, v) for x, v in zip(n, values) if v is not None and v > 0]
        if pairs:
            axis.plot(*zip(*pairs), style, label=label)

    series(left, [median([a["seconds"] for a in e["add"]]) for e in sizes], "add 1,000 rows", "o-")
    series(left, [e["unchanged"]["finish_s"] for e in sizes], "unchanged finish (no-op)", "s-")
    series(left, [e["unchanged"]["known_s"] for e in sizes], "known(): every hash", "^-")
    series(left, [e["reads"].get("load_s") for e in sizes], "load() every row", "v-")
    series(left, [e["reads"].get("stream_s") for e in sizes], "snapshot pass, 16k chunks", "D-")
    series(left, [e["reads"].get("raw_stream_s") for e in sizes], "same chunks, h5py on the index", "d--")
    series(left, [e["reads"].get("chunk_warm_s") for e in sizes], "one 16k chunk (warm)", "x--")
    series(
        left, [e.get("head", {}).get("seconds_per_pass") for e in sizes], "logreg head: one pass over the rows", "P-"
    )
    lo, hi = left.get_ylim()
    anchor = min(v for v in [e["reads"].get("stream_s") or e["unchanged"]["known_s"] for e in sizes])
    left.plot(n, anchor * n / n[0], ":", color="grey", label="O(n) reference")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="rows in the store",
        ylabel="seconds",
        title=f"Time vs store size ({results['dim']} float32 features)",
    )
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)

    series(
        right,
        [statistics.mean(a["bytes_written"] for a in e["add"]) / MB for e in sizes],
        "written to add 1,000 rows",
        "o-",
    )
    series(right, [e["store_bytes"] / MB for e in sizes], "store size on disk", "s-")
    series(right, [e.get("head", {}).get("peak_rss_bytes", 0) / MB for e in sizes], "head training: peak RSS", "P-")
    payload = ADD_ROWS * results["dim"] * 4 / MB
    right.plot(n, [payload] * len(n), ":", color="grey", label="1,000 rows of features (O(new))")
    right.plot(n, sizes[0]["store_bytes"] / MB * n / n[0], "--", color="lightgrey", label="O(n) reference")
    right.set(
        xscale="log",
        yscale="log",
        xlabel="rows in the store",
        ylabel="MB",
        title=f"Bytes vs store size (head --max-memory {results['max_memory']})",
    )
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)


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
    global WRITE_COUNTER
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    WRITE_COUNTER = pick_write_counter()
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
        "write_counter": WRITE_COUNTER,
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


def report(results: dict, plot_path: Path | None) -> None:
    print(
        f"\nStore growth, {results['dim']} float32 features per row; bytes counted by /proc/self/io "
        f"{results['write_counter']}.\n"
    )
    print(table(results))
    fs = results.get("file_system")
    if fs:
        print(
            f"\nFile-system part of a rerun: {fs['files']} unchanged tiny PNGs in {fs['rerun_s']:.3f} s "
            f"= {fs['rerun_per_10k_s']:.2f} s per 10k images (in process; the CLI, start-up included: "
            f"{fmt(fs['cli_rerun_s'])} s)."
        )
    if plot_path:
        plot(results, plot_path)
        print(f"plot: {plot_path}")


if __name__ == "__main__":
    sys.exit(main())
