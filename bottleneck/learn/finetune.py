"""`bottleneck fine-tune`: phase two of transfer learning, from a run's backbone and its trained head.

The top layers of the backbone are unfrozen (every BatchNormalization layer stays frozen, so it
runs in inference mode) and the whole network trains gently on the run's own split: Adam at a
low learning rate, early stopping on validation loss, seeded augmentation. With `gradual`, the
first epoch trains the head alone and each later epoch unfreezes the next group of layers
(ULMFiT's gradual unfreezing; fastai's `fine_tune` also trains the head first).

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


@dataclass(frozen=True)
class FineTuneConfig:
    """What to unfreeze and how to train; checked once, before any work."""

    unfreeze: int | None = None  # the top N layers with weights; None with no unfreeze_from: all of them
    unfreeze_from: str | None = None  # or: this layer and every one after it
    learning_rate: float = 1e-5
    epochs: int = 10
    batch_size: int = 16
    patience: int = 3
    augment: tuple[str, ...] = ()
    gradual: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.unfreeze is not None and self.unfreeze_from is not None:
            raise DataError("give --unfreeze N or --unfreeze-from LAYER, not both")
        if self.unfreeze is not None and self.unfreeze < 1:
            raise DataError(f"--unfreeze must be at least 1; got {self.unfreeze}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise DataError(f"--learning-rate must be a positive number; got {self.learning_rate}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
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


def unfreeze_groups(unfrozen: list, gradual: bool) -> list[list]:
    """Groups unfrozen one per epoch from the top with `gradual` (at most 4), else one group."""
    if not gradual or len(unfrozen) <= 1:
        return [unfrozen]
    count = min(4, len(unfrozen))
    bounds = np.linspace(len(unfrozen), 0, count + 1).round().astype(int)
    return [unfrozen[bounds[i + 1]:bounds[i]] for i in range(count)]


def set_trainable(model, unfrozen: list) -> None:
    """Freeze the whole network but `unfrozen` and the head; BatchNormalization stays frozen everywhere."""
    _, keras = import_tensorflow()
    model.trainable = True
    wanted = {id(layer) for layer in unfrozen}
    backbone = {id(layer) for layer in _leaf_layers(_feature_network(model))}
    for layer in _leaf_layers(model):
        is_head = id(layer) not in backbone  # everything after the feature network
        layer.trainable = (id(layer) in wanted or is_head) and not isinstance(layer, keras.layers.BatchNormalization)


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
        batch = tf.constant(pixels[rows].astype(np.float32))
        if augment_batch is not None:
            seeds = tf.constant(np.stack([np.full(len(rows), config.seed), epoch * len(y) + rows], 1), tf.int32)
            batch = augment_batch(batch, seeds)
        yield batch, y[rows]


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

    def save(self, model, state: dict, best: bool) -> None:
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
        np.savez(tmp, **{f"v{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)})
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

    def restore_optimizer(self, model, state: dict) -> bool:
        try:
            saved = np.load(self.path(state, "optimizer"))
        except (OSError, TypeError):
            return False
        variables = model.optimizer.variables
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
    proba = np.clip(model.predict(pixels.astype(np.float32), batch_size=64, verbose=0), 1e-7, 1 - 1e-7)
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


def _load_split_pixels(run: LoadedRun, size: int, log: Callable[[str], None]):
    data = run.data_dir or Path("")
    if not data.is_dir():
        raise DataError(f"the images run {run.run_id} was trained on are not at {data} any more; fine-tuning re-reads them")
    log(f"decoding the images of run {run.run_id} at {size}x{size}")
    listed = len(read_split_csv(run.folder / "split.csv"))
    pixels, labels, relpaths, splits = load_images(data, size, str(run.folder / "split.csv"), SPLITS,
                                                   layout=run.config.get("layout", "classes"),
                                                   labels=run.config.get("labels_file"),
                                                   columns=Columns(**run.config["columns"]) if run.config.get("columns") else None,
                                                   cache_dir=run.cache_dir)
    index = {label: i for i, label in enumerate(run.labels)}
    keep = [i for i, label in enumerate(labels) if label in index]
    return (pixels[keep], np.array([index[labels[i]] for i in keep]), [relpaths[i] for i in keep],
            np.array([splits[i] for i in keep]), listed)


def _compile(model, learning_rate: float) -> None:
    _, keras = import_tensorflow()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")


def _progress(total_steps: int, done_steps: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total_steps, initial=done_steps, unit="batch", desc="fine-tune", file=sys.stderr, dynamic_ncols=True)


def _train(model, pixels, y, mask, config: FineTuneConfig, groups: list[list], work: _WorkFolder, state: dict,
           log: Callable[[str], None], on_epoch_end: Callable[[int], None] | None) -> dict:
    tf, _ = import_tensorflow()
    steps = math.ceil(mask["train"].sum() / config.batch_size)
    bar = _progress(steps * config.epochs, steps * state["epoch"])
    validation = (pixels[mask["validation"]], y[mask["validation"]])
    train_pixels, train_y = pixels[mask["train"]], y[mask["train"]]  # one copy, not one per epoch
    augment_batch = augmenter(tf, config.augment, pixels.shape[1]) if config.augment else None
    compiled_for = None
    try:
        while state["epoch"] < config.epochs and state["waited"] < config.patience:
            epoch = state["epoch"]
            stage = min(epoch, len(groups)) if config.gradual else 1
            if compiled_for != stage:
                set_trainable(model, [layer for group in groups[:stage] for layer in group])
                _compile(model, config.learning_rate)
                model.optimizer.build(model.trainable_variables)
                previous_stage = min(epoch - 1, len(groups)) if config.gradual else 1
                # Resuming mid-stage: the optimizer carries on as it would have; at a new stage it starts afresh anyway.
                if compiled_for is None and epoch > 0 and previous_stage == stage and not work.restore_optimizer(model, state):
                    log("note: the optimizer state could not be restored; it starts afresh")
                compiled_for = stage
            losses = []
            for batch, labels in _epoch_batches(tf, train_pixels, train_y, config, epoch, augment_batch):
                stop_if_interrupted()  # a KeyboardInterrupt TensorFlow swallowed in a callback
                losses.append(float(model.train_on_batch(batch, labels)))
                if bar is not None:
                    bar.update(1)
            val_loss = validation_loss(model, *validation) if len(validation[1]) else losses[-1]
            better = val_loss < state["best_loss"]
            state["history"]["loss"].append(float(np.mean(losses)))
            state["history"]["val_loss"].append(val_loss)
            state.update(epoch=epoch + 1, best_loss=min(val_loss, state["best_loss"]),
                         best_epoch=epoch + 1 if better else state["best_epoch"], waited=0 if better else state["waited"] + 1)
            work.save(model, state, best=better)
            message = f"epoch {epoch + 1}/{config.epochs}: loss {np.mean(losses):.4f}, val_loss {val_loss:.4f}"
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
        proba = model.predict(pixels[rows].astype(np.float32), batch_size=64, verbose=0).astype(np.float64) if len(rows) else np.zeros((0, len(labels)))
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
              on_epoch_end: Callable[[int], None] | None = None) -> FineTuneResult:
    """Fine-tune a run end to end and write a new run folder (in `runs_dir`, default beside the parent)."""
    from bottleneck.learn.run_folder import (PREDICTIONS_FILE, new_run, prepare_runs_dir, relative_paths,
                                             write_predictions_csv, write_run_record)
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
        groups = unfreeze_groups(unfrozen, config.gradual)
        pixels, y, relpaths, splits, listed = _load_split_pixels(run, size, log)
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
            state = _starting_state(model, pixels[mask["validation"]], y[mask["validation"]], work)
        state["parent"] = parent
        log(f"fine-tuning {len(unfrozen)} backbone layers (from {unfrozen[0].name if unfrozen else '-'}) and the head on "
            f"{int(mask['train'].sum())} images, {config.epochs} epochs at most, learning rate {config.learning_rate:g}")
        started = time.perf_counter()
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
        with new_run(runs, "fine-tune") as (final, staging):
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
