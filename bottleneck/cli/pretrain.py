"""`bottleneck pretrain`: train a small convolutional base of your own."""

from __future__ import annotations

import argparse

from bottleneck import bounds
from bottleneck.cli.common import (
    BATCH_SIZE,
    LEARNING_RATE,
    SEED,
    Bounded,
    add_layout_argument,
    columns_of,
    data_or_labels,
    stderr,
)


def run(args: argparse.Namespace) -> int:
    """Train a small convolutional base on a source dataset and save it as a .keras file."""
    data_or_labels(args)
    from bottleneck.learn.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(
        image_size=args.image_size,
        blocks=args.blocks,
        filters=args.filters,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    result = pretrain(
        args.data,
        args.out,
        config,
        args.split_file,
        log=stderr,
        layout=args.layout,
        labels=args.labels,
        columns=columns_of(args),
        progress=True,
    )
    accuracy = "-" if result.validation_accuracy is None else f"{result.validation_accuracy:.4f}"
    print(
        f"saved {result.path} ({len(result.classes)} classes, {result.epochs_run} epochs, validation accuracy "
        f"{accuracy}, {result.seconds:.1f} s)"
    )
    print(f"  extract with: bottleneck features DATA --backbone {result.path} --layer {result.layer}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "pretrain",
        help="train your own small convolutional base on a source dataset",
        description="Train a small conv/BN/ReLU base with global pooling (layer 'features') and a softmax top on "
        "DATA's train split (validation split for early stopping), and save it as a .keras file.",
        epilog="example: bottleneck pretrain --data data/source --out cache/base.keras --epochs 20",
    )
    parser.add_argument("--data", default=None, help="source images, one sub-folder per class (optional with --labels)")
    add_layout_argument(parser)
    parser.add_argument("--out", required=True, help="the .keras file to write")
    parser.add_argument(
        "--image-size",
        type=Bounded(bounds.PRETRAIN_IMAGE_SIZE),
        default=32,
        help="square input size, %(type)s (default: 32)",
    )
    parser.add_argument(
        "--blocks",
        type=Bounded(bounds.BLOCKS),
        default=3,
        help="conv blocks, %(type)s, each but the last halving the size (default: 3)",
    )
    parser.add_argument(
        "--filters",
        type=Bounded(bounds.FILTERS),
        default=32,
        help="filters of the first block, doubled per block, %(type)s (default: 32)",
    )
    parser.add_argument(
        "--epochs",
        type=Bounded(bounds.PRETRAIN_EPOCHS),
        default=30,
        help="most epochs, %(type)s; 0 saves the untrained network (default: 30)",
    )
    parser.add_argument(
        "--batch-size",
        type=BATCH_SIZE,
        default=None,
        help="batch size, %(type)s (default: about 30 steps per epoch, from 8 to 64 images)",
    )
    parser.add_argument(
        "--learning-rate", type=LEARNING_RATE, default=1e-3, help="Adam learning rate, %(type)s (default: 0.001)"
    )
    parser.add_argument(
        "--seed", type=SEED, default=0, help="seed of the weights and the training, %(type)s (default: 0)"
    )
    parser.add_argument(
        "--split-file",
        default=None,
        help="train on the train rows (and stop early on the validation rows) of this split.csv",
    )
    parser.set_defaults(handler=run)
