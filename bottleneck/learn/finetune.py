"""`bottleneck fine-tune`: phase two of transfer learning, from a run's backbone and its trained head.

The top layers of the backbone are unfrozen and the whole network trains on the run's own split:
optionally the head alone first (`head_epochs`), then the unfrozen layers in up to 4 groups, each
with its own optimizer (discriminative rates: the lowest group `lower_rate_factor` times slower than
the top), every rate on one cycle (linear warm-up, then cosine), label smoothing, optional AdamW
weight decay, BatchNorm frozen, its affine parameters trained (the default) or fully trained, early
stopping on validation loss, seeded augmentation. `learning_rate="auto"` runs fastai's learning-rate
finder first. With `gradual`, each epoch after the head's unfreezes the next group (ULMFiT).
A sharp logreg parent is softened first (`soften`: its logits divided by the temperature fitted on
validation; same predictions, and a gradient left for the base).

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

from bottleneck import bounds, naming
from bottleneck.backbones.build import import_tensorflow
from bottleneck.errors import BottleneckError, DataError, stop_if_interrupted
from bottleneck.learn.classifier import OUTPUT_NAME, build_classifier
from bottleneck.learn.finetune_images import (
    AUGMENTATIONS,
    _epoch_batches,
    _load_split_pixels,
    _predict,
    _subset,
    augmenter,
)
from bottleneck.learn.finetune_network import (
    choose_unfrozen,
    rate_groups,
    set_trainable,
    soften_head,
    tunable_layers,
    unfreeze_groups,
)
from bottleneck.learn.finetune_work import (
    _one_at_a_time,
    _resumable_state,
    _starting_state,
    _without_optimizer,
    _WorkFolder,
    parent_identity,
    validation_loss,
)
from bottleneck.learn.metrics import misclassified, split_metrics
from bottleneck.learn.run_folder import FINE_TUNED, load_run
from bottleneck.learn.splits import SPLITS

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
    bn: str = (
        "affine"  # BatchNormalization: frozen (inference mode), affine (gamma/beta trained, statistics frozen), train
    )
    lower_rate_factor: float = 10.0  # the lowest group's rate is the top rate divided by this (geometric in between)
    warmup: float = 0.3  # fraction of a phase's steps spent warming the rate up (one-cycle), then cosine down
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    label_smoothing: float = 0.1
    soften: bool = True  # divide a sharp logreg head's logits by the temperature fitted on validation (never sharpen)

    def __post_init__(self) -> None:
        if self.unfreeze is not None and self.unfreeze_from is not None:
            raise DataError("give --unfreeze N or --unfreeze-from LAYER, not both")
        if self.learning_rate != AUTO:
            bounds.LEARNING_RATE.check(
                self.learning_rate, "--learning-rate", DataError, f"{bounds.LEARNING_RATE.must}, or auto"
            )
        for name, interval in self._bounded().items():
            if getattr(self, name) is not None:
                interval.check(getattr(self, name), f"--{name.replace('_', '-')}", DataError)
        if self.bn not in BN_MODES:
            raise DataError(f"unknown --bn {self.bn}; choose from: {', '.join(BN_MODES)}")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise DataError(f"unknown --augment {', '.join(unknown)}; choose from: {', '.join(AUGMENTATIONS)}")

    @staticmethod
    def _bounded() -> dict[str, bounds.Interval]:
        """The numeric fields and their declared bounds (`bottleneck.bounds`), checked in this order."""
        return {
            "unfreeze": bounds.UNFREEZE,
            "epochs": bounds.EPOCHS,
            "batch_size": bounds.BATCH_SIZE,
            "patience": bounds.PATIENCE,
            "head_epochs": bounds.HEAD_EPOCHS,
            "lower_rate_factor": bounds.LOWER_RATE_FACTOR,
            "warmup": bounds.WARMUP,
            "weight_decay": bounds.WEIGHT_DECAY,
            "label_smoothing": bounds.LABEL_SMOOTHING,
        }

    def key(self) -> str:
        """Names the work folder: the same command resumes the same work."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class FineTuneResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    resumed_from_epoch: int = 0


def _choose_learning_rate(
    model, pixels, y, config: FineTuneConfig, groups: list[list], state: dict, log: Callable[[str], None]
) -> float:
    """The configured rate, or with "auto" the finder's (its curve kept in `state`, so a resumed run reuses it)."""
    if config.learning_rate != AUTO:
        return float(config.learning_rate)
    tf, _ = import_tensorflow()
    augment_batch = augmenter(tf, config.augment, pixels.shape[1]) if config.augment else None
    log(f"finding the learning rate: up to {FINDER_STEPS} batches at rates from {FINDER_LOW:g} to {FINDER_HIGH:g}")
    state["lr_find"] = find_learning_rate(model, pixels, y, config, groups, augment_batch)
    log(
        f"learning rate {state['lr_find']['chosen']:.3g} ({state['lr_find']['rule']}; steepest descent at "
        f"{state['lr_find']['steepest']:.3g})"
    )
    return float(state["lr_find"]["chosen"])


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


