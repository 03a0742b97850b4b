"""`bottleneck fine-tune`: phase two of transfer learning, from a run's backbone and its trained head.

The top layers of the backbone are unfrozen and the whole network trains on the run's own split:
optionally the head alone first (`head_epochs`), then the unfrozen layers in up to 4 groups, each
with its own optimizer (discriminative rates: the lowest group `lower_rate_factor` times slower than
the top), every rate on one cycle (linear warm-up, then cosine), label smoothing, optional AdamW
weight decay, BatchNorm frozen, its affine parameters trained (the default) or fully trained, early
stopping on validation loss, seeded augmentation. `learning_rate="auto"` runs fastai's learning-rate
finder first. With `gradual`, each epoch after the head's unfreezes the next group (ULMFiT).

Why the old recipe (Adam at 1e-5, 10 epochs, every layer at one rate) never moved: the parent's
logistic head is sharp (fitted to separate the few training images, its standardisation folded in,
about 50-60 logits per unit shift of every feature), and Adam moves every weight by about the rate
on each early step whatever its gradient, so one step at 1e-3 on any one conv layer of the demo's
small base shifted every feature by 1.5-1.9 of its standard deviation (logits by 10-16) and at 1e-5
the steps were too small to matter in 20 steps. Label smoothing keeps a gradient once the sharp head
fits the training images; enough steps at 1e-3 with warm-up then retrain the base past the jump.

This is the one command that re-reads images (through the same decoder as `features`). After
every epoch its state is saved in a work folder beside the runs, so Ctrl-C keeps the best epoch
so far, and running the same command again resumes where it stopped. The result is a run folder
like any other, whose `model.keras` is the whole network (pixels in, probabilities out).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck.backbones.build import import_tensorflow
from bottleneck.errors import BottleneckError, DataError, stop_if_interrupted
from bottleneck.learn.classifier import OUTPUT_NAME, build_classifier
from bottleneck.learn.metrics import misclassified, split_metrics
from bottleneck.features.shards import Columns
from bottleneck.learn.pretrain import load_images
from bottleneck.learn.run_folder import FINE_TUNED, LoadedRun, load_run
from bottleneck.learn.splits import SPLITS, read_split_csv

AUGMENTATIONS = ("flip", "crop", "brightness")
_CROP_FRACTION = 0.8  # "crop" keeps a random square of 80-100% of the side, resized back
_BRIGHTNESS_DELTA = 0.1 * 255


BN_MODES = ("frozen", "affine", "train")
AUTO = "auto"


@dataclass(frozen=True)
class FineTuneConfig:
    """What to unfreeze and how to train; checked once, before any work."""

    unfreeze: int | None = None  # the top N layers with weights; None with no unfreeze_from: all of them
    unfreeze_from: str | None = None  # or: this layer and every one after it
    learning_rate: float | str = 1e-3  # the top group's peak rate, or "auto": the learning-rate finder's choice
    epochs: int = 10  # with the base unfrozen, after the head's epochs
    batch_size: int = 16
    patience: int = 3
    augment: tuple[str, ...] = ()
    gradual: bool = False
    seed: int = 0
    head_epochs: int = 0  # first, the base frozen: the head alone
    bn: str = "affine"  # BatchNormalization: frozen (inference mode), affine (gamma/beta trained, statistics frozen), train
    lower_rate_factor: float = 10.0  # the lowest group's rate is the top rate divided by this (geometric in between)
    warmup: float = 0.3  # fraction of a phase's steps spent warming the rate up (one-cycle), then cosine down
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.unfreeze is not None and self.unfreeze_from is not None:
            raise DataError("give --unfreeze N or --unfreeze-from LAYER, not both")
        if self.unfreeze is not None and self.unfreeze < 1:
            raise DataError(f"--unfreeze must be at least 1; got {self.unfreeze}")
        if self.learning_rate != AUTO and not (isinstance(self.learning_rate, (int, float)) and
                                               math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise DataError(f"--learning-rate must be a positive number or auto; got {self.learning_rate}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.head_epochs < 0:
            raise DataError(f"--head-epochs must be 0 or more; got {self.head_epochs}")
        if self.bn not in BN_MODES:
            raise DataError(f"unknown --bn {self.bn}; choose from: {', '.join(BN_MODES)}")
        for name, low, high in (("lower_rate_factor", 1.0, 1e6), ("warmup", 0.0, 0.9), ("weight_decay", 0.0, 1.0),
                                ("label_smoothing", 0.0, 0.5)):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                raise DataError(f"--{name.replace('_', '-')} must be from {low:g} to {high:g}; got {value}")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise DataError(f"unknown --augment {', '.join(unknown)}; choose from: {', '.join(AUGMENTATIONS)}")

    def key(self) -> str:
        """Names the work folder: the same command resumes the same work."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class FineTuneResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    resumed_from_epoch: int = 0


