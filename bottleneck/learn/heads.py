"""Light softmax heads trained on cached features, following the scikit-learn estimator contract.

Both take labels as strings and return probabilities in the order of `classes_`, so any
scikit-learn tool (cross-validation, grid search, metrics) works on them. Each saves an
artefact that opens without this package: the logistic regression's arrays (`head.npz`, plain
NumPy, what bottleneck loads) with a scikit-learn `Pipeline` beside it (`model.joblib`, never
loaded by bottleneck: a pickle runs code), or a Keras model (`.keras`) with its labels in a JSON
file beside it.

With `multi_label`, each image carries a set of labels (y is a sequence of label tuples): the
logistic regression is one-vs-rest (one binary regression per label), the Keras head a Dense
sigmoid layer trained with binary cross-entropy, and probabilities are each label's own.

Both also train on features too large for memory (`fit_rows`, `predict_proba_rows` over
`bottleneck.learn.dataset.FeatureRows`, read chunk by chunk) and save the same artefacts then.

The logistic regression lives here; `KerasHead` in `heads_keras`, `KnnHead` in `heads_knn`, what they share in
`heads_common`; every name is importable from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from bottleneck.errors import BottleneckError
from bottleneck.learn.heads_common import (
    FeaturesError,
    SparseFeaturesError,
    _check_features,
    _label_classes,
    _predicted,
    _proba_by_chunks,
    _sample_weights,
    _streamed_multi_label,
    _streamed_scaler,
    _training_data,
    multi_hot,
)
from bottleneck.learn.heads_keras import KerasHead
from bottleneck.learn.heads_knn import K_GRID, KnnHead

#: The heads and what goes with them, wherever they live (`heads_common`, `heads_keras`, `heads_knn`).
__all__ = [
    "C_FOLDS",
    "C_GRID",
    "C_SEARCH_ROWS",
    "FeaturesError",
    "HEADS",
    "K_GRID",
    "KerasHead",
    "KnnHead",
    "LogRegHead",
    "SparseFeaturesError",
    "make_head",
    "multi_hot",
]


#: `C="auto"`'s log grid, 1e-4 to 1e2 (CLIP's linear probes sweep a similar one).
C_GRID = tuple(float(10.0**e) for e in range(-4, 3))
#: Most folds `C="auto"` cross-validates over (fewer when the smallest class has fewer images).
C_FOLDS = 5
#: Most rows `C="auto"` cross-validates on (a seeded sample, every class kept): its cost stays bounded
#: (about 9x one fit at 2,250 rows) however large the training set; the final fit uses every row.
C_SEARCH_ROWS = 5000


def _search_sample(X: np.ndarray, y, multi_label: bool, seed: int, limit: int | None = None) -> tuple[np.ndarray, Any]:
    """At most `limit` (default `C_SEARCH_ROWS`) rows of X, y for choosing C: a seeded sample, stratified by class
    (single-label)."""
    limit = C_SEARCH_ROWS if limit is None else limit
    if len(X) <= limit:
        return X, y
    rng_keep = np.sort(np.random.default_rng(seed).choice(len(X), limit, replace=False))
    if multi_label:
        chosen = np.empty(limit, dtype=object)
        chosen[:] = [y[i] for i in rng_keep]
        return X[rng_keep], chosen
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(np.arange(len(X)), train_size=limit, stratify=np.asarray(y), random_state=seed)
    except ValueError:  # a class of one image cannot be stratified: a plain sample (C 1 is kept then anyway)
        keep = rng_keep
    keep = np.sort(keep)
    return X[keep], np.asarray(y)[keep]


def _cross_validated_C(X: np.ndarray, y, multi_label: bool, class_weight, max_iter: int, seed: int) -> dict:
    """The C of `C_GRID` with the best mean held-out score over seeded (stratified) folds of X, y.

    Single-label: accuracy, ties broken by the lower log loss; multi-label: one C shared by every label,
    the lowest mean binary cross-entropy. Each fold's scaler is fitted on that fold's training rows; along
    the grid each fit starts from the last one's weights (warm start, C increasing), which is what keeps it
    cheap. Returns {"C", "grid", "folds", "scores"} or, when a class is too small to fold, C 1 and the reason.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import KFold, StratifiedKFold
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    if multi_label:
        classes = _label_classes(y)
        target = multi_hot(y, classes).astype(np.int64)
        folds = min(C_FOLDS, len(X))
        splitter = KFold(folds, shuffle=True, random_state=seed)
    else:
        y = np.asarray(y)
        target = y
        folds = min(C_FOLDS, int(min(np.unique(y, return_counts=True)[1])))
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed) if folds >= 2 else None
    if folds < 2:
        return {
            "C": 1.0,
            "grid": list(C_GRID),
            "folds": folds,
            "rows": len(X),
            "reason": "a class has a single training or validation image: nothing to cross-validate, C 1 kept",
        }
    accuracy = np.zeros((folds, len(C_GRID)))
    loss = np.zeros((folds, len(C_GRID)))
    for f, (fit_rows, held) in enumerate(splitter.split(X, target if not multi_label else None)):
        scaler = StandardScaler().fit(X[fit_rows])
        X_fit, X_held = scaler.transform(X[fit_rows]), scaler.transform(X[held])
        if multi_label:
            for c, C in enumerate(C_GRID):  # one-vs-rest clones its estimator: no warm start here
                model = OneVsRestClassifier(
                    LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter, random_state=seed)
                ).fit(X_fit, target[fit_rows])
                p = np.clip(np.asarray(model.predict_proba(X_held), np.float64), 1e-15, 1 - 1e-15)
                truth = target[held]
                loss[f, c] = float(-np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p)))
            continue
        model = LogisticRegression(
            C=C_GRID[0], class_weight=class_weight, max_iter=max_iter, random_state=seed, warm_start=True
        )
        for c, C in enumerate(C_GRID):
            model.set_params(C=C).fit(X_fit, target[fit_rows])
            proba = model.predict_proba(X_held)
            accuracy[f, c] = accuracy_score(target[held], model.classes_[np.argmax(proba, axis=1)])
            loss[f, c] = log_loss(target[held], proba, labels=model.classes_)
    mean_loss = loss.mean(axis=0)
    if multi_label:
        best = int(np.argmin(mean_loss))
        scores = {"mean_binary_cross_entropy": mean_loss.tolist()}
    else:
        mean_accuracy = accuracy.mean(axis=0)
        best = min(range(len(C_GRID)), key=lambda c: (-round(mean_accuracy[c], 12), mean_loss[c]))
        scores = {"mean_accuracy": mean_accuracy.tolist(), "mean_log_loss": mean_loss.tolist()}
    return {"C": C_GRID[best], "grid": list(C_GRID), "folds": folds, "rows": len(X), "scores": scores}


