"""`bottleneck train-head`: train a softmax head on cached features and write a run folder."""
from __future__ import annotations

import argparse
import json
import sys

from bottleneck.cli.common import add_backbone_arguments, positive_int, print_split_scores, spec_from, stderr


def run(args: argparse.Namespace) -> int:
    """Train a softmax head on the cached features of DATA and write a run folder."""
    from bottleneck.learn.memory import parse_size
    from bottleneck.learn.runs import HeadConfig, train_head
    from bottleneck.learn.splits import SplitConfig

    max_memory = None if args.max_memory is None else parse_size(args.max_memory)  # a bad size fails before any work

    head = HeadConfig(head=args.head, C=args.C, class_weight=args.class_weight, epochs=args.epochs,
                      learning_rate=args.learning_rate, dropout=args.dropout, batch_size=args.batch_size,
                      patience=args.patience)
    split = SplitConfig(val_pct=args.val_pct, test_pct=args.test_pct, seed=args.seed)
    result = train_head(args.data, args.cache, args.runs, spec_from(args), head, split, args.split_file,
                        args.folds, log=stderr, argv=["bottleneck", *sys.argv[1:]], max_memory=max_memory)
    out = stderr if args.json else print
    metrics = result.metrics
    streamed = metrics.get("training", {}).get("mode") == "streamed"
    out(f"{args.head} head -> {result.run_dir}  ({metrics['training_seconds']:.1f} s to train"
        + (", streamed from the store" if streamed else "") + ")")
    print_split_scores(metrics, out)
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


def add_parser(commands) -> None:
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
    split.add_argument("--folds", type=positive_int, default=None, help="also k-fold cross-validate over train+validation")
    head = parser.add_argument_group("head")
    head.add_argument("--C", type=float, default=None, help="logreg: inverse regularisation strength (default: 1)")
    head.add_argument("--class-weight", choices=["balanced"], default=None, help="weight classes by inverse frequency")
    head.add_argument("--epochs", type=positive_int, default=None, help="keras: most epochs (default: 200)")
    head.add_argument("--learning-rate", type=float, default=None, help="keras: Adam learning rate (default: 0.001)")
    head.add_argument("--dropout", type=float, default=None, help="keras: dropout on the features (default: 0)")
    head.add_argument("--batch-size", type=positive_int, default=None, help="keras: batch size (default: 64)")
    head.add_argument("--patience", type=positive_int, default=None, help="keras: early-stopping patience (default: 10)")
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="memory for features, e.g. 512M, 2G, 1.5GB or bytes (default: a quarter of the available "
                        "memory); larger feature sets are streamed from the store in chunks")
    parser.add_argument("--json", action="store_true",
                        help="print {run_dir, accuracy} as the last line of stdout (the summary goes to stderr)")
    parser.set_defaults(handler=run)
