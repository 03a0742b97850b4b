"""The Python API: `import bottleneck as bn` for notebooks and scripts.

The same pipeline as the commands, as functions that return objects instead of printing:

    import bottleneck as bn
    bn.extract("data", cache="cache", backbone="pixels", image_size=32)
    features = bn.load_features("data", cache="cache", backbone="pixels", image_size=32)
    (X_train, y_train), (X_test, y_test) = features.split().arrays("train", "test")
    run = bn.train_head("data", cache="cache", runs="runs", backbone="pixels", image_size=32)
    bn.Run.load(run.path).predict(["new.jpg"])

`load_features(...).split(...)` is exactly the split `train-head` draws with the same flags, so an
experiment in a notebook and a run from the command line see the same images in each split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import BottleneckError, DataError

__all__ = ["FeatureSet", "Split", "Run", "backbone", "extract", "load_features", "train_head"]


def backbone(
    name: str = "inception_v3",
    *,
    weights: str = "imagenet",
    layer: str | None = None,
    image_size: int | None = None,
    preprocess: str | None = None,
    precision: str = "float32",
) -> BackboneSpec:
    """The backbone the `--backbone`, `--weights`, `--layer`, `--image-size`, `--preprocess` and `--precision`
    flags name: a Keras application, `pixels`, or a path to your own `.keras` file (with `layer`)."""
    return BackboneSpec(
        architecture=name,
        weights=weights,
        image_size=image_size,
        layer=layer,
        preprocess=preprocess,
        precision=precision,
    )


def _spec(backbone_name: str | BackboneSpec, **flags: Any) -> BackboneSpec:
    return backbone_name if isinstance(backbone_name, BackboneSpec) else backbone(backbone_name, **flags)


def _columns(image_column: str | None, label_column: str | None):
    from bottleneck.features.shards import Columns

    return Columns(image_column, label_column) if image_column or label_column else None


def _say(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def extract(
    data: str | os.PathLike | None = None,
    cache: str | os.PathLike = "cache",
    backbone: str | BackboneSpec = "inception_v3",
    *,
    labels: str | os.PathLike | None = None,
    layout: str = "auto",
    image_column: str | None = None,
    label_column: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _say,
    **options: Any,
):
    """`bottleneck features`: compute what the cache lacks for the images of `data` (or a label file's) and
    return the summary (`ExtractionResult`). Backbone flags (`weights`, `layer`, `image_size`, `preprocess`,
    `precision`) and extraction options (`batch_size`, `workers`, `engine`, `max_pixels`, ...) go by keyword.
    The progress bar is tqdm's, which draws a widget in a notebook."""
    from bottleneck.features.extract import ExtractOptions, extract_features

    flags = {k: options.pop(k) for k in ("weights", "layer", "image_size", "preprocess", "precision") if k in options}
    return extract_features(
        data,
        cache,
        _spec(backbone, **flags),
        ExtractOptions(progress=progress, **options),
        log=log,
        layout=layout,
        labels=labels,
        columns=_columns(image_column, label_column),
    )


@dataclass
class Split:
    """Which split each image of a `FeatureSet` is in: train, validation or test."""

    features: FeatureSet
    of: list[str]  # one split name per image, in the feature set's order

    def indices(self, name: str) -> np.ndarray:
        """Positions (in the feature set) of the images in split `name`."""
        if name not in ("train", "validation", "test"):
            raise DataError(f"unknown split {name!r}; choose train, validation or test")
        return np.array([i for i, split in enumerate(self.of) if split == name], dtype=np.int64)

    def paths(self, name: str) -> list[str]:
        """The relative paths of the images in split `name`."""
        return [self.features.paths[i] for i in self.indices(name)]

    def arrays(self, *names: str) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """`(X, y)` of each split named, in order: `(X_train, y_train), (X_test, y_test) = split.arrays("train", "test")`.

        y holds the labels as strings; for multi-label data, a 0/1 matrix over `features.classes`."""
        return tuple(
            (self.features.take(self.indices(name)), self.features.targets(self.indices(name))) for name in names
        )


@dataclass
class FeatureSet:
    """The cached features of a dataset's images, with their labels: what `load_features` returns."""

    data: Any  # the LabelledFeatures behind it
    store: Path
    _split: Split | None = field(default=None, repr=False)

    @property
    def paths(self) -> list[str]:
        """Each image's path relative to DATA (or to the label file's folder), as in a run's split.csv."""
        return list(self.data.relpaths)

    @property
    def labels(self) -> list[str]:
        """Each image's label (multi-label data: its labels joined with ';'; `label_sets` has them apart)."""
        return list(self.data.labels)

    @property
    def label_sets(self) -> list[tuple[str, ...]]:
        return list(self.data.label_sets) if self.data.multi_label else [(label,) for label in self.data.labels]

    @property
    def classes(self) -> list[str]:
        return sorted({label for labels in self.label_sets for label in labels})

    @property
    def content_hashes(self) -> list[str]:
        return list(self.data.content_hashes)

    @property
    def in_memory(self) -> bool:
        """Whether the features fit the memory budget (else read them with `iter_chunks`)."""
        return self.data.rows.in_memory

    @property
    def features(self) -> np.ndarray:
        """(n, d) float32 features, in `paths` order; past the memory budget, use `iter_chunks` instead."""
        if not self.in_memory:
            raise DataError(
                f"the features of {len(self)} images are larger than the memory budget: read them with "
                "iter_chunks(), or load_features(..., max_memory='8G')"
            )
        return self.data.rows.materialise()

    def __len__(self) -> int:
        return len(self.data.relpaths)

    def take(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The features of the images at `positions` (read from the store when they are not in memory)."""
        return self.data.rows.take(np.asarray(positions, dtype=np.int64))

    def targets(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The labels of the images at `positions`: strings, or a 0/1 matrix over `classes` for multi-label data."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.data.multi_label:
            return np.array(self.labels, dtype=object)[positions].astype(str)
        index = {label: i for i, label in enumerate(self.classes)}
        matrix = np.zeros((len(positions), len(index)), dtype=np.int8)
        for row, position in enumerate(positions):
            matrix[row, [index[label] for label in self.label_sets[position]]] = 1
        return matrix

    def iter_chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, features) a chunk at a time, in store order: bounded memory however large the set."""
        yield from self.data.rows.chunks(chunk_rows)

    def split(
        self, seed: int = 0, val_pct: float = 10.0, test_pct: float = 10.0, split_file: str | os.PathLike | None = None
    ) -> Split:
        """The split `train-head` draws with these flags (split folders and a label file's split column as it
        takes them; `split_file` as `--split-file`), exactly."""
        from bottleneck.learn.splits import SplitConfig, splits_for

        drawn = splits_for(
            self.data,
            SplitConfig(val_pct=val_pct, test_pct=test_pct, seed=seed),
            None if split_file is None else str(split_file),
            lambda message: None,
        )
        self._split = Split(self, drawn)
        return self._split

    def to_pandas(self):
        """A DataFrame: path, label, split (once `split()` was called), content_hash and features (one vector a row)."""
        import pandas as pd

        frame = pd.DataFrame({"path": self.paths, "label": self.labels})
        if self._split is not None:
            frame["split"] = self._split.of
        frame["content_hash"] = self.content_hashes
        frame["features"] = list(self.features)
        return frame


def load_features(
    data: str | os.PathLike | None = None,
    cache: str | os.PathLike = "cache",
    backbone: str | BackboneSpec = "inception_v3",
    *,
    labels: str | os.PathLike | None = None,
    layout: str = "auto",
    image_column: str | None = None,
    label_column: str | None = None,
    max_memory: int | str | None = None,
    stream: bool | None = None,
    chunk_rows: int | None = None,
    log: Callable[[str], None] = _say,
    **backbone_flags: Any,
) -> FeatureSet:
    """The cached features of the images of `data` (or those a label file names), matched by content and
    labelled as `train-head` labels them; images the cache lacks are left out with a warning.

    Features past `max_memory` (default: a quarter of the available memory) stay in the store and are read
    in chunks (`FeatureSet.iter_chunks`); `stream=True` and `chunk_rows` ask for that whatever their size."""
    from bottleneck.learn.dataset import load_labelled_features
    from bottleneck.learn.memory import parse_size

    budget = None if max_memory is None else parse_size(max_memory)
    loaded = load_labelled_features(
        data,
        cache,
        _spec(backbone, **backbone_flags),
        log=log,
        max_memory=budget,
        stream=stream,
        chunk_rows=chunk_rows,
        layout=layout,
        labels=labels,
        columns=_columns(image_column, label_column),
    )
    return FeatureSet(loaded, loaded.store_path)


@dataclass
class Run:
    """A run folder: its metrics and split, and the head as a function of features or of image files."""

    path: Path
    loaded: Any = field(repr=False)  # the LoadedRun behind it

    @classmethod
    def load(cls, path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Run:
        """Open a run folder (never unpickling anything); `cache` where its features live, if they moved."""
        from bottleneck.learn.run_folder import load_run

        loaded = load_run(path, cache)
        return cls(loaded.folder, loaded)

    @property
    def labels(self) -> list[str]:
        return list(self.loaded.labels)

    @property
    def metrics(self) -> dict:
        from bottleneck.learn.run_folder import METRICS_FILE, read_run_json

        return read_run_json(self.path / METRICS_FILE)

    @property
    def config(self) -> dict:
        return dict(self.loaded.config)

    @property
    def split(self) -> dict[str, str]:
        """path -> train, validation or test, from the run's split.csv."""
        from bottleneck.learn.splits import read_split_csv

        return {path: split for path, (_, split) in read_split_csv(self.path / "split.csv").items()}

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, len(labels)) probabilities of cached features of this run's backbone."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2:
            raise DataError(f"predict_proba takes an (n, d) array of features; got shape {features.shape}")
        return self.loaded.classify(features)

    def predict(self, paths: Sequence[str | os.PathLike], top: int = 3, **options: Any) -> list[dict]:
        """`bottleneck predict --json` on files, folders or shards: one dict per image, the same rows."""
        from bottleneck.features.extract import ExtractOptions
        from bottleneck.use.predict import predict_images

        result = predict_images(
            self.loaded, [os.fspath(p) for p in paths], top=top, options=ExtractOptions(**options) if options else None
        )
        return [prediction.as_json() for prediction in result.predictions]


def train_head(
    data: str | os.PathLike | None = None,
    cache: str | os.PathLike = "cache",
    runs: str | os.PathLike = "runs",
    backbone: str | BackboneSpec | None = None,
    *,
    head: str = "logreg",
    labels: str | os.PathLike | None = None,
    layout: str = "auto",
    seed: int = 0,
    val_pct: float = 10.0,
    test_pct: float = 10.0,
    split_file: str | os.PathLike | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    log: Callable[[str], None] = _say,
    **params: Any,
) -> Run:
    """`bottleneck train-head`: train a head on the cached features and write its run folder; return the `Run`.

    `backbone` None takes the cache's only store; backbone flags and head settings (`C`, `class_weight`,
    `epochs`, `learning_rate`, `dropout`, `batch_size`, `patience`, knn's `k`) go by keyword; `max_memory`, `exclude`,
    `augment` and `folds` as the command takes them."""
    from bottleneck.learn.runs import HeadConfig
    from bottleneck.learn.runs import train_head as train
    from bottleneck.learn.splits import SplitConfig

    flags = {k: params.pop(k) for k in ("weights", "layer", "image_size", "preprocess", "precision") if k in params}
    spec = None if backbone is None and not flags else _spec(backbone or "inception_v3", **flags)
    run_options = {
        k: params.pop(k) for k in ("max_memory", "exclude", "augment", "augment_flip", "folds") if k in params
    }
    unknown = sorted(set(params) - set(HeadConfig.__dataclass_fields__))
    if unknown:
        raise BottleneckError(f"train_head got unknown settings: {', '.join(unknown)}")
    result = train(
        data,
        cache,
        runs,
        spec,
        HeadConfig(head=head, **params),
        SplitConfig(val_pct=val_pct, test_pct=test_pct, seed=seed),
        None if split_file is None else str(split_file),
        log=log,
        argv=["bottleneck.api.train_head"],
        layout=layout,
        labels=labels,
        columns=_columns(image_column, label_column),
        **run_options,
    )
    return Run.load(result.run_dir)
