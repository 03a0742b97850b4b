"""Metrics of a head on one split, as plain JSON-able data."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support


def split_metrics(proba: np.ndarray, y_true: list[str], labels: list[str]) -> dict | None:
    """accuracy, macro F1, log loss, top-5 (over 5 classes), per-class scores and the confusion matrix."""
    if len(y_true) == 0:
        return None
    proba = proba / proba.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only roughly
    labels_array = np.array(labels)
    predicted = labels_array[np.argmax(proba, axis=1)]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0
    )
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


def multi_label_metrics(proba: np.ndarray, truth: np.ndarray, labels: list[str], decided: np.ndarray) -> dict | None:
    """Multi-label scores of one split: mean average precision, micro and macro F1, exact-match accuracy and per-label
    precision, recall, F1, support and average precision. `truth` and `decided` are (n, k) 0/1 (decided: thresholded).

    The mean average precision is over the labels with a positive in this split (None when none has one).
    """
    from sklearn.metrics import average_precision_score

    if len(truth) == 0:
        return None
    truth, decided = np.asarray(truth, bool), np.asarray(decided, bool)
    precision, recall, f1, support = precision_recall_fscore_support(truth, decided, average=None, zero_division=0)
    precision_avg = {j: float(average_precision_score(truth[:, j], proba[:, j]))
                     for j in range(len(labels)) if truth[:, j].any()}
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
            label: {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                    "support": int(support[j]), "average_precision": precision_avg.get(j)}
            for j, label in enumerate(labels)
        },
        "labels": list(labels),
    }


def multi_label_mistakes(proba: np.ndarray, truth: np.ndarray, decided: np.ndarray, paths: list[str],
                         labels: list[str]) -> list[dict]:
    """Images whose predicted label set is not their true one: path, true and predicted sets (`a;b`), and the
    confidence of the surest wrong decision (p of a label wrongly given, 1 - p of one wrongly missed); surest first."""
    from bottleneck.features.label_file import joined_labels

    truth, decided = np.asarray(truth, bool), np.asarray(decided, bool)
    wrong = []
    for i in np.flatnonzero((truth != decided).any(axis=1)):
        sure = np.where(decided[i], proba[i], 1 - proba[i])[truth[i] != decided[i]]
        wrong.append({"path": paths[i], "true": joined_labels(tuple(np.array(labels)[truth[i]])),
                      "predicted": joined_labels(tuple(np.array(labels)[decided[i]])), "confidence": float(sure.max())})
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
    return {"expected_calibration_error": ece, "bins": bins, "count": count.tolist(),
            "accuracy": accuracy.tolist(), "confidence": mean_confidence.tolist()}
