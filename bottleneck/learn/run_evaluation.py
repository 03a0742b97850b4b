"""A run's head fitted and scored: in memory or streamed from the store, each split's scores (multi-label:
thresholds chosen on validation) and the test split's mistakes into its metrics."""

from __future__ import annotations

from typing import Callable

import numpy as np

from bottleneck.learn.dataset import FeatureRows, LabelledFeatures
from bottleneck.learn.metrics import (
    calibration,
    misclassified,
    multi_label_metrics,
    multi_label_mistakes,
    split_metrics,
)
from bottleneck.learn.splits import SPLITS
from bottleneck.learn.thresholds import Thresholds, choose_thresholds


def _fit(model, rows: FeatureRows, y: np.ndarray, validation: tuple[FeatureRows, np.ndarray], chunk_rows: int) -> None:
    """In memory exactly as ever; streamed (`fit_rows`) when the rows are left in the store."""
    if rows.in_memory:
        model.fit(rows.array, y, validation_data=(validation[0].materialise(), validation[1]))
    else:
        model.fit_rows(rows, y, validation_data=validation, chunk_rows=chunk_rows)


def _proba(model, rows: FeatureRows, chunk_rows: int) -> np.ndarray:
    return model.predict_proba(rows.array) if rows.in_memory else model.predict_proba_rows(rows, chunk_rows)


def _evaluate(
    model, X: FeatureRows, data: LabelledFeatures, mask: dict, labels: list[str], chunk_rows: int, metrics: dict
) -> tuple[list[str], list[str], np.ndarray]:
    """Each split's scores and the test split's mistakes into `metrics`; returns the test predictions."""
    for name in SPLITS:
        idx = np.flatnonzero(mask[name])
        known = [i for i in idx if data.labels[i] in labels]
        proba = (
            _proba(model, X.subset(np.array(known, dtype=np.int64)), chunk_rows)
            if known
            else np.zeros((0, len(labels)))
        )
        # intervals for the held-out splits: an interval around the training accuracy says nothing
        metrics["splits"][name] = split_metrics(
            proba, [data.labels[i] for i in known], labels, intervals=name != "train"
        )
        if metrics["splits"][name]:  # how far its confidences are from its accuracy (15 bins)
            record = calibration(proba, [data.labels[i] for i in known], labels)
            assert record is not None  # the split has images: it has metrics
            metrics["splits"][name]["expected_calibration_error"] = record["expected_calibration_error"]
        if name == "test":
            metrics["misclassified"] = misclassified(
                proba, [data.labels[i] for i in known], [data.relpaths[i] for i in known], labels
            )
            test_predictions = ([data.relpaths[i] for i in known], [data.labels[i] for i in known], proba)
    return test_predictions


def _evaluate_multi_label(
    model,
    X: FeatureRows,
    data: LabelledFeatures,
    mask: dict,
    labels: list[str],
    chunk_rows: int,
    metrics: dict,
    log: Callable[[str], None],
) -> tuple[Thresholds, tuple[list[str], list[str], np.ndarray]]:
    """Thresholds from the validation split alone, then each split's multi-label scores and the test split's
    mistakes into `metrics`; returns the thresholds and the test predictions."""
    from bottleneck.learn.heads import multi_hot

    proba, truth = {}, {}
    for name in SPLITS:
        idx = np.flatnonzero(mask[name])
        proba[name] = _proba(model, X.subset(idx), chunk_rows) if len(idx) else np.zeros((0, len(labels)))
        truth[name] = multi_hot([data.label_sets[i] for i in idx], labels)
    thresholds = choose_thresholds(proba["validation"], truth["validation"], labels)
    log(
        f"thresholds chosen on the validation split ({int(mask['validation'].sum())} images), each maximising its "
        "label's F1"
        + (
            f"; {len(thresholds.defaulted)} labels have no validation positive and keep 0.5: "
            f"{', '.join(thresholds.defaulted[:5])}"
            if thresholds.defaulted
            else ""
        )
    )
    metrics["thresholds"] = thresholds.record()
    for name in SPLITS:
        metrics["splits"][name] = multi_label_metrics(
            proba[name], truth[name], labels, thresholds.decide(proba[name]), intervals=name != "train"
        )
    test = np.flatnonzero(mask["test"])
    paths = [data.relpaths[i] for i in test]
    metrics["misclassified"] = multi_label_mistakes(
        proba["test"], truth["test"], thresholds.decide(proba["test"]), paths, labels
    )
    return thresholds, (paths, [data.labels[i] for i in test], proba["test"])
