"""One experiment: a head trained on cached features, written to RUNS/<run-id>/ with everything
needed to reproduce and compare it (config, split.csv, model, metrics.json)."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck import __version__
from bottleneck.backbones.spec import BackboneSpec, spec_from_store_attrs, spec_record
from bottleneck.errors import BackboneError, BottleneckError
from bottleneck.features.shards import Columns
from bottleneck.learn.augmented_rows import augmented_training_rows
from bottleneck.learn.dataset import (
    FeatureRows,
    LabelledFeatures,
    load_labelled_features,
    read_exclude_file,
    without_excluded,
)
from bottleneck.learn.heads import KerasHead, make_head
from bottleneck.learn.memory import parse_size
from bottleneck.learn.run_checks import _check_classes, _targets
from bottleneck.learn.run_evaluation import _evaluate, _evaluate_multi_label, _fit, _proba
from bottleneck.learn.run_folder import (
    PREDICTIONS_FILE,
    new_run,
    prepare_runs_dir,
    relative_paths,
    write_predictions_csv,
    write_run_record,
)
from bottleneck.learn.splits import SPLITS, SplitConfig, assign_folds, splits_for, write_split_csv
from bottleneck.learn.thresholds import write_thresholds


@dataclass(frozen=True)
class HeadConfig:
    """Which head and its settings; None means the head's default."""

    head: str = "logreg"
    C: float | None = None
    class_weight: str | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    dropout: float | None = None
    batch_size: int | None = None
    patience: int | None = None
    k: int | None = None
    l2: float | None = None

    def params(self) -> dict:
        """The settings given; a logreg head's C is 'auto' (cross-validated) unless one is given."""
        given = {k: v for k, v in asdict(self).items() if k != "head" and v is not None}
        return {"C": "auto", **given} if self.head == "logreg" else given


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)

    def accuracy(self) -> dict:
        return self.scores("accuracy")

    def scores(self, key: str) -> dict:
        """One score of every split ({split: value or None}), e.g. accuracy, or mean_average_precision (multi-label)."""
        return {name: (split or {}).get(key) for name, split in self.metrics["splits"].items()}


def _cross_validate(
    head: HeadConfig,
    seed: int,
    X: FeatureRows,
    y: list[str],
    paths: list[str],
    folds: int,
    chunk_rows: int,
    groups: dict[str, str] | None = None,
) -> dict:
    fold_of = assign_folds(list(zip(paths, y)), folds, seed, groups)
    scores = []
    for k in range(folds):
        held = np.array([fold_of[p] == k for p in paths])
        model = make_head(head.head, random_state=seed, **head.params())
        y_arr = np.array(y)
        _fit(model, X.subset(~held), y_arr[~held], (X.subset(held), y_arr[held]), chunk_rows)
        predicted = model.classes_[np.argmax(_proba(model, X.subset(held), chunk_rows), axis=1)]
        scores.append(float(np.mean(predicted == y_arr[held])))
    return {
        "folds": folds,
        "accuracy": scores,
        "mean_accuracy": float(np.mean(scores)),
        "std_accuracy": float(np.std(scores)),
    }


def _domain_sample(rows: FeatureRows, count: int, rng: np.random.Generator) -> np.ndarray:
    """At most `count` rows, drawn as `compare_features` draws them, reading only those."""
    if len(rows) <= count:
        return rows.materialise()
    return rows.take(rng.choice(len(rows), count, replace=False))


