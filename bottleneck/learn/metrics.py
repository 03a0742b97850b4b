"""Metrics of a head on one split, as plain JSON-able data.

Accuracy and macro F1 (multi-label: micro F1 and exact match) carry a 95% percentile bootstrap
interval over the split's images (`<name>_ci: [low, high]`), seeded, so a score is read with how far
another draw of test images of that size could move it. `paired_difference` is the same bootstrap
for two runs scored on the same images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

#: The bootstrap behind every interval: resamples, level, seed (fixed: the same predictions give the same interval).
RESAMPLES = 1000
LEVEL = 0.95
CI_SEED = 0
#: Resampled indices held at once (resamples x images): a few MB, so the bootstrap adds little to a streamed run's peak.
_BLOCK_ELEMENTS = 250_000


def bootstrap_interval(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = CI_SEED,
) -> list[float] | None:
    """The percentile bootstrap interval of a statistic of n images: `statistic` takes a (b, n) array of
    resampled image indices (drawn with replacement) and returns the b values. None for no image."""
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // n)
    values = np.concatenate(
        [statistic(rng.integers(0, n, (min(block, resamples - start), n))) for start in range(0, resamples, block)]
    )
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def _class_counts(classes: np.ndarray, idx: np.ndarray, k: int, where: np.ndarray | None = None) -> np.ndarray:
    """(b, k): how many of each resample's images are of each class (only those `where` holds)."""
    b = idx.shape[0]
    offsets = (np.arange(b)[:, None] * k + classes[idx]).ravel()
    weights = None if where is None else where[idx].ravel().astype(np.float64)
    return np.bincount(offsets, weights=weights, minlength=b * k).reshape(b, k)


