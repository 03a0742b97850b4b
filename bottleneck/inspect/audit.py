"""`bottleneck audit`: what silently ruins a classifier, found from the feature cache alone.

No image is decoded (except for the page's thumbnails) and no head is kept: the cached features
of DATA are standardised (and projected to at most `audit_graph.PROJECTED_DIM` dimensions by a PCA fitted on a
sample, so 100,000 images fit in a few hundred MB), and one k-nearest-neighbour graph of them
(faiss, cosine distance) serves three audits:

- near-duplicates: pairs closer than `duplicate_factor` x the median nearest-neighbour distance
  (cleanlab Datalab's rule, 0.13 by default), with each image's split; pairs that straddle train,
  validation and test are leakage. Byte-identical files (one content hash, two paths) are listed
  as exact duplicates, and flagged when their labels differ;
- outliers: images whose mean distance to their k neighbours is above Q3 + 1.7 IQR of all such
  distances (Datalab's outlier rule), ranked;
- label issues: out-of-fold probabilities of a cross-validated logistic regression, then
  confident learning (`cleanlab.filter.find_label_issues`), ranked by how little the model
  believes the given label. Multi-label data (a label file giving images several labels): out-of-fold
  probabilities of one-vs-rest logistic regressions and cleanlab's multi-label confident learning
  (`cleanlab.multilabel_classification.filter.find_label_issues`), which flags an image when any
  of its labels looks wrong (given but absent, or missing though present).

With random weights (`--weights none`) every image looks like every other: near-duplicates are
refused rather than listed by the thousand. The split is the one `train-head` draws (same
`--seed`, `--val-pct`, `--test-pct`, or `--split-file`).

The label issues are only as good as the cross-validated model they come from: its accuracy
(multi-label: micro F1) is always stated, and below `TRUSTED_ACCURACY` the audit says plainly that
its flags are mostly hard images, not wrong labels. exclude.txt lists the training copy of each
leak (the test split is never changed by `train-head --exclude`) and far-out outliers; label
issues only when asked (`exclude_label_issues`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import DataError
from bottleneck.features.shards import Columns
from bottleneck.inspect.audit_graph import (
    _require,
    knn_graph,
    near_duplicate_pairs,
    outlier_scores,
    progress_bar,
    project,
)
from bottleneck.inspect.embedding_map import Embedding, audit_embedding

#: Datalab's near-duplicate rule: closer than this x the median distance to the nearest neighbour.
DUPLICATE_FACTOR = 0.13
NEIGHBOURS = 10
FOLDS = 5
#: Below this cross-validated accuracy (multi-label: micro F1) the model behind the label issues is too weak for
#: its flags to be trusted: at 0.74 most of what confident learning flags are hard but correctly labelled images.
TRUSTED_ACCURACY = 0.85
#: L-BFGS iterations of each cross-validated logistic regression.
MAX_ITER = 300


@dataclass(frozen=True)
class AuditConfig:
    """How to audit: the split to check for leakage, and the audits' thresholds."""

    seed: int = 0
    val_pct: float = 10.0
    test_pct: float = 10.0
    split_file: str | None = None
    layout: str = "auto"  # of DATA: see bottleneck.features.discover
    columns: Columns | None = None  # a Parquet DATA's image and label columns (`shards.Columns`), or None
    labels: str | None = None  # a label file naming the images instead
    duplicate_factor: float = DUPLICATE_FACTOR
    neighbours: int = NEIGHBOURS
    folds: int = FOLDS
    exclude_label_issues: bool = False  # exclude.txt lists the label issues too