def _leaf_layers(layer) -> list:
    """Every layer inside `layer`, nested models opened up, in order."""
    inner = getattr(layer, "layers", None)
    if not inner:
        return [layer]
    return [leaf for child in inner for leaf in _leaf_layers(child)]


def _feature_network(model):
    """The backbone part of a classifier built by `build_classifier`: its first nested model."""
    return next(layer for layer in model.layers if getattr(layer, "layers", None))


def tunable_layers(model) -> list:
    """The backbone's layers that hold trainable weights, BatchNormalization excluded, bottom to top."""
    _, keras = import_tensorflow()
    leaves = _leaf_layers(_feature_network(model))
    fixed = (keras.layers.BatchNormalization, keras.layers.Normalization, keras.layers.Rescaling)
    return [leaf for leaf in leaves if leaf.weights and not isinstance(leaf, fixed)
            and not leaf.name.startswith("bottleneck_")]


def choose_unfrozen(layers: list, config: FineTuneConfig) -> list:
    """The layers `config` unfreezes, bottom to top."""
    if config.unfreeze_from is not None:
        names = [layer.name for layer in layers]
        if config.unfreeze_from not in names:
            close = difflib.get_close_matches(config.unfreeze_from, names, n=5, cutoff=0.3) or names[-5:]
            raise DataError(f"--unfreeze-from {config.unfreeze_from!r} is not a trainable layer of this backbone; "
                            f"nearest names: {', '.join(close)}")
        return layers[names.index(config.unfreeze_from):]
    return layers[-config.unfreeze:] if config.unfreeze else list(layers)


def unfreeze_groups(unfrozen: list) -> list[list]:
    """The unfrozen layers in at most 4 groups of about equal size, the top group first: each group gets its own
    learning rate (lower groups smaller), and `gradual` unfreezes one more group per epoch."""
    if len(unfrozen) <= 1:
        return [unfrozen]
    count = min(4, len(unfrozen))
    bounds = np.linspace(len(unfrozen), 0, count + 1).round().astype(int)
    return [unfrozen[bounds[i + 1]:bounds[i]] for i in range(count)]


def group_rate_factors(count: int, lower_rate_factor: float) -> list[float]:
    """Each group's share of the top rate, the top group first: 1 down to 1/lower_rate_factor, geometrically."""
    if count <= 1:
        return [1.0] * count
    return [float(lower_rate_factor ** (-i / (count - 1))) for i in range(count)]


def _batchnorm_owners(model, tunable: list) -> list[tuple]:
    """(BatchNormalization layer, the tunable layer just below it, or None) for every BatchNorm of the backbone."""
    _, keras = import_tensorflow()
    wanted = {id(layer) for layer in tunable}
    owner, found = None, []
    for leaf in _leaf_layers(_feature_network(model)):
        if id(leaf) in wanted:
            owner = leaf
        elif isinstance(leaf, keras.layers.BatchNormalization):
            found.append((leaf, owner))
    return found


def set_trainable(model, unfrozen: list, bn: str = "frozen") -> None:
    """Freeze the whole network but `unfrozen` and the head. BatchNormalization stays in inference mode (its
    statistics frozen) but with `bn="train"`, where the BatchNorm layers just above unfrozen layers train."""
    _, keras = import_tensorflow()
    model.trainable = True
    wanted = {id(layer) for layer in unfrozen}
    backbone = {id(layer) for layer in _leaf_layers(_feature_network(model))}
    for layer in _leaf_layers(model):
        is_head = id(layer) not in backbone  # everything after the feature network
        layer.trainable = (id(layer) in wanted or is_head) and not isinstance(layer, keras.layers.BatchNormalization)
    if bn == "train":
        for layer, owner in _batchnorm_owners(model, unfrozen):
            layer.trainable = owner is not None


def rate_groups(model, groups: list[list], stage: int, bn: str, lower_rate_factor: float) -> list[tuple[float, list]]:
    """(rate factor, variables) per optimizer: the head at the top rate, then each unfrozen group of the backbone
    at its own share of it. With `bn="affine"` every BatchNorm's gamma and beta train too (as in fastai), at the
    rate of the group of the layer under it (the lowest unfrozen group's where that layer stays frozen)."""
    factors = group_rate_factors(len(groups), lower_rate_factor)
    active = groups[:stage]
    backbone = {id(layer) for layer in _leaf_layers(_feature_network(model))}
    head = [v for layer in _leaf_layers(model) if id(layer) not in backbone for v in layer.trainable_weights]
    found = [(1.0, head)]
    members = {id(layer): i for i, group in enumerate(active) for layer in group}
    per_group: list[list] = [[v for layer in group for v in layer.trainable_weights] for group in active]
    if active:
        for layer, owner in _batchnorm_owners(model, [leaf for group in active for leaf in group]):
            where = members.get(id(owner), len(active) - 1)
            if bn == "affine":
                per_group[where] += [v for v in (layer.gamma, layer.beta) if v is not None]
            elif bn == "train" and owner is not None:
                per_group[where] += list(layer.trainable_weights)
    found += [(factors[i], variables) for i, variables in enumerate(per_group) if variables]
    return found