def _with_validation(X: np.ndarray, y, validation_data, multi_label: bool) -> tuple[np.ndarray, Any]:
    """Training and validation rows together (validation rows of classes training lacks left out)."""
    if validation_data is None or not len(validation_data[1]):
        return X, y
    Xv = _check_features(validation_data[0], X.shape[1])
    yv = validation_data[1]
    if multi_label:
        joined = np.empty(len(y) + len(yv), dtype=object)
        joined[:] = [*y, *yv]
        return np.concatenate([X, Xv]), joined
    known = set(np.asarray(y).tolist())
    keep = np.array([label in known for label in np.asarray(yv).tolist()], dtype=bool)
    return np.concatenate([X, Xv[keep]]), np.concatenate([np.asarray(y), np.asarray(yv)[keep]])


class LogRegHead(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression on standardised features.

    Parameters
    ----------
    C : float, inverse regularisation strength; or 'auto': chosen from `C_GRID` by 5-fold cross-validation over
        the training and validation rows (`fit`'s validation_data), then refitted on the training rows only
        (`C_` is the C used, `C_search_` the grid and scores; train-head's default).
    class_weight : None or 'balanced'.
    max_iter : int, L-BFGS iterations at most.
    random_state : int.
    multi_label : bool, one-vs-rest over label tuples instead of a softmax over one label per image.
    """

    pipeline_: Any  # the fitted scikit-learn pipeline (scaler, then one or many logistic regressions)
    C_search_: dict | None  # how C was chosen (None: C was given)

    def __init__(
        self,
        *,
        C: float | str = 1.0,
        class_weight: str | None = None,
        max_iter: int = 1000,
        random_state: int = 0,
        multi_label: bool = False,
    ):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state
        self.multi_label = multi_label

    def _logreg(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(
            C=self.C_, class_weight=self.class_weight, max_iter=self.max_iter, random_state=self.random_state
        )

    def _fixed_C(self) -> float:
        if isinstance(self.C, str) or not np.isfinite(self.C) or self.C <= 0:
            raise BottleneckError(f"C must be a positive number or 'auto'; got {self.C!r}")
        return float(self.C)

    def fit(self, X, y, validation_data=None) -> LogRegHead:
        """Fit on X of shape (n_samples, n_features) and string labels y (multi-label: label tuples);
        validation_data (X, y) only takes part in choosing C when C is 'auto'."""
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X, y = _training_data(X, y, type(self).__name__, self.multi_label)
        if self.C == "auto":
            X_all, y_all = _search_sample(
                *_with_validation(X, y, validation_data, self.multi_label), self.multi_label, self.random_state
            )
            self.C_search_ = _cross_validated_C(
                X_all, y_all, self.multi_label, self.class_weight, self.max_iter, self.random_state
            )
            self.C_ = self.C_search_["C"]
        else:
            self.C_, self.C_search_ = self._fixed_C(), None
        if self.multi_label:
            self._fit_one_vs_rest(X, y)
            self.n_iter_ = np.array([max(int(np.max(e.n_iter_)) for e in self.pipeline_[-1].estimators_)])
        else:
            self.pipeline_ = make_pipeline(StandardScaler(), self._logreg())
            self.pipeline_.fit(X, np.asarray(y))
            self.classes_ = self.pipeline_.classes_
            self.n_iter_ = self.pipeline_[-1].n_iter_
        self.n_features_in_ = X.shape[1]
        self.history_ = None
        self.solver_ = "lbfgs"
        return self

    def _fit_one_vs_rest(self, X: np.ndarray, y) -> None:
        """One binary logistic regression per label on the standardised features (`class_weight` per label)."""
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from bottleneck.learn.head_file import arrays_from_pipeline

        self.classes_ = _label_classes(y)
        self.pipeline_ = make_pipeline(StandardScaler(), OneVsRestClassifier(self._logreg()))
        self.pipeline_.fit(X, multi_hot(y, self.classes_).astype(np.int64))
        self.arrays_ = arrays_from_pipeline(self.pipeline_, self.classes_)

    def fit_rows(self, rows, y, validation_data=None, chunk_rows: int = 4096) -> LogRegHead:
        """Fit on features too large for memory (`FeatureRows`), reading `chunk_rows` rows at a time.

        Why this solver: it minimises exactly the objective `fit` does (scikit-learn's
        multinomial logistic regression: mean weighted cross-entropy + ||W||^2 / (2 C sum(w)),
        intercept unpenalised; binomial for two classes) with the same L-BFGS and tolerances,
        but every loss-and-gradient evaluation is one streamed pass over the chunks. So the
        model is the in-memory one up to solver tolerance, it is deterministic (chunks in a
        fixed order, no learning rate, no shuffling), and the saved artefact is the same
        Pipeline(StandardScaler, LogisticRegression) whose `predict_proba` is a softmax, which
        `export` folds into one Dense layer. SGDClassifier(log_loss) was not used: its
        multiclass model is one-vs-rest (its probabilities are normalised sigmoids, not a
        softmax, so they do not fold into a Dense softmax) and it depends on a step-size schedule.
        The cost is time: one read of the training rows per L-BFGS iteration (and line search).
        The scaler is fitted in one streamed pass first (`partial_fit`).
        """
        from scipy.optimize import minimize
        from scipy.special import logsumexp
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        if self.multi_label:
            raise _streamed_multi_label(self)
        if self.C == "auto":  # each fit is a read of the store per L-BFGS iteration: a grid of them is too dear
            self.C_, self.C_search_ = (
                1.0,
                {
                    "C": 1.0,
                    "grid": None,
                    "reason": "features streamed from the store are not cross-validated: C 1 kept (pass --C to choose)",
                },
            )
        else:
            self.C_, self.C_search_ = self._fixed_C(), None
        y = np.asarray(y)
        classes = np.array(sorted(set(y.tolist())))
        y_index = np.searchsorted(classes, y)
        n, d, k = len(rows), rows.dim, len(classes)
        if k < 2:
            raise BottleneckError(f"logreg needs at least 2 classes in the training split; got {k}")
        outputs = 1 if k == 2 else k
        scaler = _streamed_scaler(rows, chunk_rows)
        mean = scaler.mean_.astype(np.float32)
        scale = scaler.scale_.astype(np.float32)
        weights = _sample_weights(y_index, k, self.class_weight)
        total = float(n if weights is None else weights.sum())
        l2 = 1.0 / (self.C_ * total)
        passes = [0]

        def loss_and_gradient(w: np.ndarray) -> tuple[float, np.ndarray]:
            w = w.reshape(outputs, d + 1)
            coef32 = np.ascontiguousarray(w[:, :d].T, dtype=np.float32)  # (d, outputs); BLAS wants C order
            loss, gradient = 0.0, np.zeros_like(w)
            for positions, block in rows.chunks(chunk_rows):
                block -= mean
                block /= scale
                z = (block @ coef32).astype(np.float64) + w[:, d]
                logits = np.hstack([np.zeros((len(z), 1)), z]) if k == 2 else z
                target = y_index[positions]
                log_norm = logsumexp(logits, axis=1)
                residual = np.exp(logits - log_norm[:, None])
                residual[np.arange(len(target)), target] -= 1.0
                pointwise = log_norm - logits[np.arange(len(target)), target]
                if k == 2:
                    residual = residual[:, 1:]
                if weights is not None:
                    sw = weights[positions]
                    pointwise = pointwise * sw
                    residual *= sw[:, None]
                loss += float(pointwise.sum())
                gradient[:, :d] += np.ascontiguousarray(residual.T, dtype=np.float32) @ block
                gradient[:, d] += residual.sum(axis=0)
            passes[0] += 1
            loss /= total
            gradient /= total
            loss += 0.5 * l2 * float(np.sum(w[:, :d] ** 2))
            gradient[:, :d] += l2 * w[:, :d]
            return loss, gradient.ravel()

        result = minimize(
            loss_and_gradient,
            np.zeros(outputs * (d + 1)),
            method="L-BFGS-B",
            jac=True,
            options={"maxiter": self.max_iter, "maxls": 50, "gtol": 1e-4, "ftol": 64 * np.finfo(float).eps},
        )
        w = result.x.reshape(outputs, d + 1)
        logreg = LogisticRegression(
            C=self.C_, class_weight=self.class_weight, max_iter=self.max_iter, random_state=self.random_state
        )
        logreg.classes_ = classes
        logreg.coef_ = np.ascontiguousarray(w[:, :d])
        logreg.intercept_ = w[:, d].copy()
        logreg.n_features_in_ = d
        logreg.n_iter_ = np.array([result.nit], dtype=np.int32)
        self.pipeline_ = make_pipeline(scaler, logreg)
        self.classes_ = classes
        self.n_features_in_ = d
        self.history_ = None
        self.solver_ = "lbfgs, streamed"
        self.passes_ = passes[0] + 1  # and one for the scaler
        self.n_iter_ = np.array([result.nit])
        self.converged_ = bool(result.success)
        return self

    def predict_proba_rows(self, rows, chunk_rows: int = 4096) -> np.ndarray:
        """`predict_proba` of `FeatureRows`, chunk by chunk."""
        return _proba_by_chunks(self.predict_proba, rows, len(self.classes_), chunk_rows)

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities of shape (n_samples, n_classes), columns in `classes_` order (multi-label: each label's own)."""
        check_is_fitted(self)
        X = _check_features(X, self.n_features_in_, type(self).__name__)
        return self.arrays_.predict_proba(X) if self.multi_label else self.pipeline_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row; multi-label: a 0/1 matrix of the labels over one half."""
        return _predicted(self, X)

    def save(self, folder: Path) -> Path:
        """Write `head.npz` (plain arrays: what bottleneck loads) and `model.joblib` (a scikit-learn Pipeline, for you).

        Returns the path of `head.npz`: a pickle runs code when it is loaded, so nothing of ours loads one.
        """
        import joblib

        from bottleneck.learn.head_file import arrays_from_pipeline, save_head

        joblib.dump(self.pipeline_, Path(folder) / "model.joblib")
        return save_head(self.arrays_ if self.multi_label else arrays_from_pipeline(self.pipeline_), folder)


HEADS = {"logreg": LogRegHead, "keras": KerasHead, "knn": KnnHead}


def make_head(name: str, **params) -> BaseEstimator:
    """A head by name; a parameter it does not take is an error, not silently ignored."""
    if name not in HEADS:
        raise BottleneckError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    cls = HEADS[name]
    accepted = cls().get_params()
    if "random_state" not in accepted:  # a deterministic head (knn) has no seed to take
        params.pop("random_state", None)
    foreign = sorted(k for k, v in params.items() if k not in accepted and v is not None)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise BottleneckError(f"{flags} does not apply to the {name} head")
    return cls(**{k: v for k, v in params.items() if v is not None})