def find_learning_rate(
    model,
    pixels: np.ndarray,
    y: np.ndarray,
    config: FineTuneConfig,
    groups: list[list],
    augment_batch=None,
    steps: int = FINDER_STEPS,
) -> dict:
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
    slopes = (
        np.gradient(curve[skip : lowest + 1], np.log(tried[skip : lowest + 1])) if lowest - skip >= 2 else np.zeros(1)
    )
    steepest = tried[skip + int(np.argmin(slopes))] if lowest - skip >= 2 else tried[lowest]
    return {
        "rates": tried,
        "losses": losses,
        "smoothed": [float(v) for v in smoothed],
        "minimum": tried[lowest],
        "steepest": steepest,
        "valley": tried[_valley(curve)],
        "chosen": tried[_valley(curve)],
        "rule": "fastai's valley: halfway along the longest run of falling smoothed loss",
    }


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

    return tqdm(
        total=total_steps, initial=done_steps, unit="batch", desc="fine-tune", file=sys.stderr, dynamic_ncols=True
    )


def _stage(epoch: int, config: FineTuneConfig, groups: list[list]) -> int:
    """How many groups train at `epoch`: none during the head's epochs, then all (or one more per epoch, gradual)."""
    if epoch < config.head_epochs:
        return 0
    return min(epoch - config.head_epochs + 1, len(groups)) if config.gradual else len(groups)


def _train(
    model,
    pixels,
    y,
    mask,
    config: FineTuneConfig,
    groups: list[list],
    work: _WorkFolder,
    state: dict,
    log: Callable[[str], None],
    on_epoch_end: Callable[[int], None] | None,
) -> dict:
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
                set_trainable(
                    model, [layer for group in groups[:stage] for layer in group], config.bn if stage else "frozen"
                )
                trainer = _Trainer(
                    model, rate_groups(model, groups, stage, config.bn, config.lower_rate_factor), config
                )
                # Resuming mid-stage: the optimizers carry on as they would have; at a new stage they start afresh anyway.
                if (
                    trained_stage is None
                    and epoch > 0
                    and _stage(epoch - 1, config, groups) == stage
                    and (epoch - 1 < config.head_epochs) == head_phase
                    and not work.restore_optimizer(trainer.variables, state)
                ):
                    log("note: the optimizer state could not be restored; it starts afresh")
                trained_stage = stage
            assert trainer is not None  # made at the first epoch: trained_stage starts as None, never a stage
            phase_epoch, phase_epochs = (
                (epoch, config.head_epochs) if head_phase else (epoch - config.head_epochs, config.epochs)
            )
            losses = []
            for k, (batch, labels) in enumerate(
                _epoch_batches(tf, train_pixels, train_y, config, epoch, augment_batch)
            ):
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
            state.update(
                epoch=epoch + 1,
                best_loss=min(val_loss, state["best_loss"]),
                best_epoch=epoch + 1 if better else state["best_epoch"],
                waited=0 if better or patient else state["waited"] + 1,
            )
            work.save(model, state, best=better, optimizer_variables=trainer.variables)
            message = f"epoch {epoch + 1}/{total}: loss {np.mean(losses):.4f}, val_loss {val_loss:.4f}"
            bar.set_postfix_str(message) if bar is not None else log(message)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    except KeyboardInterrupt:
        log(
            f"interrupted after epoch {state['epoch']}; the best epoch so far ({state['best_epoch']}) is kept in "
            f"{work.folder}: run the same command again to resume"
        )
        raise
    finally:
        if bar is not None:
            bar.close()
    return state


def _evaluate(
    model, pixels, y, relpaths, mask, labels: list[str]
) -> tuple[dict, tuple[list[str], list[str], np.ndarray]]:
    metrics: dict = {}
    test_rows: tuple[list[str], list[str], np.ndarray] = ([], [], np.zeros((0, len(labels))))
    for name in SPLITS:
        rows = np.flatnonzero(mask[name])
        proba = _predict(model, _subset(pixels, rows)).astype(np.float64) if len(rows) else np.zeros((0, len(labels)))
        truth = [labels[i] for i in y[rows]]
        metrics[name] = split_metrics(proba, truth, labels)
        if name == "test":
            test_rows = ([relpaths[i] for i in rows], truth, proba)
    return metrics, test_rows