@dataclass
class AuditResult:
    """Everything an audit found; `as_json` is audit.json."""

    images: int
    classes: dict[str, int]
    splits: dict[str, int]
    near_duplicates: list[dict]
    exact_duplicates: list[dict]
    label_issues: list[dict]
    outliers: list[dict]
    excluded: dict[str, int]
    thresholds: dict
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    pretrained: bool = True
    store: str = ""
    multi_label: bool = False  # `classes` counts each label of a multi-label label file
    label_model: dict | None = None  # the cross-validated model behind the label issues (`model_record`)
    exclude_label_issues: bool = False
    embedding: Embedding | None = field(default=None, repr=False)  # the page's map; not in audit.json

    @property
    def leakage(self) -> list[dict]:
        return [pair for pair in self.near_duplicates + self.exact_duplicates if pair["leakage"]]

    def counts(self) -> dict:
        return {
            "images": self.images,
            "classes": len(self.classes),
            "near_duplicates": len(self.near_duplicates),
            "exact_duplicates": len(self.exact_duplicates),
            "leakage": len(self.leakage),
            "label_issues": len(self.label_issues),
            "outliers": len(self.outliers),
            "failed_extraction": self.excluded.get("failed_extraction", 0),
        }

    def as_json(self) -> dict:
        record = asdict(self)
        record.pop("embedding", None)
        record["counts"] = self.counts()
        return record

    def suggested_removals(self) -> dict[str, list[str]]:
        """What exclude.txt lists, by reason: the training (else validation) copy of each leak, far-out outliers,
        and the label issues when asked (`exclude_label_issues`)."""
        rank = {"train": 0, "validation": 1, "test": 2}
        leaked = []
        for pair in self.leakage:  # keep the copy the exam scores (test, else validation): --exclude never changes test
            copies = sorted(zip(pair["splits"], (pair["a"], pair["b"])), key=lambda item: rank.get(item[0], 0))
            leaked.append(copies[0][1])
        removals = {"leakage": sorted(set(leaked))}
        if self.exclude_label_issues:
            removals["label issues"] = [issue["path"] for issue in self.label_issues]
        removals["far-out outliers"] = [outlier["path"] for outlier in self.outliers if outlier["far_out"]]
        return removals

    def model_line(self) -> str | None:
        """One line on the model the label issues come from: its cross-validated score, and whether to trust it."""
        model = self.label_model
        if not model:
            return None
        line = (
            f"label issues come from a {model['folds']}-fold cross-validated logistic regression with "
            f"{model['metric']} {model['value']:.3f} (chance {model['chance']:.3f})"
        )
        if model.get("not_converged"):
            line += (
                f"; {model['not_converged']} of its {model['fits']} fits stopped at {model['max_iter']} iterations "
                "before converging"
            )
        if not model["trusted"]:
            return (
                line + f": TOO WEAK for its flags to be trusted (below {TRUSTED_ACCURACY}); most flagged images are "
                "likely hard but correctly labelled. Review them; they are not in exclude.txt unless "
                "--exclude-label-issues"
            )
        return line + f" (at least {TRUSTED_ACCURACY}: its flags are worth reviewing)"


# ---------------------------------------------------------------------------------------------
# Label issues (the kNN graph's near-duplicates and outliers: `audit_graph`)


class FitCount:
    """The cross-validated model's fits, and how many stopped at `MAX_ITER` before converging.

    scikit-learn says so with a ConvergenceWarning of nine lines per fit, on the terminal; the audit counts them
    instead, and its line on the model (and audit.json) says how many. Other warnings pass on unchanged.
    """

    def __init__(self) -> None:
        self.fits = 0
        self.not_converged = 0

    def fit(self, model, X: np.ndarray, y: np.ndarray):
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(X, y)
        self.fits += 1
        self.not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return model


