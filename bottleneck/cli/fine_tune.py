"""`bottleneck fine-tune --run RUN`: unfreeze the top of the backbone and train the whole network gently."""

from __future__ import annotations

import argparse
import json
import sys

from bottleneck import bounds
from bottleneck.cli.common import (
    BATCH_SIZE,
    EPOCHS,
    PATIENCE,
    SEED,
    Bounded,
    OrAuto,
    memory_budget,
    print_split_scores,
    stderr,
)


def _augmentations(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def run(args: argparse.Namespace) -> int:
    """Fine-tune a run's backbone and head end to end on the run's own split; write a new run folder."""
    from bottleneck.learn.finetune import FineTuneConfig, fine_tune

    max_memory = memory_budget(args.max_memory)  # a bad size fails before any work
    config = FineTuneConfig(
        unfreeze=args.unfreeze,
        unfreeze_from=args.unfreeze_from,
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patience=args.patience,
        augment=_augmentations(args.augment),
        gradual=args.gradual,
        seed=args.seed,
        head_epochs=args.head_epochs,
        bn=args.bn,
        lower_rate_factor=args.lower_rate_factor,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        soften=args.soften,
    )
    result = fine_tune(
        args.run, config, args.runs, log=stderr, argv=["bottleneck", *sys.argv[1:]], max_memory=max_memory
    )
    out = stderr if args.json else print
    metrics = result.metrics
    out(
        f"fine-tuned {metrics['parent_run']} -> {result.run_dir}  (best epoch {metrics['best_epoch']}, "
        f"{metrics['training_seconds']:.1f} s)"
    )
    print_split_scores(metrics, out)
    if metrics["warning"]:
        out(f"  WARNING: {metrics['warning']}")
    if args.json:
        accuracy = {name: (scores or {}).get("accuracy") for name, scores in metrics["splits"].items()}
        print(json.dumps({"run_dir": str(result.run_dir), "accuracy": accuracy, "parent_run": metrics["parent_run"]}))
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "fine-tune",
        help="fine-tune a run's backbone and head end to end (phase two)",
        description="Start from a run's backbone and trained head, unfreeze the top layers, and train on the run's own "
        "split: one optimizer per layer group (lower groups slower), a one-cycle schedule (warm-up, then cosine), "
        "label smoothing, early stopping on validation loss and seeded augmentation. Re-reads the images. Ctrl-C "
        "keeps the best epoch; the same command resumes.",
        epilog="example: bottleneck fine-tune --run runs/20260101-120000-logreg-ab12 --unfreeze 20 --augment flip,crop",
    )
    parser.add_argument("--run", required=True, help="a run folder written by train-head (or fine-tune)")
    parser.add_argument("--runs", default=None, help="folder for the new run (default: beside the parent run)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--unfreeze",
        type=Bounded(bounds.UNFREEZE),
        default=None,
        metavar="N",
        help="unfreeze the top N backbone layers with weights, %(type)s (default: all; BatchNorm: see --bn)",
    )
    which.add_argument("--unfreeze-from", default=None, metavar="LAYER", help="unfreeze LAYER and every layer above it")
    parser.add_argument(
        "--gradual",
        action="store_true",
        help="after the head's epochs, unfreeze one more group of layers (of up to 4, the top first) per epoch",
    )
    parser.add_argument(
        "--learning-rate",
        type=OrAuto(bounds.LEARNING_RATE, auto_last=True),
        default=1e-3,
        help="peak learning rate of the top group and the head, %(type)s: 'auto' runs a learning-rate "
        "finder first (its curve: lr_find.json and lr_find.png in the run) (default: 1e-3)",
    )
    parser.add_argument(
        "--head-epochs",
        type=Bounded(bounds.HEAD_EPOCHS),
        default=0,
        help="epochs training the head alone (the base frozen) before unfreezing, %(type)s (default: 0)",
    )
    parser.add_argument(
        "--bn",
        choices=("frozen", "affine", "train"),
        default="affine",
        help="BatchNorm: frozen (inference mode, as the Keras guide), affine (gamma and beta train, "
        "statistics frozen, as fastai) or train (batch statistics) (default: affine)",
    )
    parser.add_argument(
        "--lower-rate-factor",
        type=Bounded(bounds.LOWER_RATE_FACTOR),
        default=10.0,
        help="discriminative rates: the lowest of up to 4 layer groups learns this many times slower "
        "than the top one, %(type)s (default: 10)",
    )
    parser.add_argument(
        "--warmup",
        type=Bounded(bounds.WARMUP),
        default=0.3,
        help="fraction of the steps warming the rate up before the cosine decay (one cycle), %(type)s (default: 0.3)",
    )
    parser.add_argument(
        "--weight-decay",
        type=Bounded(bounds.WEIGHT_DECAY),
        default=0.0,
        help="AdamW's decoupled weight decay, %(type)s (default: 0, plain Adam)",
    )
    parser.add_argument(
        "--label-smoothing",
        type=Bounded(bounds.LABEL_SMOOTHING),
        default=0.1,
        help="label smoothing of the training loss, %(type)s (default: 0.1)",
    )
    parser.add_argument(
        "--no-soften",
        dest="soften",
        action="store_false",
        help="keep a logreg parent's head as it is (by default its logits are divided by the "
        "temperature, at least 1, that fits the validation images best: same predictions, and "
        "a sharp head then leaves the base a gradient to learn from)",
    )
    parser.add_argument("--epochs", type=EPOCHS, default=10, help="most epochs, %(type)s (default: 10)")
    parser.add_argument("--batch-size", type=BATCH_SIZE, default=16, help="batch size, %(type)s (default: 16)")
    parser.add_argument(
        "--patience",
        type=PATIENCE,
        default=3,
        help="epochs without a better validation loss before stopping, %(type)s (default: 3)",
    )
    parser.add_argument(
        "--augment",
        default="",
        metavar="LIST",
        help="comma-separated seeded augmentations: flip, crop, brightness (default: none)",
    )
    parser.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory for the decoded images (512M, 2G, ...): a split whose decoded pixels (twice, "
        "with the training copy) do not fit is decoded per batch instead (default: a quarter of the "
        "available memory)",
    )
    parser.add_argument(
        "--seed",
        type=SEED,
        default=0,
        help="seed of the weights' updates, order and augmentation, %(type)s (default: 0)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print {run_dir, accuracy, parent_run} as the last line of stdout"
    )
    parser.set_defaults(handler=run)
