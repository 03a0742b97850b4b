"""`KerasHead`: a Keras softmax (or, multi-label, sigmoid) layer on standardised features (see `heads.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from bottleneck.backbones.build import import_tensorflow
from bottleneck.errors import BottleneckError
from bottleneck.learn.heads_common import (
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

    def __init__(
        self,
        *,
        epochs: int = 300,
        learning_rate: float = 1e-2,
        dropout: float = 0.0,
        batch_size: int | None = None,
        patience: int = 20,
        l2: float = 1e-2,
        class_weight: str | None = None,
        random_state: int = 0,
        multi_label: bool = False,
        verbose: int = 0,
    ):
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

        if X is not None:
            dim = X.shape[1]
            normalise = keras.layers.Normalization(name="standardise")
            normalise.adapt(X)
        elif moments is not None:
            dim, mean, variance = moments
            normalise = keras.layers.Normalization(name="standardise", mean=mean, variance=variance)
        else:
            raise ValueError("a head is built from its data or from its data's (dim, mean, variance)")
        inputs = keras.Input((dim,), name="features")
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
            raise BottleneckError(
                "--class-weight balanced weighs one class per image: a multi-label keras head does "
                "not take it (the logreg head weighs each label's positives)"
            )
        self.classes_ = _label_classes(y)
        validation = None
        if validation_data is not None and len(validation_data[1]):
            validation = (_check_features(validation_data[0]), multi_hot(validation_data[1], self.classes_))
        return multi_hot(y, self.classes_), validation

    def fit(self, X, y, validation_data=None) -> KerasHead:
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

    def _fit_model(
        self, keras, X: np.ndarray, targets: np.ndarray, validation: tuple | None, weights: dict | None
    ) -> None:
        """Build the model on X and train it, early stopping on the validation loss (else the training loss)."""
        self.model_ = self._build(X, len(self.classes_))
        history = self.model_.fit(
            X,
            targets,
            validation_data=validation,
            epochs=self.epochs,
            batch_size=self._batch(len(X)),
            class_weight=weights,
            callbacks=self._callbacks(keras, "val_loss" if validation else "loss"),
            verbose=0,
            shuffle=True,
        )
        self.history_ = {k: [float(v) for v in values] for k, values in history.history.items()}
        self.n_features_in_ = X.shape[1]
        self.solver_ = "adam"

    def fit_rows(self, rows, y, validation_data=None, chunk_rows: int = 4096) -> KerasHead:
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
        signature: tuple = (tf.TensorSpec((None, d), tf.float32), tf.TensorSpec((None,), tf.int64))
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
            tf.data.experimental.assert_cardinality(rows.batches(chunk_rows, batch_size))
        )
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
                    tf.data.experimental.assert_cardinality(val_rows.batches(chunk_rows, 1024))
                )
        self.model_ = self._build(None, len(self.classes_), (d, scaler.mean_, scaler.var_))
        history = self.model_.fit(
            train,
            validation_data=validation,
            epochs=self.epochs,
            verbose=0,
            shuffle=False,
            callbacks=self._callbacks(keras, "val_loss" if validation is not None else "loss"),
        )
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
        # The compiled predict step on slices of 1024 rows, as `model.predict(X, batch_size=1024)` would run it
        # (the same numbers), without building a tf.data pipeline per call: checks and folds predict many times.
        parts = [self.model_.predict_on_batch(X[start : start + 1024]) for start in range(0, len(X), 1024)]
        return np.concatenate(parts).astype(np.float64)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row; multi-label: a 0/1 matrix of the labels over one half."""
        return _predicted(self, X)

    def save(self, folder: Path) -> Path:
        """Write `model.keras` and `labels.json` (the label of each output unit, in order)."""
        path = Path(folder) / "model.keras"
        self.model_.save(path)
        (Path(folder) / "labels.json").write_text(json.dumps([str(c) for c in self.classes_]))
        return path