def augmenter(tf, augment: tuple[str, ...], size: int):
    """Seeded augmentation of a batch, as one `tf.function` traced here, once.

    Run eagerly, `map_fn` builds a `TensorArray` per call, and a Ctrl-C inside one made TensorFlow
    print an "Object was never used" block at exit; in a graph, an interrupt lands between calls.
    """
    augment_batch = tf.function(lambda pixels, seeds: _augment_batch(tf, pixels, seeds, augment, size),
                                input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32),
                                                 tf.TensorSpec([None, 2], tf.int32)])
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
            image = tf.clip_by_value(tf.image.stateless_random_brightness(image, _BRIGHTNESS_DELTA, seed + 3), 0.0, 255.0)
        return image

    return tf.map_fn(one, (pixels, seeds), fn_output_signature=tf.float32)


def _epoch_batches(tf, pixels: np.ndarray, y: np.ndarray, config: FineTuneConfig, epoch: int, augment_batch=None):
    """The training batches of one epoch: shuffled and augmented (by `augment_batch`, see `augmenter`) from
    (seed, epoch) alone, so a resumed run sees exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(y))
    for start in range(0, len(order), config.batch_size):
        rows = order[start:start + config.batch_size]
        batch = tf.constant(_decode(pixels, rows).astype(np.float32))
        if augment_batch is not None:
            seeds = tf.constant(np.stack([np.full(len(rows), config.seed), epoch * len(y) + rows], 1), tf.int32)
            batch = augment_batch(batch, seeds)
        yield batch, y[rows]


def _choose_learning_rate(model, pixels, y, config: FineTuneConfig, groups: list[list], state: dict,
                          log: Callable[[str], None]) -> float:
    """The configured rate, or with "auto" the finder's (its curve kept in `state`, so a resumed run reuses it)."""
    if config.learning_rate != AUTO:
        return float(config.learning_rate)
    tf, _ = import_tensorflow()
    augment_batch = augmenter(tf, config.augment, pixels.shape[1]) if config.augment else None
    log(f"finding the learning rate: up to {FINDER_STEPS} batches at rates from {FINDER_LOW:g} to {FINDER_HIGH:g}")
    state["lr_find"] = find_learning_rate(model, pixels, y, config, groups, augment_batch)
    log(f"learning rate {state['lr_find']['chosen']:.3g} ({state['lr_find']['rule']}; steepest descent at "
        f"{state['lr_find']['steepest']:.3g})")
    return float(state["lr_find"]["chosen"])


class _WorkFolder:
    """Per-epoch state of an unfinished fine-tune: last and best weights, optimizer, history."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.state_file = folder / "state.json"

    def load_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def save(self, model, state: dict, best: bool, optimizer_variables: list) -> None:
        """Write this epoch's files under new names, then the state that names them, then drop older files:
        a run killed at any moment resumes from one consistent epoch."""
        self.folder.mkdir(parents=True, exist_ok=True)
        epoch = state["epoch"]
        names = {"last": f"last-{epoch}.weights.h5", "optimizer": f"optimizer-{epoch}.npz",
                 "best": f"best-{epoch}.weights.h5" if best else state.get("files", {}).get("best")}
        _save_weights_atomically(model, self.folder / names["last"])
        if best:
            _save_weights_atomically(model, self.folder / names["best"])
        tmp = self.folder / ".optimizer.tmp.npz"
        np.savez(tmp, **{f"v{i}": np.asarray(v) for i, v in enumerate(optimizer_variables)})
        os.replace(tmp, self.folder / names["optimizer"])
        state["files"] = names
        tmp_state = self.folder / ".state.json.tmp"
        tmp_state.write_text(json.dumps(state))
        os.replace(tmp_state, self.state_file)
        for stale in self.folder.iterdir():
            if stale.name not in set(names.values()) | {self.state_file.name}:
                stale.unlink(missing_ok=True)

    def path(self, state: dict, kind: str) -> Path | None:
        name = state.get("files", {}).get(kind)
        return self.folder / name if name and (self.folder / name).exists() else None

    def restore_optimizer(self, variables: list, state: dict) -> bool:
        try:
            saved = np.load(self.path(state, "optimizer"))
        except (OSError, TypeError):
            return False
        if len(saved.files) != len(variables) or any(saved[f"v{i}"].shape != tuple(v.shape) for i, v in enumerate(variables)):
            return False
        for i, variable in enumerate(variables):
            variable.assign(saved[f"v{i}"])
        return True


def _without_optimizer(model):
    """The same network, uncompiled: a saved optimizer would only make Keras warn when the file is loaded."""
    _, keras = import_tensorflow()
    clean = keras.models.clone_model(model)
    clean.set_weights(model.get_weights())
    return clean


def validation_loss(model, pixels: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the true labels, computed the same way for epoch 0 and every later epoch."""
    proba = np.clip(_predict(model, pixels), 1e-7, 1 - 1e-7)
    return float(-np.mean(np.log(proba[np.arange(len(y)), y])))