def train_head(
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    runs_dir: str | os.PathLike,
    spec: BackboneSpec | None = None,
    head: HeadConfig = HeadConfig(),
    split: SplitConfig = SplitConfig(),
    split_file: str | None = None,
    folds: int | None = None,
    log: Callable[[str], None] = lambda message: None,
    argv: list[str] | None = None,
    max_memory: int | str | None = None,
    stream: bool | None = None,
    chunk_rows: int | None = None,
    exclude: str | None = None,
    augment: int | None = None,
    augment_flip: float | None = None,
    layout: str = "auto",
    labels: str | os.PathLike | None = None,
    columns: Columns | None = None,
    progress: bool = False,
) -> RunResult:
    """Train one head on the cached features of DATA and write its run folder; return its metrics.

    `layout` is how DATA is laid out (see `bottleneck.features.discover`); split folders give the splits.
    `labels` is a label file naming the images and labels instead (DATA may then be None); `columns`
    names a Parquet DATA's image and label columns (`bottleneck.features.shards.Columns`).

    `augment` adds cached augmented views of the training images (`features --augment N`): that
    many per image, or 0 for every view the cache holds; validation and test images never get any.

    `exclude` names a file of images to leave out (one path per line, relative to DATA or absolute:
    an audit's exclude.txt); the run records it.
    `max_memory` (bytes, or a size such as '512M'; default a quarter of the available memory)
    bounds the features held at once: over it, the head streams them from the store.
    `stream` and `chunk_rows` force streaming and its chunk size (for tests and benchmarks).
    `progress` shows a keras head's epochs on stderr.
    """
    make_head(head.head, random_state=split.seed, **head.params())  # bad flags fail before any work
    budget = None if max_memory is None else parse_size(max_memory)
    prepare_runs_dir(runs_dir)  # a --runs that cannot be written fails now, not after training
    batch_size = (head.batch_size or KerasHead.MAX_AUTO_BATCH) if head.head == "keras" else 0
    data = load_labelled_features(
        data_dir,
        cache_dir,
        spec,
        log=log,
        max_memory=budget,
        batch_size=batch_size,
        stream=stream,
        chunk_rows=chunk_rows,
        layout=layout,
        labels=labels,
        columns=columns,
    )
    root = data.root  # a label file without DATA: paths are relative to its folder
    assert root is not None  # load_labelled_features records the images' root
    listed = read_exclude_file(exclude, root) if exclude else None
    return train_on_features(
        data,
        runs_dir,
        head,
        split,
        split_file=split_file,
        folds=folds,
        log=log,
        argv=argv,
        data_dir=root,
        spec=spec,
        exclude=exclude,
        exclude_listed=listed,
        augment=augment,
        augment_flip=augment_flip,
        labels_file=labels,
        progress=progress,
    )


def leave_out_of_training(
    data: LabelledFeatures, splits: list[str], listed: list[str], source: str, log: Callable[[str], None]
) -> tuple[LabelledFeatures, list[str], dict]:
    """`--exclude`: the listed images leave the training and validation splits, and only those.

    `splits` were drawn on every image, so the test split is the one a run without the list gets, path for
    path: runs with and without `--exclude` are scored on the same test images (removing test images would
    change the exam, not the student). Returns the data, their splits and the record of what was left out."""
    listed_set = set(listed)
    where = Counter(s for p, s in zip(data.relpaths, splits) if p in listed_set)
    kept = frozenset(p for p, s in zip(data.relpaths, splits) if s == "test" and p in listed_set)
    remaining, count = without_excluded(data, listed, source, kept)
    remaining_splits = [s for p, s in zip(data.relpaths, splits) if s == "test" or p not in listed_set]
    record = {
        "file": str(Path(source).absolute()),
        "listed": len(listed_set),
        "left_out": count,
        "train": where["train"],
        "validation": where["validation"],
        "test_kept": where["test"],
    }
    log(
        f"left out {count} images listed in {source} (train {where['train']}, validation {where['validation']})"
        + (
            f"; {where['test']} listed test image{'s' if where['test'] != 1 else ''} stay in the test split: --exclude never changes the test split"
            if where["test"]
            else ""
        )
    )
    return remaining, remaining_splits, record


