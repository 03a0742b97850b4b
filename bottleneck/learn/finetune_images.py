"""Fine-tune's images: the run's split decoded in memory or per batch (through the one decoder), seeded
augmentation, and the batches of one epoch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from bottleneck.errors import DataError, stop_if_interrupted
from bottleneck.features.shards import Columns
from bottleneck.learn.pretrain import load_images
from bottleneck.learn.run_folder import LoadedRun
from bottleneck.learn.splits import SPLITS, read_split_csv

if TYPE_CHECKING:
    from bottleneck.learn.finetune import FineTuneConfig


AUGMENTATIONS = ("flip", "crop", "brightness")


_CROP_FRACTION = 0.8  # "crop" keeps a random square of 80-100% of the side, resized back


_BRIGHTNESS_DELTA = 0.1 * 255


def augmenter(tf, augment: tuple[str, ...], size: int):
    """Seeded augmentation of a batch, as one `tf.function` traced here, once.

    Run eagerly, `map_fn` builds a `TensorArray` per call, and a Ctrl-C inside one made TensorFlow
    print an "Object was never used" block at exit; in a graph, an interrupt lands between calls.
    """
    augment_batch = tf.function(
        lambda pixels, seeds: _augment_batch(tf, pixels, seeds, augment, size),
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32), tf.TensorSpec([None, 2], tf.int32)],
    )
    augment_batch(tf.zeros([1, size, size, 3]), tf.zeros([1, 2], tf.int32))  # the one trace, before training
    return augment_batch


def _augment_batch(tf, pixels, seeds, augment: tuple[str, ...], size: int):
    """Seeded augmentation of one batch: each image gets its own stateless seed pair."""

    def one(args):
        image, seed = args
        if "flip" in augment:
            image = tf.image.stateless_random_flip_left_right(image, seed)
        if "crop" in augment:
            side = tf.cast(tf.round(size * tf.random.stateless_uniform([], seed + 1, _CROP_FRACTION, 1.0)), tf.int32)
            image = tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), seed + 2)
            image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
        if "brightness" in augment:
            image = tf.clip_by_value(
                tf.image.stateless_random_brightness(image, _BRIGHTNESS_DELTA, seed + 3), 0.0, 255.0
            )
        return image

    return tf.map_fn(one, (pixels, seeds), fn_output_signature=tf.float32)


def _epoch_batches(tf, pixels: np.ndarray, y: np.ndarray, config: FineTuneConfig, epoch: int, augment_batch=None):
    """The training batches of one epoch: shuffled and augmented (by `augment_batch`, see `augmenter`) from
    (seed, epoch) alone, so a resumed run sees exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(y))
    for start in range(0, len(order), config.batch_size):
        rows = order[start : start + config.batch_size]
        batch = tf.constant(_decode(pixels, rows).astype(np.float32))
        if augment_batch is not None:
            seeds = tf.constant(np.stack([np.full(len(rows), config.seed), epoch * len(y) + rows], 1), tf.int32)
            batch = augment_batch(batch, seeds)
        yield batch, y[rows]


class _StreamedImages:
    """The split's images decoded per batch through the one decoder (the split held as paths, not pixels):
    what fine-tune uses when the decoded split would not fit in the memory budget."""

    def __init__(self, paths: list[Path], size: int, log_file: Path):
        self.paths, self.size, self.log_file = paths, size, log_file
        self.shape = (len(paths), size, size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index) -> _StreamedImages:
        rows = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        return _StreamedImages([self.paths[i] for i in rows], self.size, self.log_file)

    def decode(self, rows) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        from bottleneck.features.noise import decoder_noise_to

        with ThreadPoolExecutor() as pool, decoder_noise_to(self.log_file):
            pixels = list(pool.map(_decode_or_none, [self.paths[i] for i in rows], [self.size] * len(rows)))
        decoded: list[np.ndarray] = []
        for i, found in zip(rows, pixels):
            if found is None:
                raise DataError(
                    f"{self.paths[i]} decoded when fine-tuning began and cannot be decoded now; "
                    "restore it and run the same command again (finished epochs are kept)"
                )
            decoded.append(found)
        return np.stack(decoded) if decoded else np.zeros((0, self.size, self.size, 3), np.uint8)


def _decode_or_none(path: Path, size: int) -> np.ndarray | None:
    """One image through the guards of `features` (as `load_images` decodes it), or None."""
    from bottleneck.features.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, UnreadableImage, decode_image_file
    from bottleneck.features.noise import decoding

    try:
        with decoding(path):
            return decode_image_file(path, size, DEFAULT_MAX_PIXELS)
    except (ImageDecodeError, UnreadableImage):
        return None


