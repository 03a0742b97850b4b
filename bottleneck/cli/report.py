"""`bottleneck report`: the HTML report over a runs folder, tables also as Markdown."""

from __future__ import annotations

import argparse

from bottleneck.cli.common import stderr


def run(args: argparse.Namespace) -> int:
    """Write the HTML report of a runs folder; print its tables as Markdown."""
    from bottleneck.inspect.report import write_report

    path, markdown = write_report(args.runs, args.out, log=stderr)
    print(markdown, end="")
    stderr(f"report -> {path}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "report",
        help="write an HTML report comparing runs (tables also printed as Markdown)",
        description="Write one self-contained HTML page over every run in RUNS: a comparison table, and per "
        "run the confusion matrix, per-class metrics, calibration (and ROC / precision-recall for two classes), "
        "learning curve, an embedding map of its images and its misclassified test images beside their nearest "
        "training images.",
        epilog="example: bottleneck report --runs runs --out runs/report.html",
    )
    parser.add_argument("--runs", default="runs", help="folder of run folders (default: ./runs)")
    parser.add_argument("--out", default=None, help="HTML file to write (default: RUNS/report.html)")
    parser.set_defaults(handler=run)
