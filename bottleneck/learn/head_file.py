"""The logistic-regression head on disk as plain arrays (`head.npz`), so opening a run never runs code.

Runs travel between people; a pickle (`model.joblib`) runs whatever its author put in it when it is
loaded. The head is therefore written as five arrays in a NumPy `.npz` (read with
`allow_pickle=False`, which refuses object arrays): the scaler's `mean` and `scale`, the logistic
regression's `coef` and `intercept`, and the `classes` as unicode strings; a sixth, `kind`, says
`softmax` (one label per image; the default when absent, as in older runs) or `sigmoid` (multi-label:
one independent logistic regression per label, one-vs-rest). Probabilities are computed from them directly; `model.joblib` is still written beside them, for people who want a
scikit-learn Pipeline, and nothing of ours ever loads it.

A knn head (`kind` knn) is written the same way: its L2-normalised training rows (`features`), each row's
class index (`targets`), the `classes` and `k` (`save_knn`, `load_knn`).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bottleneck.errors import BottleneckError

HEAD_FILE = "head.npz"
ARRAYS = ("mean", "scale", "coef", "intercept", "classes")
#: `kind` of a head: one softmax over the classes, or one sigmoid per label (multi-label).
SOFTMAX, SIGMOID = "softmax", "sigmoid"


class HeadFileError(BottleneckError):
    """A head file that is not a readable, consistent logistic-regression head."""


@dataclass(frozen=True)
class LogRegArrays:
    """softmax(((x - mean) / scale) @ coef.T + intercept) over `classes` (binary: sigmoid, as scikit-learn);
    with `kind` sigmoid, each class's own sigmoid (multi-label)."""

    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    coef: np.ndarray  # (k, d), or (1, d) for two classes
    intercept: np.ndarray  # (k,) or (1,)
    classes: np.ndarray  # (k,) unicode
    kind: str = SOFTMAX

    @property
    def multi_label(self) -> bool:
        return self.kind == SIGMOID

    @property
    def feature_dim(self) -> int:
        return int(self.coef.shape[1])

    @property
    def labels(self) -> list[str]:
        return [str(c) for c in self.classes]

    def as_dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(kernel (d, k), bias (k,)) of one Dense softmax layer computing the same probabilities.

        softmax(((x - mean) / scale) @ coef.T + b) = softmax(x @ (coef / scale).T + (b - (coef / scale) @ mean)).
        A binary logistic regression is softmax over (0, z). A sigmoid head folds the same way, into a
        Dense sigmoid layer.
        """
        coef = np.asarray(self.coef, np.float64)
        intercept = np.asarray(self.intercept, np.float64)
        if coef.shape[0] == 1 and len(self.classes) == 2 and not self.multi_label:
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.array([0.0, intercept[0]])
        weights = coef / self.scale
        return weights.T, intercept - weights @ self.mean

    def to_pipeline(self):
        """The scikit-learn Pipeline (scaler + logistic regression) these arrays came from, rebuilt without a pickle.

        Its `predict_proba` is the one the run was evaluated with, to the last bit (the arrays keep their dtypes).
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        d = self.feature_dim
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_, scaler.var_ = self.mean, self.scale, np.square(self.scale)
        scaler.n_features_in_, scaler.n_samples_seen_ = d, 0
        logreg = LogisticRegression()
        logreg.classes_, logreg.coef_, logreg.intercept_ = self.classes, self.coef, self.intercept
        logreg.n_features_in_, logreg.n_iter_ = d, np.zeros(1, np.int32)
        return make_pipeline(scaler, logreg)

    def predict_proba(self, X) -> np.ndarray:
        """(n, k) probabilities, columns in `classes` order (sigmoid: each label's own, not summing to 1)."""
        if self.multi_label:
            from scipy.special import expit

            # Computed here, not by a rebuilt OneVsRestClassifier: training evaluates with this same code.
            standardised = (np.asarray(X, self.mean.dtype) - self.mean) / self.scale
            return expit(np.asarray(standardised @ self.coef.T + self.intercept, np.float64))
        return self.to_pipeline().predict_proba(X)


