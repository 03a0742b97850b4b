"""Multi-label decisions: one probability threshold per label, chosen on the validation split only.

A multi-label head gives each label its own probability; an image gets every label whose
probability reaches that label's threshold. Each threshold maximises its label's F1 on the
validation split (never the test split, whose scores would then flatter the run). A label without
a validation positive has nothing to tune on and keeps 0.5, and the run says so. The thresholds
are written beside the head (`thresholds.json`) and used by evaluation, `predict` and `export`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bottleneck.errors import BottleneckError

THRESHOLDS_FILE = "thresholds.json"
DEFAULT_THRESHOLD = 0.5


@dataclass
class Thresholds:
    """A threshold per label, in the head's label order, and the labels that kept the default."""

    labels: list[str]
    values: np.ndarray  # (k,) float64
    defaulted: list[str] = field(default_factory=list)  # no validation positive: DEFAULT_THRESHOLD

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """(n, k) booleans: which labels each row of probabilities gets."""
        return np.asarray(proba) >= self.values

    def labels_above(self, probabilities: np.ndarray) -> list[tuple[str, float]]:
        """One image's labels at or over their thresholds, with probabilities, most probable first."""
        chosen = np.flatnonzero(self.decide(probabilities))
        order = chosen[np.argsort(-np.asarray(probabilities)[chosen], kind="stable")]
        return [(self.labels[i], float(probabilities[i])) for i in order]

    def record(self) -> dict:
        return {
            "chosen_on": "validation",
            "maximising": "each label's F1",
            "default": DEFAULT_THRESHOLD,
            "thresholds": {label: float(value) for label, value in zip(self.labels, self.values)},
            "defaulted": list(self.defaulted),
        }


def best_threshold(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """The threshold that maximises F1 of `scores` against the boolean `positives`; None without a positive.

    Among equally good cuts the highest wins; the threshold sits halfway between the lowest score
    kept and the next lower one, so a new image scored like a kept validation image is kept too.
    """
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    total = int(positives.sum())
    if total == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], positives[order]
    last_of_value = np.append(ranked[1:] != ranked[:-1], True)  # a cut keeps every image of its score
    true_pos = np.cumsum(hits)[last_of_value]
    kept = np.flatnonzero(last_of_value) + 1
    f1 = 2 * true_pos / (kept + total)
    best = int(np.argmax(f1))
    cut = ranked[last_of_value][best]
    below = ranked[last_of_value][best + 1] if best + 1 < len(true_pos) else 0.0
    return float((cut + below) / 2)


def choose_thresholds(proba: np.ndarray, truth: np.ndarray, labels: list[str]) -> Thresholds:
    """Each label's F1-maximising threshold on validation probabilities `proba` against 0/1 `truth` (n, k)."""
    values, defaulted = [], []
    for j, label in enumerate(labels):
        found = best_threshold(proba[:, j], truth[:, j] > 0) if len(proba) else None
        if found is None:
            defaulted.append(label)
        values.append(DEFAULT_THRESHOLD if found is None else found)
    return Thresholds(list(labels), np.array(values, np.float64), defaulted)


def write_thresholds(folder: str | os.PathLike, thresholds: Thresholds) -> Path:
    path = Path(folder) / THRESHOLDS_FILE
    path.write_text(json.dumps(thresholds.record(), indent=2))
    return path


class ThresholdsError(BottleneckError):
    """A run's thresholds.json is missing, unreadable, or not for the run's labels."""


def read_thresholds(folder: str | os.PathLike, labels: list[str]) -> Thresholds:
    """The thresholds of a multi-label run folder, checked against the run's `labels`."""
    path = Path(folder) / THRESHOLDS_FILE
    try:
        record = json.loads(path.read_text())
        given = record["thresholds"]
        values = np.array([float(given[label]) for label in labels], np.float64)
        defaulted = [str(label) for label in record.get("defaulted", [])]
    except FileNotFoundError:
        raise ThresholdsError(
            f"{path.parent} is a multi-label run without its {THRESHOLDS_FILE}: train it again"
        ) from None
    except KeyError as exc:
        raise ThresholdsError(f"{path} gives no threshold for label {exc}: it belongs to another run") from None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ThresholdsError(f"{path} is not readable thresholds ({type(exc).__name__}: {exc})") from None
    if not (np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()):
        raise ThresholdsError(f"{path}: every threshold must be a probability between 0 and 1")
    return Thresholds(list(labels), values, defaulted)
