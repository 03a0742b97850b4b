"""Train your own small convolutional base on a source dataset, for domains with no good public
backbone; then use it with `--backbone BASE.keras --layer features` like any other backbone.

The base is a few conv / batch-norm / ReLU blocks and global average pooling (the layer named
`features`) under a softmax top. It carries its own preprocessing (a Rescaling layer), so the
model file alone says how to feed it. `--epochs 0` saves the seeded, untrained network: the
"same architecture, random weights" baseline.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck import bounds
from bottleneck.backbones.build import import_tensorflow
from bottleneck.errors import BottleneckError, DataError
from bottleneck.features.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, UnreadableImage, decode_image_file
from bottleneck.features.discover import discover_images
from bottleneck.features.noise import decoder_log_in, decoder_noise_to, decoding
from bottleneck.features.shards import Columns
from bottleneck.learn.splits import SplitConfig, assign_splits, read_split_csv, splits_from_folders

FEATURE_LAYER = "features"
#: Steps per epoch `--batch-size auto` aims at.
STEPS_PER_EPOCH = 30


@dataclass(frozen=True)
class PretrainConfig:
    """Size of the base and how to train it."""

    image_size: int = 32
    blocks: int = 3
    filters: int = 32  # doubled at each block
    epochs: int = 30
    batch_size: int | None = None  # None: about `STEPS_PER_EPOCH` steps per epoch (see `batch_for`)
    learning_rate: float = 1e-3
    patience: int = 5
    seed: int = 0

    def batch_for(self, images: int) -> int:
        """`batch_size`, or one that gives about `STEPS_PER_EPOCH` steps per epoch over `images` (8 to 64): a
        small source trained in batches of 64 takes too few steps per epoch to learn (or to settle BatchNorm)."""
        if self.batch_size:
            return int(self.batch_size)
        return int(min(64, max(8, images // STEPS_PER_EPOCH)))

    def __post_init__(self) -> None:
        size, blocks = bounds.PRETRAIN_IMAGE_SIZE, bounds.BLOCKS
        size.check(self.image_size, "--image-size", BottleneckError, f"between {size.low} and {size.high}")
        if self.blocks not in blocks or self.image_size < 2**self.blocks:
            raise BottleneckError(
                f"--blocks must be between {blocks.low} and {blocks.high} and leave at least 1 pixel; got {self.blocks}"
            )
        for name, interval in (
            ("epochs", bounds.PRETRAIN_EPOCHS),
            ("filters", bounds.FILTERS),
            ("batch_size", bounds.BATCH_SIZE),
        ):
            if getattr(self, name) is not None:
                interval.check(getattr(self, name), f"--{name.replace('_', '-')}", BottleneckError)


@dataclass
class PretrainResult:
    path: Path
    layer: str
    classes: list[str]
    epochs_run: int
    validation_accuracy: float | None
    seconds: float


def load_images(
    data_dir: str | os.PathLike,
    size: int,
    split_file: str | None = None,
    wanted: tuple[str, ...] = ("train", "validation", "test"),
    layout: str = "auto",
    labels: str | None = None,
    columns: Columns | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """Decode the images of DATA (those in `wanted` splits of `split_file`, if given, else of the split
    folders or the default split), with the guards of `features`; decoder warnings go to `cache_dir`'s log.

    Returns pixels (n, size, size, 3) uint8, labels, relative paths and each image's split.
    Images that cannot be decoded are left out.
    """
    from concurrent.futures import ThreadPoolExecutor

    discovery = discover_images(data_dir, layout=layout, labels=labels, columns=columns)
    if discovery.multi_label:
        raise DataError(
            f"{discovery.layout_line()}: pretrain and fine-tune learn one label per image, not yet "
            "several; train a multi-label head with `bottleneck train-head`"
        )
    images = discovery.images
    if split_file:
        saved = read_split_csv(split_file)
        splits = [saved.get(image.relpath, (image.label, "unlisted"))[1] for image in images]
    else:
        items = [(im.relpath, im.label) for im in images]
        drawn = (
            splits_from_folders(items, discovery.folder_splits, SplitConfig(), discovery.groups)[0]
            if discovery.folder_splits
            else assign_splits(items, SplitConfig(), discovery.groups)
        )
        splits = [drawn[im.relpath] for im in images]

    def decode(path: Path) -> np.ndarray | None:
        try:  # the guards of `features`: no FIFO, no file past the size limit, --max-pixels
            with decoding(path):
                return decode_image_file(path, size, max_pixels)
        except (ImageDecodeError, UnreadableImage):
            return None

    chosen = [(im, s) for im, s in zip(images, splits) if s in wanted]
    # Decoder warnings go to a log, as in `features`: the cache's where there is one, else a temporary one.
    cache = Path(cache_dir) if cache_dir and os.path.isdir(cache_dir) else Path(tempfile.gettempdir())
    log_file = decoder_log_in(cache, cache_dir is not None and os.access(cache, os.W_OK))
    with ThreadPoolExecutor() as pool, decoder_noise_to(log_file):
        pixels = list(pool.map(decode, [im.path for im, _ in chosen]))
    decoded = [(i, p) for i, p in enumerate(pixels) if p is not None]
    keep = [i for i, _ in decoded]
    if not keep:
        raise DataError(f"no decodable images in {data_dir} for the splits {', '.join(wanted)}")
    return (
        np.stack([p for _, p in decoded]),
        [chosen[i][0].label for i in keep],
        [chosen[i][0].relpath for i in keep],
        [chosen[i][1] for i in keep],
    )


def build_base(n_classes: int, config: PretrainConfig):
    """The small conv base with its softmax top; the pooled layer is named `features`."""
    _, keras = import_tensorflow()
    keras.utils.set_random_seed(config.seed)
    inputs = keras.Input((config.image_size, config.image_size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    for block in range(config.blocks):
        x = keras.layers.Conv2D(config.filters * 2**block, 3, padding="same", use_bias=False, name=f"conv{block + 1}")(
            x
        )
        # A short momentum: small datasets give few steps per epoch for the moving statistics to settle.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{block + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{block + 1}")(x)
        if block < config.blocks - 1:
            x = keras.layers.MaxPooling2D(name=f"pool{block + 1}")(x)
    features = keras.layers.GlobalAveragePooling2D(name=FEATURE_LAYER)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="predictions")(features)
    model = keras.Model(inputs, outputs, name="bottleneck_base")
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def labels_file(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".labels.json")


def pretrain(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    config: PretrainConfig = PretrainConfig(),
    split_file: str | None = None,
    log: Callable[[str], None] = lambda message: None,
    layout: str = "auto",
    labels: str | None = None,
    columns: Columns | None = None,
    progress: bool = False,
) -> PretrainResult:
    """Train the base on DATA's train split (validation split for early stopping) and save it to `out`;
    `progress` shows each epoch on stderr (a bar on a terminal, else a line)."""
    tf, keras = import_tensorflow()
    tf.config.experimental.enable_op_determinism()
    out = Path(out)
    if out.suffix != ".keras":
        raise BottleneckError(f"--out must end in .keras; got {out}")
    started = time.perf_counter()
    pixels, names, _, splits = load_images(
        data_dir, config.image_size, split_file, ("train", "validation"), layout, labels, columns
    )
    classes = sorted(set(names))
    index = {label: i for i, label in enumerate(classes)}
    y = np.array([index[label] for label in names])
    train = np.array([s == "train" for s in splits])
    model = build_base(len(classes), config)
    validation = (pixels[~train], y[~train]) if (~train).any() else None
    history: dict = {}
    if config.epochs:
        from bottleneck.learn.progress import epoch_callback

        batch_size = config.batch_for(int(train.sum()))
        log(
            f"pretraining on {int(train.sum())} images of {len(classes)} classes for up to {config.epochs} epochs, "
            f"batches of {batch_size} ({-(-int(train.sum()) // batch_size)} steps per epoch)"
        )
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss" if validation else "loss", patience=config.patience, restore_best_weights=True
        )
        shown = epoch_callback("pretrain", config.epochs, progress)
        history = model.fit(
            pixels[train],
            y[train],
            validation_data=validation,
            epochs=config.epochs,
            batch_size=batch_size,
            callbacks=[stop] + ([shown] if shown else []),
            verbose=0,
        ).history
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, out)  # a model file appears whole or not at all
    labels_file(out).write_text(json.dumps(classes))
    val_acc = history.get("val_accuracy")
    result = PretrainResult(
        out,
        FEATURE_LAYER,
        classes,
        len(history.get("loss", [])),
        float(max(val_acc)) if val_acc else None,
        time.perf_counter() - started,
    )
    # Read by BackboneSpec.pretrained: an untrained base must be flagged as random weights everywhere.
    out.with_name(out.name + ".info.json").write_text(
        json.dumps(
            {
                "classes": classes,
                "epochs_run": result.epochs_run,
                "validation_accuracy": result.validation_accuracy,
                "config": config.__dict__,
            }
        )
    )
    return result


def evaluate_classifier(
    model_path: str | os.PathLike, data_dir: str | os.PathLike, split_file: str | None, split: str = "test"
) -> dict:
    """Accuracy and macro F1 of a pretrained model's own softmax on one split of DATA."""
    from sklearn.metrics import accuracy_score, f1_score

    _, keras = import_tensorflow()
    model_path = Path(model_path)
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    classes = json.loads(labels_file(model_path).read_text())
    size = int(model.input_shape[1])
    pixels, labels, _, _ = load_images(data_dir, size, split_file, (split,))
    predicted = [classes[i] for i in np.argmax(model.predict(pixels, batch_size=256, verbose=0), axis=1)]
    return {
        "images": len(labels),
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }
