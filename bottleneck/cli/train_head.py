"""`bottleneck train-head`: train a softmax head (or, on multi-label data, a sigmoid head) on cached features and
write a run folder."""

from __future__ import annotations

import argparse
import json
import sys

from bottleneck import bounds
from bottleneck.cli.common import (
    BATCH_SIZE,
    EPOCHS,
    LEARNING_RATE,
    PATIENCE,
    PERCENT,
    SEED,
    Bounded,
    OrAuto,
    add_backbone_arguments,
    add_layout_argument,
    columns_of,
    data_or_labels,
    memory_budget,
    print_split_scores,
    spec_from,
    stderr,
)


def run(args: argparse.Namespace) -> int:
    """Train a softmax head on the cached features of DATA and write a run folder."""
    data_or_labels(args)
    from bottleneck.learn.runs import HeadConfig, train_head
    from bottleneck.learn.splits import SplitConfig

    if args.augment_flip is not None and args.augment is None:
        from bottleneck.errors import DataError

        raise DataError("--augment-flip picks the augmented views to train on: it needs --augment")
    max_memory = memory_budget(args.max_memory)  # a bad size fails before any work
    head = HeadConfig(
        head=args.head,
        C=args.C,
        class_weight=args.class_weight,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        dropout=args.dropout,
        batch_size=args.batch_size,
        patience=args.patience,
        k=args.k,
        l2=args.l2,
    )
    split = SplitConfig(val_pct=args.val_pct, test_pct=args.test_pct, seed=args.seed)
    result = train_head(
        args.data,
        args.cache,
        args.runs,
        spec_from(args),
        head,
        split,
        args.split_file,
        args.folds,
        log=stderr,
        argv=["bottleneck", *sys.argv[1:]],
        max_memory=max_memory,
        exclude=args.exclude,
        augment=args.augment,
        augment_flip=args.augment_flip,
        layout=args.layout,
        labels=args.labels,
        columns=columns_of(args),
        progress=True,
    )
    out = stderr if args.json else print
    metrics = result.metrics
    streamed = metrics.get("training", {}).get("mode") == "streamed"
    out(
        f"{args.head} head -> {result.run_dir}  ({metrics['training_seconds']:.1f} s to train"
        + (", streamed from the store" if streamed else "")
        + ")"
    )
    print_split_scores(metrics, out)
    if "cross_validation" in metrics:
        cv = metrics["cross_validation"]
        out(f"  {cv['folds']}-fold CV accuracy {cv['mean_accuracy']:.4f} +- {cv['std_accuracy']:.4f}")
    excluded = metrics["excluded"]
    if excluded["failed_extraction"]:
        out(f"  {excluded['failed_extraction']} images left out: their extraction failed")
    if "augment" in metrics:
        out(
            f"  trained on {metrics['augment']['rows_added']} cached augmented views of the training images as well "
            f"({metrics['augment']['views_per_image']} per image)"
        )
    if excluded.get("exclude_file") or excluded.get("exclude_file_test_kept"):
        out(
            f"  {excluded['exclude_file']} images left out of training and validation: listed in {args.exclude}"
            + (
                f"; {excluded['exclude_file_test_kept']} listed test image(s) kept: --exclude never changes the test split"
                if excluded.get("exclude_file_test_kept")
                else ""
            )
        )
    if metrics["warning"]:
        out(f"  WARNING: {metrics['warning']}")
    if args.json:
        summary = {"run_dir": str(result.run_dir), "accuracy": result.accuracy()}
        if metrics.get("thresholds"):
            summary.update(
                mean_average_precision=result.scores("mean_average_precision"), micro_f1=result.scores("micro_f1")
            )
        print(json.dumps(summary))
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train-head",
        help="train a softmax head on cached features and write a run folder",
        description="Train a head on the cached features of DATA (no image is decoded, no backbone is "
        "loaded) and write RUNS/<run-id>/ with config.json, split.csv, the model and metrics.json.",
        epilog="example: bottleneck train-head --data data/flowers --cache cache --head logreg --runs runs --json",
    )
    parser.add_argument(
        "--data", default=None, help="the image folder the features were extracted from (optional with --labels)"
    )
    parser.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    parser.add_argument("--runs", default="runs", help="folder for run folders (default: ./runs)")
    add_layout_argument(parser)
    parser.add_argument(
        "--head",
        choices=["logreg", "keras", "knn"],
        default="logreg",
        help="head type: logreg, keras, or knn (cosine nearest neighbours) (default: logreg)",
    )
    add_backbone_arguments(parser, optional=True)
    split = parser.add_argument_group("split")
    split.add_argument("--seed", type=SEED, default=0, help="seed of the split and of training, %(type)s (default: 0)")
    split.add_argument(
        "--val-pct",
        type=PERCENT,
        default=10.0,
        help="validation percentage, %(type)s; with --test-pct, less than 100 (default: 10)",
    )
    split.add_argument(
        "--test-pct",
        type=PERCENT,
        default=10.0,
        help="test percentage, %(type)s; with --val-pct, less than 100 (default: 10)",
    )
    split.add_argument("--split-file", default=None, help="reuse a saved split.csv")
    parser.add_argument(
        "--augment",
        type=Bounded(bounds.VIEWS),
        nargs="?",
        const=0,
        default=None,
        metavar="N",
        help="also train on the cached augmented views of the training images (never of validation or "
        "test images): N per image, %(type)s, or with no N every view the cache holds "
        "(compute them with `features --augment N`)",
    )
    parser.add_argument(
        "--augment-flip",
        type=Bounded(bounds.PROBABILITY),
        default=None,
        metavar="P",
        help="with --augment: the views computed with this flip probability, %(type)s (as given to "
        "`features --augment-flip`; default: 0.5)",
    )
    parser.add_argument(
        "--exclude",
        default=None,
        metavar="FILE",
        help="leave the images this file lists (one per line, relative to DATA or absolute: an "
        "audit's exclude.txt) out of training and validation; the test split never changes, so runs "
        "with and without it are scored on the same test images. The run records it",
    )
    split.add_argument(
        "--folds",
        type=Bounded(bounds.FOLDS),
        default=None,
        help="also k-fold cross-validate over train+validation, %(type)s and at most the training and "
        "validation images of the smallest class",
    )
    head = parser.add_argument_group("head")
    head.add_argument(
        "--C",
        type=OrAuto(bounds.C),
        default=None,
        help="logreg: inverse regularisation strength, %(type)s; auto chooses it from 1e-4..1e2 by "
        "5-fold cross-validation over train+validation, then trains on train (default: auto)",
    )
    head.add_argument(
        "--k",
        type=Bounded(bounds.K),
        default=None,
        help="knn: neighbours, %(type)s (default: chosen on the validation split from 1, 3, 5, ... 51)",
    )
    head.add_argument("--class-weight", choices=["balanced"], default=None, help="weight classes by inverse frequency")
    head.add_argument("--epochs", type=EPOCHS, default=None, help="keras: most epochs, %(type)s (default: 300)")
    head.add_argument(
        "--learning-rate", type=LEARNING_RATE, default=None, help="keras: Adam learning rate, %(type)s (default: 0.01)"
    )
    head.add_argument(
        "--l2", type=Bounded(bounds.L2), default=None, help="keras: L2 penalty on the weights, %(type)s (default: 0.01)"
    )
    head.add_argument(
        "--dropout",
        type=Bounded(bounds.DROPOUT),
        default=None,
        help="keras: dropout on the features, %(type)s (default: 0)",
    )
    head.add_argument(
        "--batch-size",
        type=BATCH_SIZE,
        default=None,
        help="keras: batch size, %(type)s (default: about 20 steps per epoch, from 8 to 64)",
    )
    head.add_argument(
        "--patience", type=PATIENCE, default=None, help="keras: early-stopping patience, %(type)s (default: 20)"
    )
    parser.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory for features, e.g. 512M, 2G, 1.5GB or bytes, at most 1P (default: a quarter of the available "
        "memory); larger feature sets are streamed from the store in chunks",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print {run_dir, accuracy} as the last line of stdout (the summary goes to stderr)",
    )
    parser.set_defaults(handler=run)