def train_on_features(
    data: LabelledFeatures,
    runs_dir: str | os.PathLike,
    head: HeadConfig = HeadConfig(),
    split: SplitConfig = SplitConfig(),
    *,
    split_file: str | None = None,
    folds: int | None = None,
    log: Callable[[str], None] = lambda message: None,
    argv: list[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    spec: BackboneSpec | None = None,
    exclude: str | None = None,
    exclude_listed: list[str] | None = None,
    augment: int | None = None,
    augment_flip: float | None = None,
    labels_file: str | os.PathLike | None = None,
    progress: bool = False,
) -> RunResult:
    """Split, train, evaluate and write the run folder for features already matched to DATA.

    `exclude_listed` are the images `--exclude` (the file `exclude`) lists: left out of training and
    validation after the split is drawn on every image (`leave_out_of_training`)."""
    model = make_head(head.head, random_state=split.seed, multi_label=data.multi_label, **head.params())
    if progress and "verbose" in model.get_params():
        model.set_params(verbose=1)
    splits = splits_for(data, split, split_file, log)
    excluded = None
    if exclude_listed is not None:
        data, splits, excluded = leave_out_of_training(data, splits, exclude_listed, exclude or "--exclude", log)
    _check_classes(data, splits, log, folds)
    labels_all = _targets(data)
    mask = {name: np.array([s == name for s in splits]) for name in SPLITS}
    X = data.rows
    chunk_rows = data.memory.chunk_rows if data.memory else X.chunk_rows
    if data.memory and data.memory.streamed:
        log(f"streaming features from the store in chunks of {chunk_rows} rows: {data.memory.reason}")
    train_X, train_y = X.subset(mask["train"]), labels_all[mask["train"]]
    augmented = None
    if augment is not None:
        views, view_labels, augmented = augmented_training_rows(
            data, mask["train"], augment, data_dir, log, augment_flip
        )
        train_X = FeatureRows(np.concatenate([train_X.materialise(), views]), chunk_rows=chunk_rows)
        train_y = np.concatenate([train_y, view_labels])
    started = time.perf_counter()
    _fit(model, train_X, train_y, (X.subset(mask["validation"]), labels_all[mask["validation"]]), chunk_rows)
    training_seconds = time.perf_counter() - started
    labels = [str(c) for c in model.classes_]
    params, tuning = _fitted_params(model, head, log)
    metrics: dict = {
        "head": head.head,
        "params": params,
        "tuning": tuning,
        "seed": split.seed,
        "training_seconds": training_seconds,
        "splits": {},
        "excluded": {
            "failed_extraction": len(data.failed),
            "not_in_cache": len(data.missing),
            "non_finite": len(data.non_finite),
            "exclude_file": excluded["left_out"] if excluded else 0,
            **({"exclude_file_test_kept": excluded["test_kept"]} if excluded else {}),
        },
        "pretrained": bool(data.attrs.get("pretrained", True)),
        "warning": str(data.attrs.get("warning", "")),
    }
    if augmented:
        metrics["augment"] = augmented
    if data.memory:
        metrics["training"] = dict(data.memory.record(), solver=getattr(model, "solver_", None))
        if hasattr(model, "passes_"):
            metrics["training"].update(passes=model.passes_, converged=model.converged_)
    thresholds = None
    if data.multi_label:
        thresholds, test_predictions = _evaluate_multi_label(model, X, data, mask, labels, chunk_rows, metrics, log)
    else:
        test_predictions = _evaluate(model, X, data, mask, labels, chunk_rows, metrics)
    if model.history_:
        metrics["history"] = model.history_
    if mask["train"].sum() >= 2 and mask["test"].sum() >= 2:
        from bottleneck.learn.domain import compare_features

        rng = np.random.default_rng(split.seed)  # the draw compare_features would make: the same rows
        train_sample = _domain_sample(X.subset(mask["train"]), 500, rng)
        test_sample = _domain_sample(X.subset(mask["test"]), 500, rng)
        metrics["domain"] = {
            "train_vs_test": compare_features(
                train_sample, test_sample, max_per_set=500, permutations=100, seed=split.seed
            )
        }
    if folds:
        trainval = mask["train"] | mask["validation"]
        metrics["cross_validation"] = _cross_validate(
            head,
            split.seed,
            X.subset(trainval),
            list(labels_all[trainval]),
            [p for p, m in zip(data.relpaths, trainval) if m],
            folds,
            chunk_rows,
            data.groups,
        )

    with new_run(Path(runs_dir), head.head) as (final, staging):
        write_split_csv(staging / "split.csv", list(zip(data.relpaths, data.labels, splits)))
        write_predictions_csv(staging / PREDICTIONS_FILE, *test_predictions, labels, thresholds)
        model_path = model.save(staging)
        if thresholds is not None:
            write_thresholds(staging, thresholds)
        config = {
            "command": argv if argv is not None else sys.argv,
            "data": str(Path(data_dir).absolute()) if data_dir is not None else None,
            "head": head.head,
            "params": params,
            "tuning": tuning,
            "seed": split.seed,
            "val_pct": split.val_pct,
            "test_pct": split.test_pct,
            "split_file": split_file,
            "layout": data.layout,
            "columns": asdict(data.columns) if data.columns else None,
            "labels_file": str(Path(labels_file).absolute()) if labels_file else None,
            "folds": folds,
            "exclude": excluded,
            "augment": augmented,
            "max_memory_bytes": data.memory.max_memory_bytes if data.memory else None,
            "store": str(data.store_path.absolute()),
            "relative": relative_paths(final, store=data.store_path, data=data_dir),
            "fingerprint": str(data.attrs.get("fingerprint", "")),
            "backbone": {k: (v.item() if hasattr(v, "item") else v) for k, v in data.attrs.items()},
            "backbone_spec": _recorded_spec(spec, data.attrs),
            "backbone_file": _kept_backbone(spec, data, final),
            "model": model_path.name,
            "labels": [str(label) for label in labels],
            "multi_label": data.multi_label,
            "versions": versions(),
        }
        write_run_record(staging, config, metrics)
    return RunResult(final, metrics)


def _fitted_params(model, head: HeadConfig, log: Callable[[str], None]) -> tuple[dict, dict]:
    """(the settings the head trained with: a chosen C or k and its grid instead of 'auto'; how it was chosen, with
    the scores of each value: `tuning`, {"C": ...} or {"k": ...}, empty when nothing was chosen)."""
    params, tuning = head.params(), {}
    search = getattr(model, "C_search_", None)
    if search:
        params.update(C=search["C"], C_grid=search["grid"])
        tuning["C"] = search
        log(
            f"C {search['C']:g} "
            + (
                f"(kept: {search['reason']})"
                if "reason" in search
                else f"chosen by {search['folds']}-fold cross-validation over train+validation"
            )
        )
    found = getattr(model, "k_search_", None)
    if found:
        params.update(k=found["k"], k_grid=found["grid"])
        tuning["k"] = found
        log(f"k {found['k']} chosen on {found['chosen_on']}")
    return params, tuning


def _kept_backbone(spec: BackboneSpec | None, data: LabelledFeatures, run_folder: Path) -> dict | None:
    """A `.keras` backbone, or an application's `--weights` file, kept in the cache by content, so the run keeps
    its own when the file moves or is retrained; None for ImageNet or random weights and pixels, which are named,
    not copied."""
    from bottleneck.backbones.kept import file_suffix, keep_backbone_file
    from bottleneck.backbones.spec import WEIGHTS_IMAGENET, WEIGHTS_NONE

    if (
        spec is None
        or spec.kind == "pixels"
        or (spec.kind == "application" and spec.weights in (WEIGHTS_IMAGENET, WEIGHTS_NONE))
    ):
        return None
    if spec.kind == "foundation":  # a preset folder is named, not copied: its fingerprint covers every file of it
        return None
    source = spec.architecture if spec.kind == "file" else spec.weights
    kept = keep_backbone_file(source, data.store_path.parent)
    trained_on = str(data.attrs.get("weights_id", ""))
    if trained_on.startswith("sha256:") and trained_on != f"sha256:{kept.sha256}":
        raise BackboneError(
            f"{source} changed after its features were computed: run `bottleneck features` "
            "again with it, then train the head"
        )
    return {
        "sha256": kept.sha256,
        "path": os.path.relpath(kept.path.absolute(), run_folder.absolute()),
        "name": spec.name,
        "hint": str(Path(source).absolute()),
        "suffix": file_suffix(source),
        "role": "model" if spec.kind == "file" else "weights",
    }


def _recorded_spec(spec: BackboneSpec | None, attrs: dict) -> dict | None:
    """The exact backbone, so `predict`, `export` and `fine-tune` can rebuild it from the run alone."""
    try:
        return spec_record(spec or spec_from_store_attrs(attrs))
    except (BottleneckError, KeyError):  # e.g. the model file behind an old store is gone: the store still names it
        return None


def versions() -> dict:
    """The versions of Python and of the installed packages a run may use (every Keras backend, OpenVINO and
    NNCF, KerasHub), read from their metadata: none of them is imported."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"bottleneck": __version__, "python": sys.version.split()[0]}
    for package in (
        "numpy",
        "scikit-learn",
        "h5py",
        "joblib",
        "tensorflow",
        "tensorflow-cpu",
        "keras",
        "Pillow",
        "jax",
        "jaxlib",
        "torch",
        "openvino",
        "nncf",
        "keras-hub",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