def arrays_from_pipeline(pipeline, classes=None) -> LogRegArrays:
    """The arrays of a fitted scaler + logistic regression `Pipeline`, or scaler + one-vs-rest logistic
    regressions (multi-label: its labels are `classes`, the order of its estimators)."""
    scaler, logreg = pipeline.steps[0][1], pipeline.steps[-1][1]
    if hasattr(logreg, "estimators_"):  # OneVsRestClassifier: one binary logistic regression per label
        arrays = arrays_from_pipeline(_stacked(scaler, logreg.estimators_))
        return LogRegArrays(
            arrays.mean,
            arrays.scale,
            arrays.coef,
            arrays.intercept,
            np.asarray([str(c) for c in classes], dtype=np.str_),
            SIGMOID,
        )
    d = np.asarray(logreg.coef_).shape[1]
    mean = scaler.mean_ if getattr(scaler, "with_mean", True) and scaler.mean_ is not None else np.zeros(d)
    scale = scaler.scale_ if getattr(scaler, "with_std", True) and scaler.scale_ is not None else np.ones(d)
    # Each array keeps its dtype (a head trained on float32 features has float32 coefficients), so the
    # rebuilt Pipeline computes exactly what the trained one did.
    return LogRegArrays(
        np.asarray(mean),
        np.asarray(scale),
        np.asarray(logreg.coef_),
        np.asarray(logreg.intercept_),
        np.asarray([str(c) for c in logreg.classes_], dtype=np.str_),
    )


def _stacked(scaler, estimators):
    """A stand-in Pipeline whose one logistic regression holds every binary estimator's row (one-vs-rest)."""
    from types import SimpleNamespace

    stacked = SimpleNamespace(
        coef_=np.vstack([e.coef_ for e in estimators]),
        intercept_=np.concatenate([e.intercept_ for e in estimators]),
        classes_=[],
    )
    return SimpleNamespace(steps=[("scaler", scaler), ("logreg", stacked)])


#: The arrays of a knn head's file (`kind` knn).
KNN_ARRAYS = ("features", "targets", "classes", "k")
KNN = "knn"


@dataclass(frozen=True)
class KnnArrays:
    """A cosine k-nearest-neighbours head: L2-normalised training rows, each one's class index, the classes, k.

    Probabilities are the similarity-weighted vote shares of the k most similar rows (`heads.KnnHead`)."""

    features: np.ndarray  # (n, d) float32, rows of unit length
    targets: np.ndarray  # (n,) int, indices into classes
    classes: np.ndarray  # (c,) unicode
    k: int
    kind: str = KNN
    multi_label = False

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def labels(self) -> list[str]:
        return [str(c) for c in self.classes]

    def to_head(self):
        """The fitted `KnnHead` these arrays describe."""
        from bottleneck.learn.heads import KnnHead

        head = KnnHead(k=int(self.k))
        head.features_, head.targets_, head.classes_ = self.features, self.targets, self.classes
        head.k_, head.k_search_, head.n_features_in_ = int(self.k), None, self.feature_dim
        return head

    def predict_proba(self, X) -> np.ndarray:
        return self.to_head().predict_proba(X)


def save_knn(arrays: KnnArrays, folder: str | os.PathLike) -> Path:
    """Write a knn head to `folder/head.npz`; return its path."""
    path = Path(folder) / HEAD_FILE
    with open(path, "wb") as handle:
        np.savez(
            handle,
            features=arrays.features,
            targets=arrays.targets,
            classes=arrays.classes,
            k=np.int64(arrays.k),
            kind=np.str_(KNN),
        )
    return path


def load_knn(path: str | os.PathLike) -> KnnArrays:
    """The knn head in `path`, checked: plain arrays only, consistent shapes, finite numbers, k within the rows."""
    path = Path(path)
    values, kind = _read_arrays(path, KNN_ARRAYS, "knn")
    if kind != KNN:
        raise HeadFileError(f"{path} is a {kind} head, not a knn head")
    features, targets, classes, k = (values[name] for name in KNN_ARRAYS)
    n = features.shape[0] if features.ndim == 2 else -1
    if classes.ndim != 1 or classes.dtype.kind != "U" or len(classes) < 2 or len(set(classes.tolist())) != len(classes):
        raise HeadFileError(f"{path}: 'classes' must list at least two distinct labels")
    if features.ndim != 2 or features.dtype.kind != "f" or not np.isfinite(features).all() or n < 1:
        raise HeadFileError(f"{path}: 'features' must be a matrix of finite numbers")
    if targets.shape != (n,) or targets.dtype.kind not in "iu" or targets.min() < 0 or targets.max() >= len(classes):
        raise HeadFileError(f"{path}: 'targets' must give each row's class index")
    if k.shape != () or k.dtype.kind not in "iu" or not 1 <= int(k) <= n:
        raise HeadFileError(f"{path}: 'k' must be a whole number from 1 to the {n} rows")
    return KnnArrays(features.astype(np.float32, copy=False), targets.astype(np.int64), classes, int(k))


