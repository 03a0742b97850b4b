"""The `bottleneck` command: a thin layer over the library. Errors become one line and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from . import __version__
from .errors import BottleneckError, StrictModeError

EXIT_USAGE = 2
_FAILURES_SHOWN = 10


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that pick a backbone, shared by every command that reads or writes a store."""
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", default="inception_v3", help="architecture (default: inception_v3)")
    group.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (Keras downloads them once), 'none' (random, for tests), or a path to a "
        "no-top Keras weights file (.h5 or .weights.h5) (default: imagenet)",
    )
    group.add_argument("--image-size", type=_positive_int, default=None, metavar="N",
                       help="square input size in pixels (default: the backbone's, 299; at least 75)")


def _spec_from(args: argparse.Namespace):
    from .backbone import BackboneSpec

    return BackboneSpec(architecture=args.backbone, weights=args.weights, image_size=args.image_size)


def _summarise_features(result, out: Callable[[str], None]) -> None:
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(result.skipped.items()))
    out(f"{result.images} images in {len(result.classes)} classes -> {result.store}")
    out(
        f"  computed {result.computed}, reused {result.reused}, failed {result.failed}"
        + (f", skipped {sum(result.skipped.values())} ({skipped})" if skipped else "")
        + f" in {result.seconds:.1f} s ({result.images_per_second:.1f} images/s)"
    )
    if not result.pretrained:
        from .backbone import RANDOM_WEIGHTS_WARNING

        out(f"  WARNING: {RANDOM_WEIGHTS_WARNING}")
    if result.failures:
        out("  failed:")
        from .store import printable

        for failure in result.failures[:_FAILURES_SHOWN]:
            out(f"    {printable(failure.path)}: {failure.reason}")
        if len(result.failures) > _FAILURES_SHOWN:
            out(f"    ... and {len(result.failures) - _FAILURES_SHOWN} more (all in the store's 'failures' group)")


def cmd_features(args: argparse.Namespace) -> int:
    """Compute the backbone features of every image under DATA into the cache."""
    from .extract import ExtractOptions, extract_features

    options = ExtractOptions(
        batch_size=args.batch_size,
        workers=args.workers,
        max_pixels=args.max_pixels,
        lock_timeout=args.lock_timeout,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    result = extract_features(args.data, args.cache, _spec_from(args), options, log=_stderr)
    out = _stderr if args.json else print
    _summarise_features(result, out)
    if args.json:
        print(json.dumps(result.as_json()))
    if args.strict and result.failed:
        noun = "image" if result.failed == 1 else "images"
        raise StrictModeError(f"{result.failed} {noun} failed and --strict is set (see the list above)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .decode import DEFAULT_MAX_PIXELS
    from .extract import DEFAULT_BATCH_SIZE

    parser = argparse.ArgumentParser(
        prog="bottleneck",
        description="Transfer learning from a folder of labelled images, through a content-keyed feature cache.",
    )
    parser.add_argument("--version", action="version", version=f"bottleneck {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    features = commands.add_parser(
        "features",
        help="compute backbone features of a folder of images into the cache",
        description="Compute the features of every image under DATA (one sub-folder per class) into "
        "CACHE/<backbone-fingerprint>.h5. Images already in the cache are not computed again.",
        epilog="example: bottleneck features data/flowers --cache cache --image-size 299 --json",
    )
    features.add_argument("data", metavar="DATA", help="folder with one sub-folder of images per class")
    features.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    add_backbone_arguments(features)
    features.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                          help=f"images per backbone call (default: {DEFAULT_BATCH_SIZE})")
    features.add_argument("--workers", type=_positive_int, default=None,
                          help="decoding threads (default: one per CPU core)")
    features.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                          help=f"refuse images with more pixels than this (default: {DEFAULT_MAX_PIXELS:,})")
    features.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                          help="when another run writes the same store, wait at most this long "
                          "(default: wait until it finishes; 0: refuse at once)")
    features.add_argument("--strict", action="store_true", help="exit with an error if any image failed")
    features.add_argument("--json", action="store_true",
                          help="print one JSON object as the last line of stdout (the summary goes to stderr)")
    features.add_argument("--no-progress", action="store_true", help="no progress bar")
    features.set_defaults(handler=cmd_features)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bottleneck` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except BottleneckError as exc:
        _stderr(f"bottleneck: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _stderr("bottleneck: interrupted; committed batches are kept, run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
