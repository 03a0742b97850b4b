"""`bottleneck predict --run RUN PATH...`: top labels of new images, with the run's exact backbone and head."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from bottleneck import bounds
from bottleneck.cli.common import (
    BATCH_SIZE_OR_AUTO,
    LOCK_TIMEOUT,
    WORKERS,
    Bounded,
    add_backend_arguments,
    select_backend,
    stderr,
)
from bottleneck.text import one_line


def _table(predictions) -> str:
    paths = [one_line(p.path) for p in predictions]  # a name holding a newline stays on its row
    width = min(60, max((len(path) for path in paths), default=4))
    lines = []
    for p, path in zip(predictions, paths):
        shown = path if len(path) <= width else "..." + path[-(width - 3) :]
        if p.error is not None:
            lines.append(f"{shown:<{width}}  error: {p.error}")
        elif p.labels is not None:
            lines.append(
                f"{shown:<{width}}  "
                + (
                    "  ".join(f"{label} {probability:.4f}" for label, probability in p.labels)
                    or f"(no label over its threshold; most probable: {p.top[0][0]} {p.top[0][1]:.4f})"
                )
            )
        else:
            lines.append(
                f"{shown:<{width}}  " + "  ".join(f"{label} {probability:.4f}" for label, probability in p.top)
            )
    return "\n".join(lines)


def _check_csv_target(path: str) -> None:
    """One line before any work when `--csv` cannot be written: a folder, a missing folder, no permission."""
    from bottleneck.errors import DataError

    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise DataError(f"--csv {path} is a folder; give the name of a file to write")
    if not folder.is_dir():
        raise DataError(f"--csv {path}: the folder {folder} does not exist")
    if not os.access(target if target.exists() else folder, os.W_OK):  # also false on a read-only file system
        raise DataError(f"--csv {path} cannot be written (no permission, or a read-only file system)")


def _check_paths(paths: list[str]) -> None:
    """One line at once, before the run or a backend is loaded, when no path given exists (a file, a folder, a
    shard member `x.tar/name` or a pattern of shards); a missing path among others gets its own reason later."""
    from bottleneck.errors import DataError
    from bottleneck.features.shards import SUFFIXES, is_pattern

    def may_exist(given: str) -> bool:
        if os.path.lexists(given) or is_pattern(given):
            return True
        text = given.lower()  # a shard member: a shard file somewhere before the member's name
        return any(
            os.path.isfile(given[: at + len(suffix)])
            for suffix in SUFFIXES
            for at in range(len(text))
            if text.startswith(suffix + "/", at)
        )

    if any(may_exist(given) for given in paths):
        return
    if len(paths) == 1:
        raise DataError(f"no such file or folder: {paths[0]}")
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    raise DataError(f"none of the {len(paths)} paths given exists: {shown}")


def _write_csv(path: str, predictions, top: int, labels: list[str], multi_label: bool = False) -> None:
    """path, error, the top labels (`label_1`.., at most one per class) and a `probability_<class>` column per
    class, as in the run's test_predictions.csv; a multi-label run: path, error, the labels given (`a;b`) and a
    probability column per label. Every row has every column (empty for a file that failed)."""
    from bottleneck.errors import DataError
    from bottleneck.features.label_file import joined_labels
    from bottleneck.learn.run_folder import PROBABILITY_PREFIX

    ranks = [] if multi_label else [f"label_{k + 1}" for k in range(min(top, len(labels)))]
    try:
        with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "path",
                    "error",
                    *(["labels"] if multi_label else ranks),
                    *(PROBABILITY_PREFIX + label for label in labels),
                ]
            )
            for p in predictions:
                probability = p.probabilities or dict(p.top)
                if multi_label:
                    named = [
                        joined_labels(tuple(sorted(label for label, _ in p.labels or ()))) if p.error is None else ""
                    ]
                else:
                    named = [label for label, _ in p.top[: len(ranks)]]
                    named += [""] * (len(ranks) - len(named))
                cells = [*named, *(repr(probability[label]) if label in probability else "" for label in labels)]
                writer.writerow([p.path, p.error or "", *cells])
    except OSError as exc:  # a full disk (or /dev/full) shows only when the rows are flushed
        raise DataError(f"cannot write --csv {path}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    """Predict the labels of images (files or folders, recursively) with a trained run."""
    from bottleneck.features.extract import ExtractOptions
    from bottleneck.learn.run_folder import load_run
    from bottleneck.use.predict import predict_images

    _check_paths(args.paths)
    if args.csv:
        _check_csv_target(args.csv)
    select_backend(args)
    options = ExtractOptions(
        batch_size=args.batch_size,
        workers=args.workers,
        lock_timeout=args.lock_timeout,
        progress=not args.no_progress and sys.stderr.isatty(),
        runtime=args.runtime,
        backend=args.backend,
    )
    loaded = load_run(args.run, args.cache)
    select_backend(args, loaded.spec)
    result = predict_images(loaded, args.paths, args.top, options, log=stderr, tta=args.tta)
    if args.csv:
        _write_csv(args.csv, result.predictions, args.top, loaded.labels, loaded.multi_label)
    if args.json:
        for prediction in result.predictions:
            print(json.dumps(prediction.as_json()))
    elif not args.csv:
        print(_table(result.predictions))
    stderr(
        f"predicted {len(result.predictions) - result.failed} of {len(result.predictions)} images with run "
        f"{loaded.run_id} (computed {result.computed}"
        + (f" features and {result.views_computed} augmented views" if args.tta is not None else "")
        + f", from the cache {result.reused}, failed {result.failed}) "
        f"in {result.seconds:.1f} s ({result.images_per_second:.1f} images/s)"
        + (
            f"; skipped {sum(result.skipped.values())} files in the folders given ("
            + ", ".join(f"{reason} {count}" for reason, count in sorted(result.skipped.items()))
            + ")"
            if result.skipped
            else ""
        )
        + (f"; wrote {args.csv}" if args.csv else "")
    )
    return 0


def add_parser(commands) -> None:
    from bottleneck.features.extract import DEFAULT_BATCH_SIZE

    parser = commands.add_parser(
        "predict",
        help="predict the labels of new images with a trained run",
        description="Top-k labels with probabilities for every image under PATH (files, or folders searched "
        "recursively), with exactly the decoding, backbone and head of the run; a multi-label run gives every label "
        'over its threshold (--json: "labels": [...], and every label\'s probability). Cached features are reused; '
        "the rest are computed like `features` does, and cached. A file that cannot be read gets its reason.",
        epilog="example: bottleneck predict --run runs/20260101-120000-logreg-ab12 photos/ --top 3 --json",
    )
    parser.add_argument("paths", metavar="PATH", nargs="+", help="image files or folders")
    parser.add_argument("--run", required=True, help="a run folder written by train-head or fine-tune")
    parser.add_argument(
        "--top", type=Bounded(bounds.TOP), default=3, help="labels shown per image, %(type)s (default: 3)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per image per line on stdout")
    parser.add_argument("--csv", default=None, metavar="FILE", help="write the predictions to a CSV file")
    parser.add_argument(
        "--cache", default=None, help="feature cache folder (default: the one the run was trained from)"
    )
    parser.add_argument(
        "--batch-size",
        type=BATCH_SIZE_OR_AUTO,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per backbone call, %(type)s (default: {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--workers", type=WORKERS, default=None, help="decoding threads, %(type)s (default: one per CPU core)"
    )
    parser.add_argument(
        "--lock-timeout",
        type=LOCK_TIMEOUT,
        default=None,
        metavar="SECONDS",
        help="wait at most this long for another run writing the same store, %(type)s (default: no limit)",
    )
    parser.add_argument(
        "--tta",
        type=Bounded(bounds.VIEWS),
        nargs="?",
        const=0,
        default=None,
        metavar="N",
        help="test-time augmentation: average the probabilities over each image and N augmented views "
        "(cached like features), %(type)s (default N: as many as the run trained on, else 4)",
    )
    add_backend_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)