def _starting_state(model, pixels: np.ndarray, y: np.ndarray, work: _WorkFolder) -> dict:
    """Epoch 0 is the parent run itself: fine-tuning keeps it when no epoch beats its validation loss."""
    state = {"epoch": 0, "best_loss": float("inf"), "best_epoch": 0, "waited": 0, "history": {"loss": [], "val_loss": []}}
    if len(y):
        state["best_loss"] = validation_loss(model, pixels, y)
        work.folder.mkdir(parents=True, exist_ok=True)
        _save_weights_atomically(model, work.folder / "best-0.weights.h5")
        state["files"] = {"best": "best-0.weights.h5"}
    return state


PARENT_FILES = ("head.npz", "model.keras", "labels.json")  # what a run's head is made of, whichever it has


def parent_identity(run: LoadedRun) -> str:
    """A digest of the parent run's head and backbone: a resumed fine-tune must start from the same ones."""
    digest = hashlib.sha256(f"{run.fingerprint}\n{json.dumps(run.labels)}".encode())
    for name in PARENT_FILES:
        path = run.folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _resumable_state(work: _WorkFolder, parent: str, run_id: str, log: Callable[[str], None]) -> dict | None:
    """The saved state to resume from, or None: none saved, or saved from a parent whose head has changed since."""
    state = work.load_state()
    if state is None or work.path(state, "last") is None:
        return None
    if state.get("parent") != parent:
        log(f"warning: the head or backbone of run {run_id} changed since {work.folder} saved epoch {state['epoch']} "
            "(a file of the run was replaced): its epochs belong to the old parent, so fine-tuning starts again")
        return None
    return state


def _save_weights_atomically(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)


class _StreamedImages:
    """The split's images decoded per batch through the one decoder (the split held as paths, not pixels):
    what fine-tune uses when the decoded split would not fit in the memory budget."""

    def __init__(self, paths: list[Path], size: int, log_file: Path):
        self.paths, self.size, self.log_file = paths, size, log_file
        self.shape = (len(paths), size, size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index) -> "_StreamedImages":
        rows = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        return _StreamedImages([self.paths[i] for i in rows], self.size, self.log_file)

    def decode(self, rows) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        from bottleneck.features.noise import decoder_noise_to

        with ThreadPoolExecutor() as pool, decoder_noise_to(self.log_file):
            pixels = list(pool.map(_decode_or_none, [self.paths[i] for i in rows], [self.size] * len(rows)))
        for i, found in zip(rows, pixels):
            if found is None:
                raise DataError(f"{self.paths[i]} decoded when fine-tuning began and cannot be decoded now; "
                                "restore it and run the same command again (finished epochs are kept)")
        return np.stack(pixels) if pixels else np.zeros((0, self.size, self.size, 3), np.uint8)


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
        return model.predict(pixels.astype(np.float32), batch_size=64, verbose=0)
    chunks = [model.predict(pixels.decode(np.arange(start, min(start + 256, len(pixels)))).astype(np.float32),
                            batch_size=64, verbose=0) for start in range(0, len(pixels), 256)]
    return np.concatenate(chunks) if chunks else np.zeros((0, int(model.output_shape[-1])), np.float32)


