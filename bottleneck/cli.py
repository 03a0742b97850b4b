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


def add_backbone_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """The flags that pick a backbone, shared by every command that reads or writes a store.

    With `optional`, leaving them all out means "the only store in the cache".
    """
    group = parser.add_argument_group("backbone" + (" (default: the only store in the cache)" if optional else ""))
    group.add_argument("--backbone", default=None if optional else "inception_v3", help="architecture (default: inception_v3)")
    group.add_argument(
        "--weights",
        default=None if optional else "imagenet",
        help="'imagenet' (Keras downloads them once), 'none' (random, for tests), or a path to a "
        "no-top Keras weights file (.h5 or .weights.h5) (default: imagenet)",
    )
    group.add_argument("--image-size", type=_positive_int, default=None, metavar="N",
                       help="square input size in pixels (default: the backbone's, 299; at least 75)")


def _spec_from(args: argparse.Namespace):
    from .backbone import BackboneSpec

    if args.backbone is None and args.weights is None and args.image_size is None:
        return None
    return BackboneSpec(architecture=args.backbone or "inception_v3", weights=args.weights or "imagenet",
                        image_size=args.image_size)


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


def cmd_train_head(args: argparse.Namespace) -> int:
    """Train a softmax head on the cached features of DATA and write a run folder."""
    from .runs import HeadConfig, train_head
    from .splits import SplitConfig

    head = HeadConfig(head=args.head, C=args.C, class_weight=args.class_weight, epochs=args.epochs,
                      learning_rate=args.learning_rate, dropout=args.dropout, batch_size=args.batch_size,
                      patience=args.patience)
    split = SplitConfig(val_pct=args.val_pct, test_pct=args.test_pct, seed=args.seed)
    result = train_head(args.data, args.cache, args.runs, _spec_from(args), head, split, args.split_file,
                        args.folds, log=_stderr, argv=["bottleneck", *sys.argv[1:]])
    out = _stderr if args.json else print
    metrics = result.metrics
    out(f"{args.head} head -> {result.run_dir}  ({metrics['training_seconds']:.1f} s to train)")
    for name, split_metrics in metrics["splits"].items():
        if split_metrics:
            out(f"  {name:<10} accuracy {split_metrics['accuracy']:.4f}  macro F1 {split_metrics['macro_f1']:.4f}  "
                f"log loss {split_metrics['log_loss']:.4f}  ({split_metrics['images']} images)")
    if "cross_validation" in metrics:
        cv = metrics["cross_validation"]
        out(f"  {cv['folds']}-fold CV accuracy {cv['mean_accuracy']:.4f} +- {cv['std_accuracy']:.4f}")
    excluded = metrics["excluded"]
    if excluded["failed_extraction"]:
        out(f"  {excluded['failed_extraction']} images left out: their extraction failed")
    if metrics["warning"]:
        out(f"  WARNING: {metrics['warning']}")
    if args.json:
        print(json.dumps({"run_dir": str(result.run_dir), "accuracy": result.accuracy()}))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML report of a runs folder; print its tables as Markdown."""
    from .report import write_report

    path, markdown = write_report(args.runs, args.out)
    print(markdown, end="")
    _stderr(f"report -> {path}")
    return 0


def _add_report(commands) -> None:
    parser = commands.add_parser(
        "report",
        help="write an HTML report comparing runs (tables also printed as Markdown)",
        description="Write one self-contained HTML page over every run in RUNS: a comparison table, and per "
        "run the confusion matrix, per-class metrics, learning curve and misclassified test images.",
        epilog="example: bottleneck report --runs runs --out runs/report.html",
    )
    parser.add_argument("--runs", default="runs", help="folder of run folders (default: ./runs)")
    parser.add_argument("--out", default=None, help="HTML file to write (default: RUNS/report.html)")
    parser.set_defaults(handler=cmd_report)


def _add_train_head(commands) -> None:
    parser = commands.add_parser(
        "train-head",
        help="train a softmax head on cached features and write a run folder",
        description="Train a head on the cached features of DATA (no image is decoded, no backbone is "
        "loaded) and write RUNS/<run-id>/ with config.json, split.csv, the model and metrics.json.",
        epilog="example: bottleneck train-head --data data/flowers --cache cache --head logreg --runs runs --json",
    )
    parser.add_argument("--data", required=True, help="the image folder the features were extracted from")
    parser.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    parser.add_argument("--runs", default="runs", help="folder for run folders (default: ./runs)")
    parser.add_argument("--head", choices=["logreg", "keras"], default="logreg", help="head type (default: logreg)")
    add_backbone_arguments(parser, optional=True)
    split = parser.add_argument_group("split")
    split.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default: 0)")
    split.add_argument("--val-pct", type=float, default=10.0, help="validation percentage (default: 10)")
    split.add_argument("--test-pct", type=float, default=10.0, help="test percentage (default: 10)")
    split.add_argument("--split-file", default=None, help="reuse a saved split.csv")
    split.add_argument("--folds", type=_positive_int, default=None, help="also k-fold cross-validate over train+validation")
    head = parser.add_argument_group("head")
    head.add_argument("--C", type=float, default=None, help="logreg: inverse regularisation strength (default: 1)")
    head.add_argument("--class-weight", choices=["balanced"], default=None, help="weight classes by inverse frequency")
    head.add_argument("--epochs", type=_positive_int, default=None, help="keras: most epochs (default: 200)")
    head.add_argument("--learning-rate", type=float, default=None, help="keras: Adam learning rate (default: 0.001)")
    head.add_argument("--dropout", type=float, default=None, help="keras: dropout on the features (default: 0)")
    head.add_argument("--batch-size", type=_positive_int, default=None, help="keras: batch size (default: 64)")
    head.add_argument("--patience", type=_positive_int, default=None, help="keras: early-stopping patience (default: 10)")
    parser.add_argument("--json", action="store_true",
                        help="print {run_dir, accuracy} as the last line of stdout (the summary goes to stderr)")
    parser.set_defaults(handler=cmd_train_head)


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
    _add_train_head(commands)
    _add_report(commands)
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
