"""The `bottleneck` command: a thin layer over the library, one module per command.

Errors from the library (`BottleneckError`) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from bottleneck import __version__
from bottleneck.cli import backbones, cache, compare, demo, export, features, fine_tune, predict, pretrain, report, train_head
from bottleneck.cli.common import EXIT_USAGE, stderr
from bottleneck.errors import BottleneckError

#: In the order `--help` lists them.
COMMANDS = (features, train_head, fine_tune, predict, export, report, pretrain, compare, cache, backbones, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bottleneck",
        description="Transfer learning from a folder of labelled images, through a content-keyed feature cache.",
    )
    parser.add_argument("--version", action="version", version=f"bottleneck {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bottleneck` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except BottleneckError as exc:
        stderr(f"bottleneck: error: {exc}")
        return EXIT_USAGE
    except BrokenPipeError:  # `bottleneck predict ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        stderr("bottleneck: interrupted; committed batches are kept, run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