def out_of_fold_probabilities(
    Z: np.ndarray, y: np.ndarray, folds: int, seed: int, progress: bool = False, fits: FitCount | None = None
) -> np.ndarray:
    """Probabilities each image gets from a logistic regression that never saw it (stratified k-fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    fits = fits or FitCount()
    n_classes = int(y.max()) + 1
    proba = np.zeros((len(y), n_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    bar = progress_bar(folds, "audit: cross-validation", "fold", progress)
    for train, held_out in splitter.split(Z, y):
        model = fits.fit(LogisticRegression(max_iter=MAX_ITER, C=1.0, random_state=seed), Z[train], y[train])
        proba[np.ix_(held_out, model.classes_)] = model.predict_proba(Z[held_out])
        bar.update()
    bar.close()
    return proba


def model_record(metric: str, value: float, chance: float, folds: int, fits: FitCount) -> dict:
    """The cross-validated model behind the label issues: its score, chance, whether it is strong enough
    (`TRUSTED_ACCURACY`) for its flags to be trusted, and how many of its fits stopped before converging."""
    return {
        "metric": metric,
        "value": round(float(value), 6),
        "chance": round(float(chance), 6),
        "folds": folds,
        "trusted": bool(value >= TRUSTED_ACCURACY),
        "trusted_at_least": TRUSTED_ACCURACY,
        "fits": fits.fits,
        "not_converged": fits.not_converged,
        "max_iter": MAX_ITER,
    }


def label_issue_rows(y: np.ndarray, proba: np.ndarray) -> list[tuple[int, float]]:
    """(row, suspicion 0-1) of the images confident learning flags, most suspicious first."""
    find_label_issues = _require("cleanlab.filter").find_label_issues
    # n_jobs=1: in this process. cleanlab's forked pool inherited our SIGTERM handler, so a SIGTERM printed a
    # traceback per worker and Pool.terminate() could kill a worker holding the queue lock (a hang).
    flagged = find_label_issues(labels=y, pred_probs=proba, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [(int(i), float(1.0 - proba[i, y[i]])) for i in flagged]


def out_of_fold_label_probabilities(
    Z: np.ndarray,
    truth: np.ndarray,
    strata: list[str],
    folds: int,
    seed: int,
    progress: bool = False,
    fits: FitCount | None = None,
) -> np.ndarray:
    """Each image's probability of each label (truth: (n, k) 0/1) from one-vs-rest logistic regressions that
    never saw it; folds stratified by `strata` (each image's rarest label). A label constant in a fold's
    training images gets that constant."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    fits = fits or FitCount()
    proba = np.zeros(truth.shape)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a rarest label on fewer images than folds: stratified as well as it can be
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        fold_list = list(splitter.split(Z, strata))
    bar = progress_bar(folds, "audit: cross-validation", "fold", progress)
    for train, held_out in fold_list:
        for j in range(truth.shape[1]):
            column = truth[train, j]
            if column.min() == column.max():
                proba[held_out, j] = float(column[0])
                continue
            model = fits.fit(LogisticRegression(max_iter=MAX_ITER, C=1.0, random_state=seed), Z[train], column)
            proba[held_out, j] = model.predict_proba(Z[held_out])[:, 1]
        bar.update()
    bar.close()
    return proba


def multi_label_issue_rows(truth: np.ndarray, proba: np.ndarray) -> list[tuple[int, float]]:
    """(row, suspicion 0-1) of the images cleanlab's multi-label confident learning flags, most suspicious first."""
    _require("cleanlab")
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    given = [list(np.flatnonzero(row)) for row in truth]
    flagged = find_label_issues(labels=given, pred_probs=proba, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(given, proba)
    return [(int(i), float(1.0 - quality[i])) for i in flagged]


# ---------------------------------------------------------------------------------------------
# The whole audit


def _check_classes(labels: list[str], folds: int) -> int:
    """The folds cross-validation can use; one line when the classes (multi-label: the labels) cannot be audited."""
    counts = Counter(labels)
    if len(counts) < 2:
        only = f"only class {next(iter(counts))!r} has images with features" if counts else "no image has features"
        raise DataError(f"an audit needs at least two classes; {only}")
    label, fewest = min(counts.items(), key=lambda item: (item[1], item[0]))
    if fewest < 2:
        raise DataError(
            f"class {label!r} has a single image with features; finding label issues cross-validates, so "
            "each class needs at least 2 images (5 or more for 5 folds)"
        )
    return min(folds, fewest)


def exact_duplicate_pairs(hashes: list[str]) -> list[tuple[int, int]]:
    """Pairs of rows whose files have the same bytes (each file paired with the first of its content)."""
    first: dict[str, int] = {}
    pairs = []
    for row, content in enumerate(hashes):
        if not content:
            continue
        if content in first:
            pairs.append((first[content], row))
        else:
            first[content] = row
    return pairs


#: The split of every image of a plain folder: there is no head, so no split.
UNSPLIT = "-"


def _multi_label_issues(
    Z: np.ndarray, data, splits: list[str], folds: int, seed: int, progress: bool = False
) -> tuple[list[dict], dict]:
    """Images with a label set the cross-validated one-vs-rest model doubts (cleanlab's multi-label confident
    learning); `suggested` is the labels it gives over one half. Also the model's record (micro F1 at 0.5)."""
    from sklearn.metrics import f1_score

    from bottleneck.features.label_file import joined_labels
    from bottleneck.learn.heads import multi_hot
    from bottleneck.learn.splits import rarest_labels

    labels = data.classes
    truth = multi_hot(data.label_sets, labels).astype(np.int64)
    strata = rarest_labels(data.label_sets)
    fits = FitCount()
    proba = out_of_fold_label_probabilities(Z, truth, strata, folds, seed, progress, fits)
    # chance: the micro F1 of giving every label to every image
    chance = 2 * truth.mean() / (1 + truth.mean())
    micro_f1 = f1_score(truth, proba >= 0.5, average="micro", zero_division=0)
    model = model_record("micro F1", micro_f1, chance, folds, fits)
    return [
        {
            "path": data.relpaths[i],
            "given": data.labels[i],
            "suggested": joined_labels(tuple(label for label, p in zip(labels, proba[i]) if p >= 0.5)),
            "score": round(score, 6),
            "split": splits[i],
        }
        for i, score in multi_label_issue_rows(truth, proba)
    ], model


def _label_issues(
    Z: np.ndarray,
    labels: list[str],
    splits: list[str],
    relpaths: list[str],
    folds: int,
    seed: int,
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """Images whose label the cross-validated model doubts most (cleanlab's confident learning), and the model's
    record (its cross-validated accuracy; chance is the largest class's share)."""
    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels])
    fits = FitCount()
    proba = out_of_fold_probabilities(Z, y, folds, seed, progress, fits)
    accuracy = np.mean(np.argmax(proba, axis=1) == y)
    model = model_record("accuracy", accuracy, np.bincount(y).max() / len(y), folds, fits)
    return [
        {
            "path": relpaths[i],
            "given": labels[i],
            "suggested": classes[int(np.argmax(proba[i]))],
            "score": round(score, 6),
            "split": splits[i],
        }
        for i, score in label_issue_rows(y, proba)
    ], model


def run_audit(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    spec: BackboneSpec | None = None,
    config: AuditConfig = AuditConfig(),
    log: Callable[[str], None] = lambda message: None,
    max_memory: int | None = None,
    progress: bool = False,
) -> AuditResult:
    """Audit the images under DATA from their cached features (see the module's docstring); `progress` draws
    bars with ETA on stderr for the long steps (the kNN graph, the cross-validation folds)."""
    from bottleneck.learn.dataset import load_labelled_features
    from bottleneck.learn.splits import SplitConfig, splits_for

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    data = load_labelled_features(
        data_dir,
        cache_dir,
        spec,
        log=log,
        max_memory=max_memory,
        layout=config.layout,
        columns=config.columns,
        labels=config.labels,
        need_labels=False,
    )
    labels = list(data.labels)
    unlabelled = not any(labels)  # a plain folder: near-duplicates and outliers only
    each_label = [label for labels in data.label_sets for label in labels] if data.multi_label else labels
    folds = 0 if unlabelled else _check_classes(each_label, config.folds)
    splits = (
        [UNSPLIT] * len(labels)
        if unlabelled
        else splits_for(
            data,
            SplitConfig(val_pct=config.val_pct, test_pct=config.test_pct, seed=config.seed),
            config.split_file,
            log,
        )
    )
    hashes = data.content_hashes
    seconds["load"] = time.perf_counter() - started

    started = time.perf_counter()
    Z = project(data.rows, config.seed)
    seconds["project"] = time.perf_counter() - started
    started = time.perf_counter()
    distances, neighbours = knn_graph(Z, config.neighbours, progress)
    seconds["knn"] = time.perf_counter() - started

    pretrained = bool(data.attrs.get("pretrained", True))
    notes: list[str] = []
    pairs, threshold = near_duplicate_pairs(distances, neighbours, config.duplicate_factor)
    exact = exact_duplicate_pairs(hashes)
    if not pretrained:
        notes.append(
            f"RANDOM WEIGHTS: the features come from an untrained network, so every image looks alike to it; "
            f"near-duplicates are not reported ({len(pairs)} pairs would have been). Byte-identical files are."
        )
        pairs = []

    def pair_record(a: int, b: int, distance: float) -> dict:
        return {
            "a": data.relpaths[a],
            "b": data.relpaths[b],
            "distance": round(distance, 6),
            "splits": [splits[a], splits[b]],
            "labels": [labels[a], labels[b]],
            "leakage": splits[a] != splits[b],
            "same_label": labels[a] == labels[b],
        }

    near = [pair_record(a, b, d) for a, b, d in pairs if not (hashes[a] and hashes[a] == hashes[b])]
    exact_records = [pair_record(a, b, 0.0) for a, b in exact]

    started = time.perf_counter()
    mean_distance, outlier_threshold, far_threshold = outlier_scores(distances)
    order = np.argsort(-mean_distance, kind="stable")
    outliers = [
        {
            "path": data.relpaths[i],
            "label": labels[i],
            "split": splits[i],
            "score": round(float(mean_distance[i]), 6),
            "far_out": bool(mean_distance[i] > far_threshold),
        }
        for i in order
        if mean_distance[i] > outlier_threshold
    ]

    issues: list[dict]
    label_model: dict | None
    if unlabelled:
        issues, label_model = [], None
    elif data.multi_label:
        issues, label_model = _multi_label_issues(Z, data, splits, folds, config.seed, progress)
    else:
        issues, label_model = _label_issues(Z, labels, splits, data.relpaths, folds, config.seed, progress)
    if unlabelled:
        notes.append(
            "a plain folder: no labels, so no label issues and no split to leak across; near-duplicates, "
            "byte-identical files and outliers only"
        )
    seconds["label_issues_and_outliers"] = time.perf_counter() - started
    started = time.perf_counter()
    embedding = audit_embedding(
        Z,
        labels,
        data.relpaths,
        splits,
        {
            "label issue": [i["path"] for i in issues],
            "outlier": [o["path"] for o in outliers],
            "duplicate": [path for pair in near + exact_records for path in (pair["a"], pair["b"])],
        },
        config.seed,
    )
    seconds["map"] = time.perf_counter() - started
    if data.missing:
        notes.append(
            f"{len(data.missing)} images under DATA have no features yet (run `bottleneck features` first) "
            "and are not audited"
        )
    return AuditResult(
        images=len(labels),
        classes={} if unlabelled else dict(sorted(Counter(each_label).items())),
        multi_label=data.multi_label,
        splits={} if unlabelled else dict(Counter(splits)),
        near_duplicates=near,
        exact_duplicates=exact_records,
        label_issues=issues,
        outliers=outliers,
        excluded={
            "failed_extraction": len(data.failed),
            "not_in_cache": len(data.missing),
            "non_finite": len(data.non_finite),
        },
        thresholds={
            "duplicate_factor": config.duplicate_factor,
            "median_nearest_distance": round(threshold / config.duplicate_factor, 6)
            if config.duplicate_factor
            else None,
            "duplicate_distance": round(threshold, 6),
            "outlier_mean_knn_distance": round(outlier_threshold, 6),
            "far_out_mean_knn_distance": round(far_threshold, 6),
            "neighbours": int(distances.shape[1]),
            "folds": folds,
            "projected_dim": int(Z.shape[1]),
            "metric": "cosine on standardised features",
        },
        notes=notes,
        seconds={k: round(v, 2) for k, v in seconds.items()},
        pretrained=pretrained,
        store=str(data.store_path),
        label_model=label_model,
        exclude_label_issues=config.exclude_label_issues,
        embedding=embedding,
    )