def fine_tune(
    run_dir: str | os.PathLike,
    config: FineTuneConfig = FineTuneConfig(),
    runs_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda message: None,
    argv: list[str] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    max_memory: int | None = None,
) -> FineTuneResult:
    """Fine-tune a run end to end and write a new run folder (in `runs_dir`, default beside the parent).

    The run's split is decoded once and held in memory when twice its decoded size fits in `max_memory` bytes
    (default: a quarter of the memory available); otherwise its images are decoded per batch (same results)."""
    from bottleneck.learn.run_folder import (
        PREDICTIONS_FILE,
        new_run,
        prepare_runs_dir,
        relative_paths,
        write_lr_find,
        write_predictions_csv,
        write_run_record,
    )
    from bottleneck.learn.runs import versions

    tf, keras = import_tensorflow()
    run = load_run(run_dir)
    if run.multi_label:
        raise BottleneckError(
            f"run {run.run_id} is multi-label, and fine-tune does not support multi-label runs yet "
            "(it trains one label per image)"
        )
    if run.spec.kind == "pixels" and not run.fine_tuned:
        raise BottleneckError("a run on raw pixels has no backbone to fine-tune; train a head on a network's features")
    runs = prepare_runs_dir(runs_dir if runs_dir else run.folder.parent)  # checked before hours of training
    work = _WorkFolder(naming.fine_tune_folder(runs, run.run_id, config.key()))
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
            softened = (
                soften_head(model, _subset(pixels, mask["validation"]), y[mask["validation"]], log)
                if config.soften
                else None
            )
            state = _starting_state(model, _subset(pixels, mask["validation"]), y[mask["validation"]], work)
            if softened:
                state["softened"] = softened
        state["parent"] = parent
        started = time.perf_counter()
        if "learning_rate" not in state:
            state["learning_rate"] = _choose_learning_rate(
                model, _subset(pixels, mask["train"]), y[mask["train"]], config, groups, state, log
            )
        log(
            f"fine-tuning {len(unfrozen)} backbone layers (from {unfrozen[0].name if unfrozen else '-'}) and the head on "
            f"{int(mask['train'].sum())} images, {config.head_epochs} head epochs then {config.epochs} at most, "
            f"learning rate {state['learning_rate']:.3g} (lower groups down to 1/{config.lower_rate_factor:g} of it), "
            f"BatchNorm {config.bn}"
        )
        state = _train(model, pixels, y, mask, config, groups, work, state, log, on_epoch_end)
        if work.path(state, "best") is not None:
            import warnings

            with warnings.catch_warnings():  # epoch 0's weights were saved before compiling: no optimizer to restore
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(work.path(state, "best"))
        set_trainable(model, [])
        split_scores, test_rows = _evaluate(model, pixels, y, relpaths, mask, run.labels)
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if v not in (None, ())}
        metrics = {
            "head": "fine-tune",
            "params": params,
            "seed": config.seed,
            "training_seconds": time.perf_counter() - started,
            "splits": split_scores,
            "excluded": {"not_decoded": listed - len(relpaths)},
            "misclassified": misclassified(test_rows[2], test_rows[1], test_rows[0], run.labels),
            "history": state["history"],
            "best_epoch": state["best_epoch"],
            "parent_run": run.run_id,
            "unfrozen_layers": [layer.name for layer in unfrozen],
            "pretrained": bool(run.spec.pretrained),
            "warning": "" if run.spec.pretrained else run.spec.random_weights_warning,
        }
        if state.get("lr_find"):
            metrics["lr_find"] = {k: state["lr_find"][k] for k in ("minimum", "steepest", "valley", "chosen", "rule")}
        metrics["learning_rate"] = state["learning_rate"]
        if state.get("softened"):
            metrics["softened"] = state["softened"]
        with new_run(runs, "fine-tune") as (final, staging):
            if state.get("lr_find"):
                write_lr_find(staging, state["lr_find"])
            _without_optimizer(model).save(staging / "model.keras")
            (staging / "labels.json").write_text(json.dumps(run.labels))
            shutil.copyfile(run.folder / "split.csv", staging / "split.csv")
            write_predictions_csv(staging / PREDICTIONS_FILE, *test_rows, run.labels)
            config_json = {
                "kind": FINE_TUNED,
                "command": argv if argv is not None else sys.argv,
                "parent_run": run.run_id,
                "parent_dir": str(run.folder.absolute()),
                "data": str(run.data_dir) if run.data_dir else None,
                "head": "fine-tune",
                "fine_tune": metrics["params"],
                "seed": config.seed,
                "model": "model.keras",
                "output_layer": OUTPUT_NAME,
                "cache": str(run.cache_dir.absolute()),
                "relative": relative_paths(final, cache=run.cache_dir, data=run.data_dir),
                "fingerprint": run.fingerprint,
                "fine_tuned_from": {"run": run.run_id, "fingerprint": run.fingerprint},
                "backbone_spec": run.config.get("backbone_spec"),
                "backbone": run.config.get("backbone"),
                "versions": versions(),
            }
            write_run_record(staging, config_json, metrics)
        shutil.rmtree(work.folder, ignore_errors=True)
        return FineTuneResult(final, metrics, resumed)