def _load_split_pixels(run: LoadedRun, size: int, log: Callable[[str], None], max_memory: int | None = None):
    """The run's split, decoded in memory when it fits in `max_memory` (default: a quarter of what is available;
    the training rows are copied once, so twice the split), else as a `_StreamedImages` decoded per batch."""
    from bottleneck.learn.memory import default_budget, human

    data = run.data_dir or Path("")
    if not data.is_dir():
        raise DataError(f"the images run {run.run_id} was trained on are not at {data} any more; fine-tuning re-reads them")
    listed = len(read_split_csv(run.folder / "split.csv"))
    budget = max_memory if max_memory is not None else default_budget()
    needed = 2 * listed * size * size * 3
    columns = Columns(**run.config["columns"]) if run.config.get("columns") else None
    if needed <= budget:
        log(f"decoding the images of run {run.run_id} at {size}x{size}")
        pixels, labels, relpaths, splits = load_images(data, size, str(run.folder / "split.csv"), SPLITS,
                                                       layout=run.config.get("layout", "classes"),
                                                       labels=run.config.get("labels_file"), columns=columns,
                                                       cache_dir=run.cache_dir)
    else:
        log(f"the decoded images of run {run.run_id} at {size}x{size} ({human(needed)}) are over the memory budget "
            f"({human(budget)}): checking that each decodes, then decoding them per batch")
        pixels, labels, relpaths, splits = _streamed_split(run, data, size, columns)
    index = {label: i for i, label in enumerate(run.labels)}
    keep = [i for i, label in enumerate(labels) if label in index]
    return (_subset(pixels, keep), np.array([index[labels[i]] for i in keep]), [relpaths[i] for i in keep],
            np.array([splits[i] for i in keep]), listed)


def _streamed_split(run: LoadedRun, data: Path, size: int, columns):
    """The images `load_images` would decode (the run's split.csv, in discovery order) and that decode now."""
    from bottleneck.features.discover import discover_images
    from bottleneck.features.noise import decoder_log_in

    discovery = discover_images(data, layout=run.config.get("layout", "classes"), labels=run.config.get("labels_file"),
                                columns=columns)
    saved = read_split_csv(run.folder / "split.csv")
    chosen = [(image, saved[image.relpath][1]) for image in discovery.images
              if saved.get(image.relpath, (None, "unlisted"))[1] in SPLITS]
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
    return (everything.subset(keep), [chosen[i][0].label for i in keep], [chosen[i][0].relpath for i in keep],
            [chosen[i][1] for i in keep])


class _Trainer:
    """The optimizers of one stage (Adam, or AdamW with weight decay; one per rate group) and its training step."""

    def __init__(self, model, groups: list[tuple[float, list]], config: FineTuneConfig):
        tf, keras = import_tensorflow()

        def optimizer():
            if config.weight_decay:
                return keras.optimizers.AdamW(1e-3, weight_decay=config.weight_decay)
            return keras.optimizers.Adam(1e-3)

        self.factors = [factor for factor, _ in groups]
        self.optimizers = [optimizer() for _ in groups]
        for each, (_, variables) in zip(self.optimizers, groups):
            each.build(variables)
        variables = [v for _, group in groups for v in group]
        sizes = np.cumsum([0] + [len(group) for _, group in groups])
        classes = int(model.output_shape[-1])
        loss_function = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)

        @tf.function
        def step(pixels, labels):
            with tf.GradientTape() as tape:
                tape.watch([v.value for v in variables])  # BatchNorm's gamma and beta train with the layer frozen
                loss = loss_function(tf.one_hot(labels, classes), model(pixels, training=True))
            gradients = tape.gradient(loss, [v.value for v in variables])
            for each, start, end in zip(self.optimizers, sizes[:-1], sizes[1:]):
                each.apply_gradients(zip(gradients[start:end], variables[start:end]))
            return loss

        self._step = step

    @property
    def variables(self) -> list:
        return [v for each in self.optimizers for v in each.variables]

    def step(self, pixels, labels, rate: float) -> float:
        for each, factor in zip(self.optimizers, self.factors):
            each.learning_rate = rate * factor
        return float(self._step(pixels, np.asarray(labels, np.int32)))


def scheduled_rate(peak: float, step: int, total: int, warmup: float) -> float:
    """One cycle: linear warm-up from peak/25 over the first `warmup` of the steps, then cosine down to ~0."""
    warm = int(round(warmup * total))
    if step < warm:
        return peak * (1 / 25 + (1 - 1 / 25) * step / warm)
    progress = (step - warm) / max(1, total - warm)
    return peak * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress)))


FINDER_STEPS, FINDER_LOW, FINDER_HIGH = 100, 1e-7, 1.0