def _subset(pixels, index):
    return pixels.subset(index) if isinstance(pixels, _StreamedImages) else pixels[index]


def _decode(pixels, rows) -> np.ndarray:
    return pixels.decode(rows) if isinstance(pixels, _StreamedImages) else pixels[rows]


def _predict(model, pixels) -> np.ndarray:
    """Probabilities in batches of 64, whether the pixels are in memory or decoded 256 at a time (the same batches)."""
    if not isinstance(pixels, _StreamedImages):
        return _predict_batches(model, pixels.astype(np.float32))
    chunks = [
        _predict_batches(model, pixels.decode(np.arange(start, min(start + 256, len(pixels)))).astype(np.float32))
        for start in range(0, len(pixels), 256)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, int(model.output_shape[-1])), np.float32)


def _predict_batches(model, pixels: np.ndarray) -> np.ndarray:
    """`model.predict(pixels, batch_size=64)`'s numbers: its own predict function on the same batches of 64, without
    the tf.data pipeline `predict` builds on every call (about half a second each, and fine-tune calls it per epoch)."""
    if not len(pixels):
        return model.predict(pixels, batch_size=64, verbose=0)
    return np.concatenate([model.predict_on_batch(pixels[start : start + 64]) for start in range(0, len(pixels), 64)])


def _load_split_pixels(run: LoadedRun, size: int, log: Callable[[str], None], max_memory: int | None = None):
    """The run's split, decoded in memory when it fits in `max_memory` (default: a quarter of what is available;
    the training rows are copied once, so twice the split), else as a `_StreamedImages` decoded per batch."""
    from bottleneck.learn.memory import default_budget
    from bottleneck.text import format_bytes

    data = run.data_dir or Path("")
    if not data.is_dir():
        raise DataError(
            f"the images run {run.run_id} was trained on are not at {data} any more; fine-tuning re-reads them"
        )
    listed = len(read_split_csv(run.folder / "split.csv"))
    budget = max_memory if max_memory is not None else default_budget()
    needed = 2 * listed * size * size * 3
    columns = Columns(**run.config["columns"]) if run.config.get("columns") else None
    if needed <= budget:
        log(f"decoding the images of run {run.run_id} at {size}x{size}")
        pixels, labels, relpaths, splits = load_images(
            data,
            size,
            str(run.folder / "split.csv"),
            SPLITS,
            layout=run.config.get("layout", "classes"),
            labels=run.config.get("labels_file"),
            columns=columns,
            cache_dir=run.cache_dir,
        )
    else:
        log(
            f"the decoded images of run {run.run_id} at {size}x{size} ({format_bytes(needed)}) are over the memory budget "
            f"({format_bytes(budget)}): checking that each decodes, then decoding them per batch"
        )
        pixels, labels, relpaths, splits = _streamed_split(run, data, size, columns)
    index = {label: i for i, label in enumerate(run.labels)}
    keep = [i for i, label in enumerate(labels) if label in index]
    return (
        _subset(pixels, keep),
        np.array([index[labels[i]] for i in keep]),
        [relpaths[i] for i in keep],
        np.array([splits[i] for i in keep]),
        listed,
    )


def _streamed_split(run: LoadedRun, data: Path, size: int, columns):
    """The images `load_images` would decode (the run's split.csv, in discovery order) and that decode now."""
    from bottleneck.features.discover import discover_images
    from bottleneck.features.noise import decoder_log_in

    discovery = discover_images(
        data, layout=run.config.get("layout", "classes"), labels=run.config.get("labels_file"), columns=columns
    )
    saved = read_split_csv(run.folder / "split.csv")
    chosen = [
        (image, saved[image.relpath][1])
        for image in discovery.images
        if saved.get(image.relpath, (None, "unlisted"))[1] in SPLITS
    ]
    cache = run.cache_dir if run.cache_dir and os.path.isdir(run.cache_dir) else Path(tempfile.gettempdir())
    log_file = decoder_log_in(Path(cache), os.access(cache, os.W_OK))
    everything = _StreamedImages([image.path for image, _ in chosen], size, log_file)
    decodes = []
    for start in range(0, len(chosen), 256):  # a bounded pass: each image decoded once and let go
        stop_if_interrupted()
        rows = range(start, min(start + 256, len(chosen)))
        decodes += [_decode_or_none(everything.paths[i], size) is not None for i in rows]
    keep = [i for i, ok in enumerate(decodes) if ok]
    if not keep:
        raise DataError(f"no decodable images in {data} for the splits {', '.join(SPLITS)}")
    return (
        everything.subset(keep),
        [chosen[i][0].label for i in keep],
        [chosen[i][0].relpath for i in keep],
        [chosen[i][1] for i in keep],
    )
