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
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from bottleneck.backbones.build import import_tensorflow
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
    return BottleneckError(f"a multi-label {type(head).__name__} trains on features in memory, and these are streamed "
                           "from the store: raise --max-memory")


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
        raise FeaturesError(f"features must be a 2-d array (n_samples, n_features); got shape {X.shape}. "
                            "Reshape your data: X.reshape(1, -1) for one sample")
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


#: `C="auto"`'s log grid, 1e-4 to 1e2 (CLIP's linear probes sweep a similar one).
C_GRID = tuple(float(10.0 ** e) for e in range(-4, 3))
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
        return {"C": 1.0, "grid": list(C_GRID), "folds": folds, "rows": len(X),
                "reason": "a class has a single training or validation image: nothing to cross-validate, C 1 kept"}
    accuracy = np.zeros((folds, len(C_GRID)))
    loss = np.zeros((folds, len(C_GRID)))
    for f, (fit_rows, held) in enumerate(splitter.split(X, target if not multi_label else None)):
        scaler = StandardScaler().fit(X[fit_rows])
        X_fit, X_held = scaler.transform(X[fit_rows]), scaler.transform(X[held])
        if multi_label:
            for c, C in enumerate(C_GRID):  # one-vs-rest clones its estimator: no warm start here
                model = OneVsRestClassifier(LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter,
                                                               random_state=seed)).fit(X_fit, target[fit_rows])
                p = np.clip(np.asarray(model.predict_proba(X_held), np.float64), 1e-15, 1 - 1e-15)
                truth = target[held]
                loss[f, c] = float(-np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p)))
            continue
        model = LogisticRegression(C=C_GRID[0], class_weight=class_weight, max_iter=max_iter, random_state=seed,
                                   warm_start=True)
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

    def __init__(self, *, C: float | str = 1.0, class_weight: str | None = None, max_iter: int = 1000, random_state: int = 0,
                 multi_label: bool = False):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state
        self.multi_label = multi_label

    def _logreg(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C_, class_weight=self.class_weight, max_iter=self.max_iter,
                                  random_state=self.random_state)

    def _fixed_C(self) -> float:
        if isinstance(self.C, str) or not np.isfinite(self.C) or self.C <= 0:
            raise BottleneckError(f"C must be a positive number or 'auto'; got {self.C!r}")
        return float(self.C)

    def fit(self, X, y, validation_data=None) -> "LogRegHead":
        """Fit on X of shape (n_samples, n_features) and string labels y (multi-label: label tuples);
        validation_data (X, y) only takes part in choosing C when C is 'auto'."""
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X, y = _training_data(X, y, type(self).__name__, self.multi_label)
        if self.C == "auto":
            X_all, y_all = _search_sample(*_with_validation(X, y, validation_data, self.multi_label), self.multi_label,
                                          self.random_state)
            self.C_search_ = _cross_validated_C(X_all, y_all, self.multi_label, self.class_weight, self.max_iter,
                                                self.random_state)
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

    def fit_rows(self, rows, y, validation_data=None, chunk_rows: int = 4096) -> "LogRegHead":
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
            self.C_, self.C_search_ = 1.0, {"C": 1.0, "grid": None, "reason": "features streamed from the store are "
                                            "not cross-validated: C 1 kept (pass --C to choose)"}
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

        result = minimize(loss_and_gradient, np.zeros(outputs * (d + 1)), method="L-BFGS-B", jac=True,
                          options={"maxiter": self.max_iter, "maxls": 50, "gtol": 1e-4, "ftol": 64 * np.finfo(float).eps})
        w = result.x.reshape(outputs, d + 1)
        logreg = LogisticRegression(C=self.C_, class_weight=self.class_weight, max_iter=self.max_iter,
                                    random_state=self.random_state)
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


def _predicted(head, X) -> np.ndarray:
    proba = head.predict_proba(X)
    return (proba >= 0.5).astype(np.int64) if head.multi_label else head.classes_[np.argmax(proba, axis=1)]


