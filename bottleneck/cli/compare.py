"""`bottleneck compare A B`: how far apart two image sets are in the cached feature space."""

from __future__ import annotations

import argparse
import json
import sys

from bottleneck import bounds
from bottleneck.cli.common import Bounded, add_backbone_arguments, spec_from, stderr


def run(args: argparse.Namespace) -> int:
    """How far apart two image sets are in the cached feature space."""
    from bottleneck.features.engines.local import make_bar
    from bottleneck.learn.dataset import load_labelled_features
    from bottleneck.learn.domain import compare_features

    spec = spec_from(args)
    a = load_labelled_features(args.data_a, args.cache, spec, log=stderr, need_labels=False, layout=args.layout)
    b = load_labelled_features(args.data_b, args.cache, spec, log=stderr, need_labels=False, layout=args.layout)
    bar = make_bar(
        args.permutations,
        not args.no_progress and sys.stderr.isatty(),
        unit="perm",
        desc="compare: MMD permutation test",
    )
    try:
        result = compare_features(a.features, b.features, permutations=args.permutations, tick=bar.update)
    finally:
        bar.close()
    out = stderr if args.json else print
    out(
        f"{args.data_a} ({result['images_a']} images) vs {args.data_b} ({result['images_b']} images) in {a.store_path.name}:"
    )
    out(f"  Frechet distance {result['frechet_distance']:.4f}")
    out(
        f"  MMD^2 {result['mmd2']:.5f}, permutation p-value {result['mmd_p_value']:.4f} ({result['permutations']} permutations)"
    )
    if args.json:
        print(json.dumps(result))
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "compare",
        help="measure how far apart two image sets are in the cached feature space",
        description="Frechet distance between Gaussian fits and a kernel MMD with a permutation p-value, "
        "from cached features only (run `features` on both folders first).",
        epilog="example: bottleneck compare data/source data/target --cache cache --backbone base.keras --layer features",
    )
    parser.add_argument("data_a", metavar="DATA_A")
    parser.add_argument("data_b", metavar="DATA_B")
    parser.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    parser.add_argument(
        "--layout",
        choices=("auto", "classes", "plain"),
        default="auto",
        help="how each folder is laid out; plain: every image under it, labels unused (default: auto)",
    )
    add_backbone_arguments(parser, optional=True)
    parser.add_argument(
        "--permutations",
        type=Bounded(bounds.PERMUTATIONS),
        default=200,
        help="permutations for the p-value, %(type)s (default: 200)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (over the permutations)")
    parser.set_defaults(handler=run)
