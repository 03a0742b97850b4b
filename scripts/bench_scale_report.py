"""What `make bench-scale` shows of its results.json: the markdown table, the log-log plot and the printed
report, with the units and the row count of an addition they are labelled with (`bench_scale.py` measures)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

ADD_ROWS = 1_000
MB = 1e6


def median(values):
    return float(statistics.median(values))


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
