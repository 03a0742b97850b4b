"""The report's pictures drawn from a run's test predictions alone (no cache, no images needed).

Binary tasks: the ROC and precision-recall curves with their areas (the second label, in sorted
order, is the positive one). Every single-label task: calibration, the expected calibration error
over 15 equal-width bins of top-1 confidence and its reliability diagram.
"""

from __future__ import annotations

import html

import numpy as np

from bottleneck.learn.metrics import calibration
from bottleneck.learn.run_folder import Predictions


def _figure(width: float, height: float):
    from bottleneck.inspect.report_figures import _pyplot

    return _pyplot().subplots(1, 2 if width > height * 1.5 else 1, figsize=(width, height), squeeze=False)


def roc_pr_png(truth: np.ndarray, score: np.ndarray, positive: str) -> tuple[str, dict]:
    """ROC and precision-recall curves of `score` for `truth` (1 = `positive`), as one PNG data URI; and the
    areas: ROC AUC and average precision (the area under the precision-recall curve as scikit-learn sums it)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    from bottleneck.inspect.report_figures import _png

    areas = {
        "roc_auc": float(roc_auc_score(truth, score)),
        "average_precision": float(average_precision_score(truth, score)),
    }
    figure, grid = _figure(9, 3.6)
    fpr, tpr, _ = roc_curve(truth, score)
    grid[0][0].plot(fpr, tpr, drawstyle="steps-post")
    grid[0][0].plot([0, 1], [0, 1], ":", color="grey")
    grid[0][0].set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, AUC {areas['roc_auc']:.3f}")
    precision, recall, _ = precision_recall_curve(truth, score)
    grid[0][1].plot(recall, precision, drawstyle="steps-post")
    grid[0][1].axhline(truth.mean(), linestyle=":", color="grey")  # a classifier that guesses
    grid[0][1].set(
        xlabel="recall",
        ylabel="precision",
        ylim=(0, 1.02),
        title=f"precision-recall, AP {areas['average_precision']:.3f}",
    )
    figure.suptitle(f"positive class: {positive}", fontsize=9)
    return _png(figure), areas


def reliability_png(record: dict) -> str:
    """The reliability diagram of a `calibration` record: accuracy per confidence bin against the diagonal."""
    from bottleneck.inspect.report_figures import _png

    bins = record["bins"]
    edges = np.linspace(0, 1, bins + 1)
    count = np.array(record["count"])
    figure, grid = _figure(4.2, 4.0)
    axes = grid[0][0]
    filled = count > 0
    axes.bar(
        edges[:-1][filled],
        np.array(record["accuracy"])[filled],
        width=1 / bins,
        align="edge",
        edgecolor="#225",
        color="#6a8fd0",
        label="accuracy",
    )
    axes.bar(
        edges[:-1][filled],
        (np.array(record["confidence"]) - np.array(record["accuracy"]))[filled],
        bottom=np.array(record["accuracy"])[filled],
        width=1 / bins,
        align="edge",
        color="none",
        edgecolor="#c33",
        hatch="//",
        label="gap to confidence",
    )
    axes.plot([0, 1], [0, 1], ":", color="grey")
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="top-1 confidence",
        ylabel="accuracy",
        title=f"reliability, ECE {record['expected_calibration_error']:.3f}",
    )
    axes.legend(loc="upper left", fontsize=8)
    return _png(figure)


def prediction_pictures(predictions: Predictions) -> str:
    """The HTML of the ROC / precision-recall curves (binary tasks) and the calibration of a run's test split."""
    if not predictions.paths:
        return ""
    parts = ['<div class="row">']
    classes = predictions.classes
    if len(classes) == 2:
        truth = np.array([label == classes[1] for label in predictions.labels], dtype=int)
        if 0 < truth.sum() < len(truth):
            uri, areas = roc_pr_png(truth, predictions.proba[:, 1], classes[1])
            parts.append(
                f'<figure><img alt="ROC and precision-recall curves" src="{uri}"><figcaption>test ROC AUC '
                f"{areas['roc_auc']:.4f}, average precision {areas['average_precision']:.4f} (positive class "
                f"{html.escape(classes[1])})</figcaption></figure>"
            )
        else:
            parts.append("<p>ROC and precision-recall: the test split has one class only</p>")
    record = calibration(predictions.proba, predictions.labels, classes)
    assert record is not None  # the test split has predictions (checked above)
    parts.append(
        f'<figure><img alt="reliability diagram" src="{reliability_png(record)}"><figcaption>test '
        f"calibration: expected calibration error {record['expected_calibration_error']:.4f} "
        f"({record['bins']} equal-width bins of top-1 confidence, {len(predictions.paths)} images)"
        "</figcaption></figure>"
    )
    parts.append("</div>")
    return "".join(parts)