def _proba_by_chunks(predict_proba, rows, n_classes: int, chunk_rows: int) -> np.ndarray:
    out = np.zeros((len(rows), n_classes))
    for positions, block in rows.chunks(chunk_rows):
        out[positions] = predict_proba(block)
    return out


class KerasHead(ClassifierMixin, BaseEstimator):
    """A Keras softmax layer on standardised features: Adam, an L2 penalty, optional dropout, early stopping on the
    validation loss with the best weights restored.

    The defaults are set so the head neither underfits few images (enough steps: a batch size that gives about 20
    per epoch, a larger step size, patience) nor overfits them (the L2 penalty); see the README for when to prefer
    it to logreg.

    Parameters
    ----------
    epochs : int, at most this many passes.
    learning_rate : float, Adam's step size.
    dropout : float in [0, 1), applied to the features.
    batch_size : int, or None: about 20 steps per epoch (the training rows / 20, from 8 to 64).
    patience : int, epochs without a better validation loss before stopping.
    l2 : float, the L2 penalty on the Dense layer's weights (added to the mean loss: l2 * sum(w ** 2)).
    class_weight : None or 'balanced'.
    random_state : int, seeds Keras, NumPy and Python.
    multi_label : bool, a Dense sigmoid layer and binary cross-entropy over label tuples instead of a softmax.
    verbose : int, 1 shows a bar (or a line per epoch) on stderr.
    """

    #: The largest batch `batch_size=None` picks.
    MAX_AUTO_BATCH = 64

    def __init__(self, *, epochs: int = 300, learning_rate: float = 1e-2, dropout: float = 0.0,
                 batch_size: int | None = None, patience: int = 20, l2: float = 1e-2, class_weight: str | None = None,
                 random_state: int = 0, multi_label: bool = False, verbose: int = 0):
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.dropout = dropout
        self.batch_size = batch_size
        self.patience = patience
        self.l2 = l2
        self.class_weight = class_weight
        self.random_state = random_state
        self.multi_label = multi_label
        self.verbose = verbose

    def _batch(self, rows: int) -> int:
        """`batch_size`, or about 20 steps per epoch over `rows` training rows (8 to 64 rows a batch)."""
        return int(self.batch_size) if self.batch_size else int(min(self.MAX_AUTO_BATCH, max(8, rows // 20)))

    def _callbacks(self, keras, monitor: str) -> list:
        from bottleneck.learn.progress import epoch_callback

        stop = keras.callbacks.EarlyStopping(monitor=monitor, patience=self.patience, restore_best_weights=True)
        shown = epoch_callback("keras head", self.epochs, bool(self.verbose))
        return [stop] + ([shown] if shown else [])

    def _build(self, X: np.ndarray | None, n_classes: int, moments: tuple | None = None):
        """The model; the normalisation is adapted on X, or set from streamed (dim, mean, variance)."""
        _, keras = import_tensorflow()

        dim = X.shape[1] if X is not None else moments[0]
        inputs = keras.Input((dim,), name="features")
        if X is not None:
            normalise = keras.layers.Normalization(name="standardise")
            normalise.adapt(X)
        else:
            normalise = keras.layers.Normalization(name="standardise", mean=moments[1], variance=moments[2])
        x = normalise(inputs)
        if self.dropout:
            x = keras.layers.Dropout(self.dropout, seed=self.random_state)(x)
        penalty = keras.regularizers.L2(self.l2) if self.l2 else None
        if self.multi_label:
            outputs = keras.layers.Dense(n_classes, activation="sigmoid", name="sigmoid", kernel_regularizer=penalty)(x)
            loss, metrics = "binary_crossentropy", []
        else:
            outputs = keras.layers.Dense(n_classes, activation="softmax", name="softmax", kernel_regularizer=penalty)(x)
            loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
        model = keras.Model(inputs, outputs, name="bottleneck_head")
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate), loss=loss, metrics=metrics)
        return model

    def _multi_label_targets(self, y, validation_data) -> tuple[np.ndarray, tuple | None]:
        """(multi-hot training targets, (validation features, multi-hot targets) or None); sets `classes_`."""
        if self.class_weight is not None:
            raise BottleneckError("--class-weight balanced weighs one class per image: a multi-label keras head does "
                                  "not take it (the logreg head weighs each label's positives)")
        self.classes_ = _label_classes(y)
        validation = None
        if validation_data is not None and len(validation_data[1]):
            validation = (_check_features(validation_data[0]), multi_hot(validation_data[1], self.classes_))
        return multi_hot(y, self.classes_), validation

    def fit(self, X, y, validation_data=None) -> "KerasHead":
        """Fit on X of shape (n_samples, n_features) and string labels y; stop early on validation loss."""
        tf, keras = import_tensorflow()
        keras.utils.set_random_seed(self.random_state)
        tf.config.experimental.enable_op_determinism()
        X, y = _training_data(X, y, type(self).__name__, self.multi_label)
        if self.multi_label:
            y_index, validation = self._multi_label_targets(y, validation_data)
            self._fit_model(keras, X, y_index, validation, None)
            return self
        self.classes_ = np.array(sorted(set(np.asarray(y).tolist())))
        index = {label: i for i, label in enumerate(self.classes_)}
        y_index = np.array([index[label] for label in y])
        weights = None
        if self.class_weight == "balanced":
            from sklearn.utils.class_weight import compute_class_weight

            values = compute_class_weight("balanced", classes=np.arange(len(self.classes_)), y=y_index)
            weights = dict(enumerate(values))
        elif isinstance(self.class_weight, dict):  # {label: weight}, as scikit-learn's classifiers take it
            weights = {i: float(self.class_weight.get(label, 1.0)) for i, label in enumerate(self.classes_.tolist())}
        validation = None
        if validation_data is not None and len(validation_data[1]):
            Xv, yv = validation_data
            known = [i for i, label in enumerate(yv) if label in index]
            validation = (_check_features(Xv)[known], np.array([index[yv[i]] for i in known]))
        self._fit_model(keras, X, y_index, validation, weights)
        return self

    def _fit_model(self, keras, X: np.ndarray, targets: np.ndarray, validation: tuple | None, weights: dict | None) -> None:
        """Build the model on X and train it, early stopping on the validation loss (else the training loss)."""
        self.model_ = self._build(X, len(self.classes_))
        history = self.model_.fit(X, targets, validation_data=validation, epochs=self.epochs, batch_size=self._batch(len(X)),
                                  class_weight=weights, callbacks=self._callbacks(keras, "val_loss" if validation else "loss"),
                                  verbose=0, shuffle=True)
        self.history_ = {k: [float(v) for v in values] for k, values in history.history.items()}
        self.n_features_in_ = X.shape[1]
        self.solver_ = "adam"

    def fit_rows(self, rows, y, validation_data=None, chunk_rows: int = 4096) -> "KerasHead":
        """Fit on features too large for memory (`FeatureRows`), streamed from the store chunk by chunk.

        Each epoch visits the chunks in a seeded random order and the rows of each chunk in a
        seeded random order (seeded by `random_state` and the epoch), in batches of `batch_size`
        within a chunk. The normalisation takes the mean and variance of a first streamed pass;
        validation is streamed too, and early stopping works as in `fit`.
        """
        if self.multi_label:
            raise _streamed_multi_label(self)
        tf, keras = import_tensorflow()
        keras.utils.set_random_seed(self.random_state)
        tf.config.experimental.enable_op_determinism()
        y = np.asarray(y)
        self.classes_ = np.array(sorted(set(y.tolist())))
        index = {label: i for i, label in enumerate(self.classes_)}
        y_index = np.array([index[label] for label in y], dtype=np.int64)
        weights = _sample_weights(y_index, len(self.classes_), self.class_weight)
        scaler = _streamed_scaler(rows, chunk_rows)
        d = rows.dim
        signature = (tf.TensorSpec((None, d), tf.float32), tf.TensorSpec((None,), tf.int64))
        if weights is not None:
            signature += (tf.TensorSpec((None,), tf.float32),)
        epoch = [0]
        batch_size = self._batch(len(rows))

        def training_batches():
            rng = np.random.default_rng([self.random_state, epoch[0]])
            epoch[0] += 1
            for positions, block in rows.chunks(chunk_rows, rng):
                for start in range(0, len(positions), batch_size):
                    at = positions[start : start + batch_size]
                    batch = (block[start : start + batch_size], y_index[at])
                    yield batch + ((weights[at].astype(np.float32),) if weights is not None else ())

        train = tf.data.Dataset.from_generator(training_batches, output_signature=signature).apply(
            tf.data.experimental.assert_cardinality(rows.batches(chunk_rows, batch_size)))
        validation = None
        if validation_data is not None and len(validation_data[1]):
            val_rows, yv = validation_data
            known = np.array([i for i, label in enumerate(yv) if label in index], dtype=np.int64)
            if known.size:
                val_rows = val_rows.subset(known)
                yv_index = np.array([index[yv[i]] for i in known], dtype=np.int64)

                def validation_batches():
                    for positions, block in val_rows.chunks(chunk_rows):
                        for start in range(0, len(positions), 1024):
                            yield block[start : start + 1024], yv_index[positions[start : start + 1024]]

                validation = tf.data.Dataset.from_generator(validation_batches, output_signature=signature[:2]).apply(
                    tf.data.experimental.assert_cardinality(val_rows.batches(chunk_rows, 1024)))
        self.model_ = self._build(None, len(self.classes_), (d, scaler.mean_, scaler.var_))
        history = self.model_.fit(train, validation_data=validation, epochs=self.epochs, verbose=0, shuffle=False,
                                  callbacks=self._callbacks(keras, "val_loss" if validation is not None else "loss"))
        self.history_ = {k: [float(v) for v in values] for k, values in history.history.items()}
        self.n_features_in_ = d
        self.solver_ = "adam, streamed"
        return self

    def predict_proba_rows(self, rows, chunk_rows: int = 4096) -> np.ndarray:
        """`predict_proba` of `FeatureRows`, chunk by chunk."""
        return _proba_by_chunks(self.predict_proba, rows, len(self.classes_), chunk_rows)

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = _check_features(X, self.n_features_in_, type(self).__name__)
        return self.model_.predict(X, batch_size=1024, verbose=0).astype(np.float64)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row; multi-label: a 0/1 matrix of the labels over one half."""
        return _predicted(self, X)

    def save(self, folder: Path) -> Path:
        """Write `model.keras` and `labels.json` (the label of each output unit, in order)."""
        path = Path(folder) / "model.keras"
        self.model_.save(path)
        (Path(folder) / "labels.json").write_text(json.dumps([str(c) for c in self.classes_]))
        return path


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

    def fit(self, X, y, validation_data=None) -> "KnnHead":
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
        np.add.at(proba, (np.repeat(np.arange(len(similarity)), neighbours.shape[1]), self.targets_[neighbours].ravel()),
                  weights.ravel())
        return proba / proba.sum(axis=1, keepdims=True)

    def fit_rows(self, rows, y, validation_data=None, chunk_rows: int = 4096) -> "KnnHead":
        raise BottleneckError("the knn head keeps every training row in memory, and these features are streamed from "
                              "the store: raise --max-memory, or train a logreg head")

    def predict_proba(self, X) -> np.ndarray:
        """Similarity-weighted vote shares of the k nearest training rows, columns in `classes_` order."""
        check_is_fitted(self)
        X = _check_features(X, self.n_features_in_, type(self).__name__)
        return self._votes(*self._nearest(_unit_rows(X), self.k_))

    def predict(self, X) -> np.ndarray:
        return _predicted(self, X)

    def arrays(self):
        from bottleneck.learn.head_file import KnnArrays

        return KnnArrays(self.features_, self.targets_.astype(np.int64), np.asarray([str(c) for c in self.classes_],
                                                                                   dtype=np.str_), self.k_)

    def save(self, folder: Path) -> Path:
        """Write `head.npz`: the normalised training rows, their class indices, the classes and k (plain arrays)."""
        from bottleneck.learn.head_file import save_knn

        return save_knn(self.arrays(), folder)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (a zero row stays zero), float32."""
    X = np.asarray(X, np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, np.finfo(np.float32).tiny)


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
