"""`bottleneck demo`: the whole transfer-learning story on scikit-learn's digits, offline."""

from __future__ import annotations

import argparse
import json

from bottleneck import bounds
from bottleneck.cli.common import EPOCHS, Bounded, stderr


def run(args: argparse.Namespace) -> int:
    """The whole transfer-learning story on scikit-learn's digits, offline."""
    from bottleneck.demo import DemoConfig, demo_summary, run_demo
    from bottleneck.inspect.report import markdown_table

    config = DemoConfig(labelled_per_class=args.labelled, pretrain_epochs=args.pretrain_epochs)
    result = run_demo(args.work, args.cache, config, log=stderr)
    summary = demo_summary(result, config)
    out = stderr if args.json else print
    out("")
    out(markdown_table(summary["rows"]))
    for note in summary["notes"]:
        out(note)
    out(
        f"report -> {result.report}   ({result.seconds:.0f} s; features computed this time: {sum(result.computed.values())})"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "rows": result.rows,
                    "winner": result.winner,
                    "negative_transfer": result.negative_transfer,
                    "transfer_margin": result.transfer_margin,
                    "domain": result.domain,
                    "computed": result.computed,
                    "seconds": result.seconds,
                    "report": str(result.report),
                }
            )
        )
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="run the transfer-learning demo on scikit-learn's digits (offline)",
        description="Pretrain a small base on digits 0-4, learn digits 5-9 from a few labelled images, and compare "
        "transferred features, raw pixels, random-weights features and training from scratch.",
        epilog="example: bottleneck demo --work cache/demo --cache cache",
    )
    parser.add_argument(
        "--work", default="cache/demo", help="folder for the digits, models and runs (default: cache/demo)"
    )
    parser.add_argument("--cache", default="cache", help="feature cache folder (default: ./cache)")
    parser.add_argument(
        "--labelled",
        type=Bounded(bounds.LABELLED),
        default=10,
        help="labelled target images per class, %(type)s (default: 10)",
    )
    parser.add_argument(
        "--pretrain-epochs", type=EPOCHS, default=20, help="epochs to pretrain the base, %(type)s (default: 20)"
    )
    parser.add_argument("--json", action="store_true", help="print the comparison as one JSON object on the last line")
    parser.set_defaults(handler=run)
