"""`KnnHead`: k nearest neighbours by cosine similarity, for few-shot and retrieval-style use (see `heads.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from bottleneck.errors import BottleneckError
from bottleneck.learn.heads_common import FeaturesError, _check_features, _predicted, _training_data

#: The k `KnnHead` chooses from (those up to the number of training rows).
K_GRID = (1, 3, 5, 7, 9, 11, 15, 21, 31, 51)


class KnnHead(ClassifierMixin, BaseEstimator):
    """k nearest neighbours by cosine similarity of L2-normalised features, for few-shot and retrieval-style use.

    Probabilities are similarity-weighted vote shares of the k most similar training rows (weight: the cosine
    similarity, floored at a small positive number). The head keeps every training row (`head.npz`).

    Parameters
    ----------
    k : int, or None: chosen from `K_GRID` by accuracy on `fit`'s validation_data (ties: the lower log loss),
        or by leave-one-out on the training rows when there is none (`k_` is the k used, `k_search_` the scores).
    multi_label : bool, refused (a knn head takes one label per image).
    """

    def __init__(self, *, k: int | None = None, multi_label: bool = False):
        self.k = k
        self.multi_label = multi_label

    def fit(self, X, y, validation_data=None) -> KnnHead:
        """Keep the normalised training rows and their labels; choose k unless it is given."""
        if self.multi_label:
            raise BottleneckError("the knn head takes one label per image; train a multi-label logreg or keras head")
        X, y = _training_data(X, y, type(self).__name__, False)
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1):
            raise BottleneckError(f"k must be a whole number of at least 1; got {self.k!r}")
        self.classes_, self.targets_ = np.unique(np.asarray(y), return_inverse=True)
        if len(self.classes_) < 2:
            raise FeaturesError(f"{type(self).__name__} needs at least 2 classes; got 1 class")
        self.features_ = _unit_rows(X)
        self.n_features_in_ = X.shape[1]
        self.history_ = None
        self.solver_ = "cosine knn"
        if self.k is not None:
            self.k_, self.k_search_ = int(self.k), None
        else:
            self.k_search_ = self._choose_k(validation_data)
            self.k_ = self.k_search_["k"]
        return self

    def _choose_k(self, validation_data) -> dict:
        from sklearn.metrics import log_loss

        grid = [k for k in K_GRID if k <= len(self.features_) - 1] or [1]
        index = {label: i for i, label in enumerate(self.classes_.tolist())}
        held = None
        if validation_data is not None and len(validation_data[1]):
            yv = np.asarray(validation_data[1])
            keep = np.array([label in index for label in yv.tolist()], dtype=bool)
            if keep.any():
                Xv = _check_features(validation_data[0], self.n_features_in_, type(self).__name__)[keep]
                held = ("validation", _unit_rows(Xv), np.array([index[label] for label in yv[keep].tolist()]))
        if held is None:  # leave-one-out: each training row against all the others
            held = ("leave-one-out on the training rows", self.features_, self.targets_)
        how, rows, truth = held
        similarity, neighbours = self._nearest(rows, max(grid), exclude_self=how != "validation")
        accuracy, loss = [], []
        for k in grid:
            proba = self._votes(similarity[:, :k], neighbours[:, :k])
            accuracy.append(float(np.mean(np.argmax(proba, axis=1) == truth)))
            loss.append(float(log_loss(truth, np.clip(proba, 1e-15, 1), labels=np.arange(len(self.classes_)))))
        best = min(range(len(grid)), key=lambda i: (-accuracy[i], loss[i]))
        return {"k": grid[best], "grid": grid, "chosen_on": how, "accuracy": accuracy, "log_loss": loss}

    def _nearest(self, rows: np.ndarray, k: int, exclude_self: bool = False, chunk: int = 1024):
        """(similarities, training-row indices) of each row's k most similar training rows, most similar first."""
        k = min(k, len(self.features_) - (1 if exclude_self else 0)) or 1
        similarity = np.zeros((len(rows), k), np.float32)
        neighbours = np.zeros((len(rows), k), np.int64)
        for start in range(0, len(rows), chunk):
            block = rows[start : start + chunk] @ self.features_.T
            if exclude_self:
                block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
            # argsort (stable) of the negated similarities: equal similarities keep training order
            order = np.argsort(-block, axis=1, kind="stable")[:, :k]
            neighbours[start : start + chunk] = order
            similarity[start : start + chunk] = np.take_along_axis(block, order, axis=1)
        return similarity, neighbours

    def _votes(self, similarity: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        weights = np.maximum(similarity.astype(np.float64), 1e-6)
        proba = np.zeros((len(similarity), len(self.classes_)))
        np.add.at(
            proba,
            (np.repeat(np.arange(len(similarity)), neighbours.shape[1]), self.targets_[neighbours].ravel()),
            weights.ravel(),
        )
        return proba / proba.sum(axis=1, keepdims=True)

    def fit_rows(self, rows, y, validation_data=None, chunk_rows: int = 4096) -> KnnHead:
        raise BottleneckError(
            "the knn head keeps every training row in memory, and these features are streamed from "
            "the store: raise --max-memory, or train a logreg head"
        )

    def predict_proba(self, X) -> np.ndarray:
        """Similarity-weighted vote shares of the k nearest training rows, columns in `classes_` order."""
        check_is_fitted(self)
        X = _check_features(X, self.n_features_in_, type(self).__name__)
        return self._votes(*self._nearest(_unit_rows(X), self.k_))

    def predict(self, X) -> np.ndarray:
        return _predicted(self, X)

    def arrays(self):
        from bottleneck.learn.head_file import KnnArrays

        return KnnArrays(
            self.features_,
            self.targets_.astype(np.int64),
            np.asarray([str(c) for c in self.classes_], dtype=np.str_),
            self.k_,
        )

    def save(self, folder: Path) -> Path:
        """Write `head.npz`: the normalised training rows, their class indices, the classes and k (plain arrays)."""
        from bottleneck.learn.head_file import save_knn

        return save_knn(self.arrays(), folder)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (a zero row stays zero), float32."""
    X = np.asarray(X, np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, np.finfo(np.float32).tiny)