def _read_arrays(path: Path, names: tuple[str, ...], what: str) -> tuple[dict, str]:
    """The named arrays of the .npz at `path` and its `kind` (softmax when absent); plain arrays only."""
    try:
        with np.load(path, allow_pickle=False) as data:
            kind = str(data["kind"]) if "kind" in data.files else SOFTMAX
            missing = [name for name in names if name not in data.files]
            if missing and not (kind == KNN and what != "knn"):
                raise HeadFileError(f"{path} is not a {what} head (no {', '.join(missing)})")
            values = {name: data[name] for name in names if name in data.files}
    except HeadFileError:
        raise
    except ValueError as exc:  # np.load refuses pickles: object arrays inside a .npz, or a pickle file itself
        if zipfile.is_zipfile(path):
            raise HeadFileError(f"{path} holds something other than plain arrays ({exc}); not loaded") from None
        raise HeadFileError(
            f"{path} is not a readable head file (not a NumPy .npz; a pickle is never loaded)"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise HeadFileError(f"{path} is not a readable head file ({type(exc).__name__}: {exc})") from None
    return values, kind


def save_head(arrays: LogRegArrays, folder: str | os.PathLike) -> Path:
    """Write `folder/head.npz`; return its path."""
    path = Path(folder) / HEAD_FILE
    with open(path, "wb") as handle:
        np.savez(handle, **{name: getattr(arrays, name) for name in ARRAYS}, kind=np.str_(arrays.kind))
    return path


def load_head(path: str | os.PathLike) -> LogRegArrays:
    """The head in `path`, checked: plain arrays only (no pickles), consistent shapes, finite numbers."""
    path = Path(path)
    values, kind = _read_arrays(path, ARRAYS, "logistic-regression")
    if kind == KNN:
        raise HeadFileError(f"{path} is a knn head, not a logistic-regression head")
    if kind not in (SOFTMAX, SIGMOID):
        raise HeadFileError(f"{path}: unknown kind {kind!r} (softmax or sigmoid)")
    arrays = LogRegArrays(**values, kind=kind)
    _check_consistent(arrays, path)
    return arrays


def _check_consistent(arrays: LogRegArrays, path: Path) -> None:
    k, classes = len(arrays.classes), arrays.classes
    if classes.ndim != 1 or classes.dtype.kind != "U" or k < 2 or len(set(classes.tolist())) != k:
        raise HeadFileError(f"{path}: 'classes' must list at least two distinct labels")
    numeric = [arrays.mean, arrays.scale, arrays.coef, arrays.intercept]
    if any(a.dtype.kind not in "fiu" for a in numeric):
        raise HeadFileError(f"{path}: its arrays must be numbers")
    if arrays.coef.ndim != 2:
        raise HeadFileError(f"{path}: 'coef' must be a matrix")
    rows, d = arrays.coef.shape
    if (
        rows != (1 if k == 2 and not arrays.multi_label else k)
        or arrays.intercept.shape != (rows,)
        or arrays.mean.shape != (d,)
        or arrays.scale.shape != (d,)
    ):
        raise HeadFileError(
            f"{path}: its arrays do not fit together ({k} classes, coef {arrays.coef.shape}, "
            f"intercept {arrays.intercept.shape}, mean {arrays.mean.shape}, scale {arrays.scale.shape})"
        )
    if not all(np.isfinite(a).all() for a in numeric) or (arrays.scale == 0).any():
        raise HeadFileError(f"{path}: its numbers are not all finite (or a scale is 0)")