def find_learning_rate(model, pixels: np.ndarray, y: np.ndarray, config: FineTuneConfig, groups: list[list],
                       augment_batch=None, steps: int = FINDER_STEPS) -> dict:
    """fastai's `lr_find`: train the fully unfrozen network for `steps` batches at rates growing exponentially
    from 1e-7 to 1, stop once the smoothed loss passes 4x its minimum, put the weights back and choose fastai's
    `valley` (the minimum and the steepest-descent point, skipping the first tenth, are recorded too; the old
    minimum/10 rule was measured to choose 1e-8 on the demo's sharp parent, misled by one lucky first batch)."""
    tf, keras = import_tensorflow()
    weights = model.get_weights()
    set_trainable(model, [layer for group in groups for layer in group], config.bn)
    trainer = _Trainer(model, rate_groups(model, groups, len(groups), config.bn, config.lower_rate_factor), config)
    rates = FINDER_LOW * (FINDER_HIGH / FINDER_LOW) ** (np.arange(steps) / (steps - 1))

    def batches():
        for sweep in range(10**6):
            yield from _epoch_batches(tf, pixels, y, config, 10**6 + sweep, augment_batch)

    tried, losses, smoothed, average = [], [], [], 0.0
    for i, (rate, (batch, labels)) in enumerate(zip(rates, batches())):
        stop_if_interrupted()
        loss = trainer.step(batch, labels, float(rate))
        average = 0.98 * average + 0.02 * loss
        tried.append(float(rate))
        losses.append(loss)
        smoothed.append(average / (1 - 0.98 ** (i + 1)))
        if not math.isfinite(smoothed[-1]) or (i > 10 and smoothed[-1] > 4 * min(smoothed)):
            break
    model.set_weights(weights)  # the sweep leaves nothing behind, BatchNorm statistics included
    keras.utils.set_random_seed(config.seed)
    skip = max(1, len(tried) // 10)  # the first points average only a batch or two: noise, not a minimum
    curve = np.array([value if math.isfinite(value) else np.inf for value in smoothed])
    lowest = skip + int(np.argmin(curve[skip:])) if len(curve) > skip else int(np.argmin(curve))
    slopes = np.gradient(curve[skip:lowest + 1], np.log(tried[skip:lowest + 1])) if lowest - skip >= 2 else np.zeros(1)
    steepest = tried[skip + int(np.argmin(slopes))] if lowest - skip >= 2 else tried[lowest]
    return {"rates": tried, "losses": losses, "smoothed": [float(v) for v in smoothed], "minimum": tried[lowest],
            "steepest": steepest, "valley": tried[_valley(curve)], "chosen": tried[_valley(curve)],
            "rule": "fastai's valley: halfway along the longest run of falling smoothed loss"}


def _valley(curve: np.ndarray) -> int:
    """fastai's `valley` suggestion: the longest decreasing subsequence of the loss, then halfway along it
    (`start + sections + sections / 2` with a third as a section, as fastai computes it)."""
    longest = np.ones(len(curve), dtype=int)
    end = 0
    for i in range(1, len(curve)):
        for j in range(i):
            if curve[i] < curve[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[end] < longest[i]:
            end = i
    start = end - longest[end]
    section = (end - start) / 3
    return max(0, min(len(curve) - 1, start + int(section) + int(section / 2)))


def _progress(total_steps: int, done_steps: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total_steps, initial=done_steps, unit="batch", desc="fine-tune", file=sys.stderr, dynamic_ncols=True)


def _stage(epoch: int, config: FineTuneConfig, groups: list[list]) -> int:
    """How many groups train at `epoch`: none during the head's epochs, then all (or one more per epoch, gradual)."""
    if epoch < config.head_epochs:
        return 0
    return min(epoch - config.head_epochs + 1, len(groups)) if config.gradual else len(groups)


def _train(model, pixels, y, mask, config: FineTuneConfig, groups: list[list], work: _WorkFolder, state: dict,
           log: Callable[[str], None], on_epoch_end: Callable[[int], None] | None) -> dict:
    tf, _ = import_tensorflow()
    steps = math.ceil(mask["train"].sum() / config.batch_size)
    total = config.head_epochs + config.epochs
    bar = _progress(steps * total, steps * state["epoch"])
    validation = (_subset(pixels, mask["validation"]), y[mask["validation"]])
    train_pixels, train_y = _subset(pixels, mask["train"]), y[mask["train"]]  # one copy, not one per epoch
    augment_batch = augmenter(tf, config.augment, pixels.shape[1]) if config.augment else None
    peak = state["learning_rate"]
    trainer, trained_stage = None, None
    try:
        while state["epoch"] < total and state["waited"] < config.patience:
            epoch, started = state["epoch"], time.perf_counter()
            stage, head_phase = _stage(epoch, config, groups), epoch < config.head_epochs
            if trained_stage != stage:
                set_trainable(model, [layer for group in groups[:stage] for layer in group], config.bn if stage else "frozen")
                trainer = _Trainer(model, rate_groups(model, groups, stage, config.bn, config.lower_rate_factor), config)
                # Resuming mid-stage: the optimizers carry on as they would have; at a new stage they start afresh anyway.
                if (trained_stage is None and epoch > 0 and _stage(epoch - 1, config, groups) == stage
                        and (epoch - 1 < config.head_epochs) == head_phase and not work.restore_optimizer(trainer.variables, state)):
                    log("note: the optimizer state could not be restored; it starts afresh")
                trained_stage = stage
            phase_epoch, phase_epochs = (epoch, config.head_epochs) if head_phase else (epoch - config.head_epochs, config.epochs)
            losses = []
            for k, (batch, labels) in enumerate(_epoch_batches(tf, train_pixels, train_y, config, epoch, augment_batch)):
                stop_if_interrupted()  # a KeyboardInterrupt TensorFlow swallowed in a callback
                rate = scheduled_rate(peak, phase_epoch * steps + k, phase_epochs * steps, config.warmup)
                losses.append(trainer.step(batch, labels, rate))
                if bar is not None:
                    bar.update(1)
            val_loss = validation_loss(model, *validation) if len(validation[1]) else losses[-1]
            better = val_loss < state["best_loss"]
            state["history"]["loss"].append(float(np.mean(losses)))
            state["history"]["val_loss"].append(val_loss)
            state["history"].setdefault("seconds", []).append(time.perf_counter() - started)
            # The head's epochs and the warm-up are not held against patience: the rate is still rising.
            patient = head_phase or (phase_epoch + 1) * steps <= config.warmup * phase_epochs * steps
            state.update(epoch=epoch + 1, best_loss=min(val_loss, state["best_loss"]),
                         best_epoch=epoch + 1 if better else state["best_epoch"],
                         waited=0 if better or patient else state["waited"] + 1)
            work.save(model, state, best=better, optimizer_variables=trainer.variables)
            message = f"epoch {epoch + 1}/{total}: loss {np.mean(losses):.4f}, val_loss {val_loss:.4f}"
            bar.set_postfix_str(message) if bar is not None else log(message)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    except KeyboardInterrupt:
        log(f"interrupted after epoch {state['epoch']}; the best epoch so far ({state['best_epoch']}) is kept in "
            f"{work.folder}: run the same command again to resume")
        raise
    finally:
        if bar is not None:
            bar.close()
    return state


def _evaluate(model, pixels, y, relpaths, mask, labels: list[str]) -> tuple[dict, tuple]:
    metrics: dict = {}
    test_rows: tuple = ([], [], np.zeros((0, len(labels))))
    for name in SPLITS:
        rows = np.flatnonzero(mask[name])
        proba = _predict(model, _subset(pixels, rows)).astype(np.float64) if len(rows) else np.zeros((0, len(labels)))
        truth = [labels[i] for i in y[rows]]
        metrics[name] = split_metrics(proba, truth, labels)
        if name == "test":
            test_rows = ([relpaths[i] for i in rows], truth, proba)
    return metrics, test_rows



@contextlib.contextmanager
def _one_at_a_time(folder: Path, run_id: str):
    """Hold the lock of a fine-tune's work folder; one line if the same fine-tune is running in another process."""
    from bottleneck.features.store import exclusive_lock

    def busy(holder: str) -> BottleneckError:
        return BottleneckError(f"the same fine-tune of run {run_id} is already running (pid {holder}); wait for it "
                               "to finish (its epochs are kept) or change a setting to start another")

    lock = folder.parent / (folder.name + ".lock")
    with exclusive_lock(lock, timeout=0, busy=busy):
        try:
            yield
        finally:
            if not folder.exists():  # finished: nothing left to resume, so nothing of ours stays in the runs folder
                lock.unlink(missing_ok=True)

def fine_tune(run_dir: str | os.PathLike, config: FineTuneConfig = FineTuneConfig(), runs_dir: str | os.PathLike | None = None,
              log: Callable[[str], None] = lambda message: None, argv: list[str] | None = None,
              on_epoch_end: Callable[[int], None] | None = None, max_memory: int | None = None) -> FineTuneResult:
    """Fine-tune a run end to end and write a new run folder (in `runs_dir`, default beside the parent).

    The run's split is decoded once and held in memory when twice its decoded size fits in `max_memory` bytes
    (default: a quarter of the memory available); otherwise its images are decoded per batch (same results)."""
    from bottleneck.learn.run_folder import (PREDICTIONS_FILE, new_run, prepare_runs_dir, relative_paths,
                                             write_lr_find, write_predictions_csv, write_run_record)
    from bottleneck.learn.runs import versions

    tf, keras = import_tensorflow()
    run = load_run(run_dir)
    if run.multi_label:
        raise BottleneckError(f"run {run.run_id} is multi-label, and fine-tune does not support multi-label runs yet "
                              "(it trains one label per image)")
    if run.spec.kind == "pixels" and not run.fine_tuned:
        raise BottleneckError("a run on raw pixels has no backbone to fine-tune; train a head on a network's features")
    runs = prepare_runs_dir(runs_dir if runs_dir else run.folder.parent)  # checked before hours of training
    work = _WorkFolder(runs / f".fine-tune-{run.run_id}-{config.key()}")
    with _one_at_a_time(work.folder, run.run_id):
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()
        model = build_classifier(run)
        size = int(model.input_shape[1])
        unfrozen = choose_unfrozen(tunable_layers(model), config)
        groups = unfreeze_groups(unfrozen)
        pixels, y, relpaths, splits, listed = _load_split_pixels(run, size, log, max_memory)
        mask = {name: splits == name for name in SPLITS}
        if not mask["train"].any():
            raise DataError(f"run {run.run_id} has no training image left to fine-tune on")
        parent = parent_identity(run)
        state = _resumable_state(work, parent, run.run_id, log)
        resumed = 0
        if state is not None:
            model.load_weights(work.path(state, "last"))
            resumed = state["epoch"]
            log(f"resuming from {work.folder} after epoch {resumed} (best epoch {state['best_epoch']})")
        else:
            state = _starting_state(model, _subset(pixels, mask["validation"]), y[mask["validation"]], work)
        state["parent"] = parent
        started = time.perf_counter()
        if "learning_rate" not in state:
            state["learning_rate"] = _choose_learning_rate(model, _subset(pixels, mask["train"]), y[mask["train"]], config, groups,
                                                           state, log)
        log(f"fine-tuning {len(unfrozen)} backbone layers (from {unfrozen[0].name if unfrozen else '-'}) and the head on "
            f"{int(mask['train'].sum())} images, {config.head_epochs} head epochs then {config.epochs} at most, "
            f"learning rate {state['learning_rate']:.3g} (lower groups down to 1/{config.lower_rate_factor:g} of it), "
            f"BatchNorm {config.bn}")
        state = _train(model, pixels, y, mask, config, groups, work, state, log, on_epoch_end)
        if work.path(state, "best") is not None:
            import warnings

            with warnings.catch_warnings():  # epoch 0's weights were saved before compiling: no optimizer to restore
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(work.path(state, "best"))
        set_trainable(model, [])
        split_scores, test_rows = _evaluate(model, pixels, y, relpaths, mask, run.labels)
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if v not in (None, ())}
        metrics = {"head": "fine-tune", "params": params,
                   "seed": config.seed, "training_seconds": time.perf_counter() - started, "splits": split_scores,
                   "excluded": {"not_decoded": listed - len(relpaths)},
                   "misclassified": misclassified(test_rows[2], test_rows[1], test_rows[0], run.labels),
                   "history": state["history"], "best_epoch": state["best_epoch"], "parent_run": run.run_id,
                   "unfrozen_layers": [layer.name for layer in unfrozen],
                   "pretrained": bool(run.spec.pretrained), "warning": "" if run.spec.pretrained else run.spec.random_weights_warning}
        if state.get("lr_find"):
            metrics["lr_find"] = {k: state["lr_find"][k] for k in ("minimum", "steepest", "valley", "chosen", "rule")}
        metrics["learning_rate"] = state["learning_rate"]
        with new_run(runs, "fine-tune") as (final, staging):
            if state.get("lr_find"):
                write_lr_find(staging, state["lr_find"])
            _without_optimizer(model).save(staging / "model.keras")
            (staging / "labels.json").write_text(json.dumps(run.labels))
            shutil.copyfile(run.folder / "split.csv", staging / "split.csv")
            write_predictions_csv(staging / PREDICTIONS_FILE, *test_rows, run.labels)
            config_json = {
                "kind": FINE_TUNED, "command": argv if argv is not None else sys.argv, "parent_run": run.run_id,
                "parent_dir": str(run.folder.absolute()), "data": str(run.data_dir) if run.data_dir else None,
                "head": "fine-tune", "fine_tune": metrics["params"], "seed": config.seed, "model": "model.keras",
                "output_layer": OUTPUT_NAME, "cache": str(run.cache_dir.absolute()),
                "relative": relative_paths(final, cache=run.cache_dir, data=run.data_dir),
                "fingerprint": run.fingerprint, "fine_tuned_from": {"run": run.run_id, "fingerprint": run.fingerprint},
                "backbone_spec": run.config.get("backbone_spec"), "backbone": run.config.get("backbone"), "versions": versions(),
            }
            write_run_record(staging, config_json, metrics)
        shutil.rmtree(work.folder, ignore_errors=True)
        return FineTuneResult(final, metrics, resumed)
