"""What the heads share: checking features and labels as scikit-learn does, multi-hot label sets, streamed
scaling and class weights, predictions from probabilities, probabilities by chunks (`heads.py` gathers the heads)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bottleneck.errors import BottleneckError


def _streamed_scaler(rows, chunk_rows: int):
    """A StandardScaler fitted chunk by chunk (`partial_fit`): the mean and variance of every row, one pass."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for _, block in rows.chunks(chunk_rows):
        scaler.partial_fit(block)
    return scaler


def _sample_weights(y_index: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray | None:
    if class_weight != "balanced":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    values = compute_class_weight("balanced", classes=np.arange(n_classes), y=y_index)
    return values[y_index]


def _label_classes(y) -> np.ndarray:
    """Every label any image in `y` (a sequence of label tuples) carries, sorted."""
    return np.array(sorted({str(label) for labels in y for label in labels}))


def multi_hot(y, classes) -> np.ndarray:
    """(n, k) float32 0/1: which of `classes` each image's label tuple holds; labels not in `classes` are dropped."""
    index = {str(label): i for i, label in enumerate(classes)}
    out = np.zeros((len(y), len(classes)), np.float32)
    for row, labels in enumerate(y):
        out[row, [index[label] for label in labels if label in index]] = 1.0
    return out


def _streamed_multi_label(head) -> BottleneckError:
    return BottleneckError(
        f"a multi-label {type(head).__name__} trains on features in memory, and these are streamed "
        "from the store: raise --max-memory"
    )


class FeaturesError(BottleneckError, ValueError):
    """Features a head cannot take: one line for the CLI, a ValueError (or TypeError: `SparseFeaturesError`) as
    scikit-learn's estimator contract asks."""


class SparseFeaturesError(BottleneckError, TypeError):
    """Sparse features: the heads take dense arrays only."""


def _check_sparse(X, head: str) -> None:
    from scipy import sparse

    if sparse.issparse(X):
        raise SparseFeaturesError(f"{head} takes dense features; sparse input is not supported (use X.toarray())")


def _check_features(X, expected: int | None = None, head: str = "this head") -> np.ndarray:
    _check_sparse(X, head)
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise FeaturesError(
            f"features must be a 2-d array (n_samples, n_features); got shape {X.shape}. "
            "Reshape your data: X.reshape(1, -1) for one sample"
        )
    if X.shape[0] == 0 or X.shape[1] == 0:  # an empty array would crash oneDNN inside Keras, not raise
        raise FeaturesError(f"{X.shape[1]} feature(s) (shape={X.shape}) while a minimum of 1 is required.")
    if expected is not None and X.shape[1] != expected:
        raise FeaturesError(f"X has {X.shape[1]} features, but {head} is expecting {expected} features as input")
    if not np.isfinite(X).all():
        raise FeaturesError(f"features hold NaN or infinity: {head} takes finite values only")
    return X


def _training_data(X, y, head: str, multi_label: bool) -> tuple[np.ndarray, Any]:
    """X and y as a head trains on them, checked as scikit-learn's estimators check theirs (no sparse, complex,
    NaN or infinite features; one label per row of X; labels, not continuous values). Multi-label y (label
    tuples) is checked by `multi_hot`."""
    if y is None:
        raise FeaturesError(f"{head} requires y to be passed, but the target y is None")
    if multi_label:
        return _check_features(X, head=head), y
    _check_sparse(X, head)
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_X_y

    X, y = check_X_y(X, y, dtype=np.float32)
    check_classification_targets(y)
    return _check_features(X, head=head), y


def _predicted(head, X) -> np.ndarray:
    proba = head.predict_proba(X)
    return (proba >= 0.5).astype(np.int64) if head.multi_label else head.classes_[np.argmax(proba, axis=1)]


def _proba_by_chunks(predict_proba, rows, n_classes: int, chunk_rows: int) -> np.ndarray:
    out = np.zeros((len(rows), n_classes))
    for positions, block in rows.chunks(chunk_rows):
        out[positions] = predict_proba(block)
    return out
