"""`bottleneck dump --data DATA --cache CACHE --out FILE.parquet|FILE.npz`: the cache joined to its labels, for
other tools."""

from __future__ import annotations

import argparse
import json

from bottleneck.cli.common import (
    add_backbone_arguments,
    add_layout_argument,
    add_split_arguments,
    columns_of,
    data_or_labels,
    memory_budget,
    spec_from,
    stderr,
)


def run(args: argparse.Namespace) -> int:
    """Write the cached features of DATA with path, label, split and content hash to one Parquet or npz file."""
    data_or_labels(args)
    from bottleneck.learn.splits import SplitConfig
    from bottleneck.use.dump import checked_out, dump_features

    checked_out(args.out)  # a bad --out and a bad size fail before any work
    max_memory = memory_budget(args.max_memory)
    split = SplitConfig(val_pct=args.val_pct, test_pct=args.test_pct, seed=args.seed)
    result = dump_features(
        args.data,
        args.cache,
        args.out,
        spec_from(args),
        split,
        args.split_file,
        log=stderr,
        max_memory=max_memory,
        layout=args.layout,
        labels=args.labels,
        columns=columns_of(args),
    )
    out = stderr if args.json else print
    groups = f", {result.row_groups} row group{'s' if result.row_groups > 1 else ''}" if result.row_groups else ""
    streamed = ", streamed from the store" if result.streamed else ""
    out(
        f"{result.rows} rows ({', '.join(result.columns)}: {result.feature_dim} floats) -> {result.out}"
        f"  ({result.seconds:.1f} s{groups}{streamed})"
    )
    if args.json:
        print(json.dumps(result.summary()))
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "dump",
        help="write cached features with path, label, split and content hash to Parquet or npz",
        description="Write one row per image of DATA with features in the cache: path (relative to DATA, as in "
        "split.csv), label (multi-label: labels), split (the one train-head draws with the same flags; none for "
        "unlabelled images), content_hash and features, for pandas, DuckDB, Spark or R. The suffix of --out picks "
        "the format; Parquet is written in row groups streamed from the store, npz needs the features in memory.",
        epilog="example: bottleneck dump --data data/flowers --cache cache --out flowers.parquet && "
        "duckdb -c \"select label, count(*) from 'flowers.parquet' group by label\"",
    )
    parser.add_argument(
        "--data", default=None, help="the image folder the features were extracted from (optional with --labels)"
    )
    parser.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="FILE.parquet or FILE.npz to write (replaced if it is a regular file)",
    )
    add_layout_argument(parser)
    add_backbone_arguments(parser, optional=True)
    add_split_arguments(parser, "split (as train-head draws it)")
    parser.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory for features, e.g. 512M or 2G (default: a quarter of the available memory); "
        "larger feature sets are streamed into Parquet row groups (npz is refused)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print {rows, columns, out, seconds, ...} as the last line of stdout (the summary goes to stderr)",
    )
    parser.set_defaults(handler=run)
