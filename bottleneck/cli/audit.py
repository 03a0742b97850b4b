"""`bottleneck audit --data DATA --cache CACHE --out DIR`: leakage, label issues and outliers, from the cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bottleneck import bounds
from bottleneck.cli.common import (
    Bounded,
    add_backbone_arguments,
    add_layout_argument,
    add_split_arguments,
    columns_of,
    data_or_labels,
    memory_budget,
    one_line_each,
    spec_from,
    stderr,
)

_SHOWN = 5


def _print_summary(result, files: dict, out) -> None:
    counts = result.counts()
    kinds = "labels (multi-label)" if result.multi_label else "classes"
    labelled = f"in {len(result.classes)} {kinds}" if result.classes else "(no labels)"
    out(
        f"audited {result.images} images {labelled} from the cache ({sum(result.seconds.values()):.1f} s) -> "
        f"{files['html']}"
    )
    for note in result.notes:
        out(f"  WARNING: {note}" if note.startswith("RANDOM") else f"  note: {note}")
    out(
        f"  leakage {counts['leakage']} (near-duplicates or copies in two splits), near-duplicates "
        f"{counts['near_duplicates']}, exact duplicates {counts['exact_duplicates']}, label issues "
        f"{counts['label_issues']}, outliers {counts['outliers']}, failed extraction {counts['failed_extraction']}"
    )
    for pair in result.leakage[:_SHOWN]:
        out(
            f"    leak: {pair['a']} ({pair['splits'][0]}) ~ {pair['b']} ({pair['splits'][1]}), distance {pair['distance']:.4f}"
        )
    if result.label_model:
        out(f"  {'WARNING: ' if not result.label_model['trusted'] else ''}{result.model_line()}")
    for issue in result.label_issues[:_SHOWN]:
        out(
            f"    label: {issue['path']}: given {issue['given']!r}, looks like {issue['suggested']!r} ({issue['score']:.2f})"
        )
    for outlier in result.outliers[:_SHOWN]:
        out(
            f"    outlier: {outlier['path']} ("
            + (f"{outlier['label']}, " if outlier["label"] else "")
            + f"{outlier['score']:.3f})"
        )
    if "decoder_warnings" in files:
        out(f"  thumbnails: decoder warnings logged to {files['decoder_warnings']}")
    removals = sum(len(paths) for paths in result.suggested_removals().values())
    listed = (
        "leaked training copies, far-out outliers and label issues"
        if result.exclude_label_issues
        else "leaked training copies and far-out outliers; label issues only with --exclude-label-issues"
    )
    out(
        f"  {removals} suggested removals in {files['exclude']} ({listed}): review it, then train-head --exclude "
        f"{files['exclude']}"
    )


def run(args: argparse.Namespace) -> int:
    """Audit the images under DATA from their cached features; write audit.html, audit.json, exclude.txt."""
    data_or_labels(args)
    from bottleneck.inspect.audit import AuditConfig, run_audit
    from bottleneck.inspect.audit_page import write_audit

    max_memory = memory_budget(args.max_memory)
    config = AuditConfig(
        seed=args.seed,
        val_pct=args.val_pct,
        test_pct=args.test_pct,
        split_file=args.split_file,
        layout=args.layout,
        labels=args.labels,
        columns=columns_of(args),
        duplicate_factor=args.duplicate_threshold,
        neighbours=args.neighbours,
        folds=args.folds,
        exclude_label_issues=args.exclude_label_issues,
    )
    result = run_audit(
        args.data,
        args.cache,
        spec_from(args),
        config,
        log=stderr,
        max_memory=max_memory,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    files = write_audit(result, args.data if args.data is not None else Path(args.labels).absolute().parent, args.out)
    _print_summary(result, files, one_line_each(stderr if args.json else print))
    if args.json:
        record = result.as_json()
        record["files"] = {name: str(path) for name, path in files.items()}
        print(json.dumps(record))
    return 0


def add_parser(commands) -> None:
    from bottleneck.inspect.audit import DUPLICATE_FACTOR, FOLDS, NEIGHBOURS, TRUSTED_ACCURACY

    parser = commands.add_parser(
        "audit",
        help="find leakage, near-duplicates, label issues and outliers from the feature cache",
        description="Audit the images under DATA from their cached features alone (run `features` first): "
        "near-duplicates and the leakage they cause across the train-head split, byte-identical files, "
        "images that look like another class (confident learning, cleanlab) and images far from every "
        "class. Writes OUT/audit.html (thumbnails), OUT/audit.json and OUT/exclude.txt.",
        epilog="example: bottleneck audit --data data/flowers --cache cache --out audit && "
        "bottleneck train-head --data data/flowers --cache cache --exclude audit/exclude.txt",
    )
    parser.add_argument(
        "--data", default=None, help="the image folder the features were extracted from (optional with --labels)"
    )
    add_layout_argument(parser)
    parser.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    parser.add_argument(
        "--out", default="audit", help="folder for audit.html, audit.json, exclude.txt (default: ./audit)"
    )
    add_backbone_arguments(parser, optional=True)
    add_split_arguments(parser, "split (as train-head draws it, to find leakage)")
    audit = parser.add_argument_group("thresholds")
    audit.add_argument(
        "--duplicate-threshold",
        type=Bounded(bounds.DUPLICATE_THRESHOLD),
        default=DUPLICATE_FACTOR,
        metavar="FACTOR",
        help="near-duplicates: closer than FACTOR x the median nearest-neighbour "
        f"distance, %(type)s (default: {DUPLICATE_FACTOR}, cleanlab's)",
    )
    audit.add_argument(
        "--neighbours",
        type=Bounded(bounds.NEIGHBOURS),
        default=NEIGHBOURS,
        help=f"neighbours per image for outliers, %(type)s (default: {NEIGHBOURS})",
    )
    audit.add_argument(
        "--folds",
        type=Bounded(bounds.AUDIT_FOLDS),
        default=FOLDS,
        help=f"cross-validation folds for label issues, %(type)s (default: {FOLDS}, fewer when a class is small)",
    )
    parser.add_argument(
        "--exclude-label-issues",
        action="store_true",
        help="list the label issues in exclude.txt too (by default it lists leaked training copies "
        "and far-out outliers: label issues are often hard but correct images, more so when the "
        f"cross-validated model is weak, under {TRUSTED_ACCURACY} accuracy)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory for reading features (default: a quarter of the available memory); larger stores "
        "are read in chunks",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (near_duplicates, label_issues, outliers, counts, ...) as the last "
        "line of stdout (the summary goes to stderr)",
    )
    parser.set_defaults(handler=run)