def macro_f1_of_resamples(truth: np.ndarray, predicted: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """Macro F1 over all k classes (a class neither true nor predicted scores 0, as `f1_score` with
    zero_division=0) of each resample; truth and predicted are class indices, a true label outside the
    k classes is k (it counts against the class predicted for it)."""
    hit = truth == predicted
    true_counts, predicted_counts = _class_counts(truth, idx, k + 1), _class_counts(predicted, idx, k + 1)
    hits = _class_counts(truth, idx, k + 1, hit)
    total = (true_counts + predicted_counts)[:, :k]
    hits = hits[:, :k]
    f1 = np.divide(2 * hits, total, out=np.zeros_like(total, dtype=np.float64), where=total > 0)
    return f1.mean(axis=1)


def classification_intervals(truth: np.ndarray, predicted: np.ndarray, k: int, seed: int = CI_SEED) -> dict:
    """accuracy_ci and macro_f1_ci of one split (class indices)."""
    hit = (truth == predicted).astype(np.float64)
    return {
        "accuracy_ci": bootstrap_interval(lambda idx: hit[idx].mean(axis=1), len(hit), seed=seed),
        "macro_f1_ci": bootstrap_interval(
            lambda idx: macro_f1_of_resamples(truth, predicted, k, idx), len(hit), seed=seed
        ),
    }


def paired_difference(correct_a: ArrayLike, correct_b: ArrayLike, seed: int = CI_SEED) -> dict | None:
    """Accuracy of A minus accuracy of B on the same images (0/1 per image, aligned), with its 95% paired
    bootstrap interval (the same images resampled for both). None for no shared image."""
    diff = np.asarray(correct_a, np.float64) - np.asarray(correct_b, np.float64)
    if len(diff) == 0:
        return None
    return {
        "images": int(len(diff)),
        "difference": float(diff.mean()),
        "ci": bootstrap_interval(lambda idx: diff[idx].mean(axis=1), len(diff), seed=seed),
    }


def split_metrics(proba: np.ndarray, y_true: list[str], labels: list[str], intervals: bool = True) -> dict | None:
    """accuracy, macro F1, log loss, top-5 (over 5 classes), per-class scores and the confusion matrix; with
    `intervals`, the 95% bootstrap intervals of accuracy and macro F1."""
    if len(y_true) == 0:
        return None
    proba = proba / proba.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only roughly
    labels_array = np.array(labels)
    predicted = labels_array[np.argmax(proba, axis=1)]
    precision, recall, f1, support = precision_recall_fscore_support(y_true, predicted, labels=labels, zero_division=0)
    result = {
        "images": len(y_true),
        "accuracy": float(accuracy_score(y_true, predicted)),
        "macro_f1": float(f1_score(y_true, predicted, labels=labels, average="macro", zero_division=0)),
        "log_loss": float(log_loss(y_true, np.clip(proba, 1e-15, 1), labels=labels)),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(y_true, predicted, labels=labels).tolist(),
    }
    if not intervals:
        return result
    index = {label: i for i, label in enumerate(labels)}
    result.update(
        classification_intervals(
            np.array([index.get(t, len(labels)) for t in y_true]), np.argmax(proba, axis=1), len(labels)
        )
    )
    result["ci"] = {
        "level": LEVEL,
        "resamples": RESAMPLES,
        "method": "percentile bootstrap over the split's images",
        "seed": CI_SEED,
    }
    if len(labels) > 5:
        index = {label: i for i, label in enumerate(labels)}
        top5 = np.argsort(-proba, axis=1)[:, :5]
        result["top5_accuracy"] = float(np.mean([index[t] in row for t, row in zip(y_true, top5)]))
    return result


def misclassified(proba: np.ndarray, y_true: list[str], paths: list[str], labels: list[str]) -> list[dict]:
    """The wrongly predicted images: path, true label, predicted label, confidence; most confident first."""
    predicted = np.argmax(proba, axis=1)
    wrong = [
        {"path": path, "true": true, "predicted": labels[p], "confidence": float(proba[i, p])}
        for i, (path, true, p) in enumerate(zip(paths, y_true, predicted))
        if labels[p] != true
    ]
    return sorted(wrong, key=lambda row: -row["confidence"])


def multi_label_metrics(
    proba: np.ndarray, truth: np.ndarray, labels: list[str], decided: np.ndarray, intervals: bool = True
) -> dict | None:
    """Multi-label scores of one split: mean average precision, micro and macro F1, exact-match accuracy and per-label
    precision, recall, F1, support and average precision. `truth` and `decided` are (n, k) 0/1 (decided: thresholded).

    The mean average precision is over the labels with a positive in this split (None when none has one).
    """
    from sklearn.metrics import average_precision_score

    if len(truth) == 0:
        return None
    truth, decided = np.asarray(truth, bool), np.asarray(decided, bool)
    precision, recall, f1, support = precision_recall_fscore_support(truth, decided, average=None, zero_division=0)
    precision_avg = {
        j: float(average_precision_score(truth[:, j], proba[:, j])) for j in range(len(labels)) if truth[:, j].any()
    }
    return {
        "images": int(len(truth)),
        "multi_label": True,
        "mean_average_precision": float(np.mean(list(precision_avg.values()))) if precision_avg else None,
        "micro_f1": float(f1_score(truth, decided, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(truth, decided, average="macro", zero_division=0)),
        "exact_match": float(accuracy_score(truth, decided)),
        "labels_per_image": float(truth.sum(axis=1).mean()),
        "predicted_per_image": float(decided.sum(axis=1).mean()),
        "per_class": {
            label: {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "support": int(support[j]),
                "average_precision": precision_avg.get(j),
            }
            for j, label in enumerate(labels)
        },
        "labels": list(labels),
        **(multi_label_intervals(truth, decided) if intervals else {}),
    }


def multi_label_intervals(truth: np.ndarray, decided: np.ndarray, seed: int = CI_SEED) -> dict:
    """micro_f1_ci and exact_match_ci of one multi-label split ((n, k) booleans), resampling images."""
    tp = (truth & decided).sum(axis=1).astype(np.float64)
    wrong = (truth != decided).sum(axis=1).astype(np.float64)  # false positives and false negatives
    exact = (wrong == 0).astype(np.float64)

    def micro_f1(idx: np.ndarray) -> np.ndarray:
        hits, total = 2 * tp[idx].sum(axis=1), 2 * tp[idx].sum(axis=1) + wrong[idx].sum(axis=1)
        return np.divide(hits, total, out=np.zeros_like(hits), where=total > 0)

    return {
        "micro_f1_ci": bootstrap_interval(micro_f1, len(tp), seed=seed),
        "exact_match_ci": bootstrap_interval(lambda idx: exact[idx].mean(axis=1), len(tp), seed=seed),
        "ci": {
            "level": LEVEL,
            "resamples": RESAMPLES,
            "method": "percentile bootstrap over the split's images",
            "seed": CI_SEED,
        },
    }


def multi_label_mistakes(
    proba: np.ndarray, truth: np.ndarray, decided: np.ndarray, paths: list[str], labels: list[str]
) -> list[dict]:
    """Images whose predicted label set is not their true one: path, true and predicted sets (`a;b`), and the
    confidence of the surest wrong decision (p of a label wrongly given, 1 - p of one wrongly missed); surest first."""
    from bottleneck.features.label_file import joined_labels

    truth, decided = np.asarray(truth, bool), np.asarray(decided, bool)
    wrong = []
    for i in np.flatnonzero((truth != decided).any(axis=1)):
        sure = np.where(decided[i], proba[i], 1 - proba[i])[truth[i] != decided[i]]
        wrong.append(
            {
                "path": paths[i],
                "true": joined_labels(tuple(np.array(labels)[truth[i]])),
                "predicted": joined_labels(tuple(np.array(labels)[decided[i]])),
                "confidence": float(sure.max()),
            }
        )
    return sorted(wrong, key=lambda row: -row["confidence"])


#: Equal-width bins of top-1 confidence for the expected calibration error (Guo et al. 2017 use 15).
CALIBRATION_BINS = 15


def calibration(proba: np.ndarray, y_true: list[str], labels: list[str], bins: int = CALIBRATION_BINS) -> dict | None:
    """Expected calibration error over `bins` equal-width bins of top-1 confidence (the images' share of each bin
    times |accuracy - mean confidence| in it, summed), and each bin's count, accuracy and mean confidence."""
    if len(y_true) == 0:
        return None
    proba = np.asarray(proba, np.float64)
    proba = proba / proba.sum(axis=1, keepdims=True)
    confidence = proba.max(axis=1)
    correct = np.array(labels)[np.argmax(proba, axis=1)] == np.array(y_true)
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # confidence 1.0 belongs to the last bin
    count = np.bincount(which, minlength=bins)
    hits = np.bincount(which, weights=correct, minlength=bins)
    sure = np.bincount(which, weights=confidence, minlength=bins)
    filled = count > 0
    accuracy = np.divide(hits, count, out=np.zeros(bins), where=filled)
    mean_confidence = np.divide(sure, count, out=np.zeros(bins), where=filled)
    ece = float(np.sum(count / len(y_true) * np.abs(accuracy - mean_confidence)))
    return {
        "expected_calibration_error": ece,
        "bins": bins,
        "count": count.tolist(),
        "accuracy": accuracy.tolist(),
        "confidence": mean_confidence.tolist(),
    }
