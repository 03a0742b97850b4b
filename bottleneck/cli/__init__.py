"""The `bottleneck` command: a thin layer over the library, one module per command.

Errors from the library (`BottleneckError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from bottleneck import __version__
from bottleneck.cli import (
    audit,
    backbones,
    cache,
    compare,
    demo,
    dump,
    export,
    features,
    fine_tune,
    predict,
    pretrain,
    report,
    train_head,
)
from bottleneck.cli.common import EXIT_USAGE, stderr
from bottleneck.errors import INTERRUPTED, BottleneckError, DiskFullError, disk_full, is_disk_full
from bottleneck.text import one_line

DISK_WAS_FULL = threading.Event()

#: In the order `--help` lists them.
COMMANDS = (
    features,
    train_head,
    fine_tune,
    predict,
    export,
    dump,
    report,
    audit,
    pretrain,
    compare,
    cache,
    backbones,
    demo,
)


#: What an interrupted command keeps (commands that write one folder or file atomically keep nothing half-done).
KEPT_WHEN_INTERRUPTED = {
    "features": "committed batches are kept, run the same command again to resume",
    "predict": "features computed so far are cached, run the same command again to go on",
    "fine-tune": "finished epochs are kept, run the same command again to resume",
    "pretrain": "nothing was written",
}


_FORK_HOOK_REGISTERED = False


def _interrupt(signum, frame) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt


def _default_signals_in_child() -> None:
    """A forked child (a library's worker pool) must not raise our KeyboardInterrupt: its parent decides."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _catch_interrupts():
    """Ctrl-C and SIGTERM both stop a command the same way: KeyboardInterrupt, and a flag long loops check.

    Forked children get the default handlers back (`os.register_at_fork`), so a pool worker killed by its
    parent dies quietly instead of printing a KeyboardInterrupt traceback or dying with a lock held.
    """
    import signal

    global _FORK_HOOK_REGISTERED
    if not _FORK_HOOK_REGISTERED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_default_signals_in_child)
        _FORK_HOOK_REGISTERED = True
    INTERRUPTED.clear()
    DISK_WAS_FULL.clear()
    if threading.current_thread() is not threading.main_thread():
        return None
    return {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore(previous) -> None:
    import signal

    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)


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
    previous = _catch_interrupts()
    try:
        code = args.handler(args)
        if INTERRUPTED.is_set():  # a library swallowed the KeyboardInterrupt: still say so, and fail
            raise KeyboardInterrupt
        return code
    except BottleneckError as exc:
        if isinstance(exc, DiskFullError):
            DISK_WAS_FULL.set()
        stderr(f"bottleneck: error: {one_line(str(exc))}")  # one line, whatever file name it quotes
        return EXIT_USAGE
    except BrokenPipeError:  # `bottleneck predict ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        stderr(f"bottleneck: interrupted; {KEPT_WHEN_INTERRUPTED.get(args.command, 'nothing was written')}")
        return 130
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        DISK_WAS_FULL.set()
        stderr(f"bottleneck: error: {disk_full(Path(exc.filename).parent if exc.filename else Path.cwd())}")
        return EXIT_USAGE
    finally:
        _restore(previous)


def console() -> None:
    """The `bottleneck` console script: `main`, then exit; after a full disk, without HDF5's clean-up.

    A file HDF5 could not flush stays open inside the library, and its clean-up at interpreter exit
    would crash on it (a segmentation fault after our one line); what was committed is on disk already.
    """
    code = main()
    if DISK_WAS_FULL.is_set():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
