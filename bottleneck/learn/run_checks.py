"""A run's labels checked before any training (classes, multi-label labels, folds), and the targets a head
learns from them."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from bottleneck.bounds import FOLDS
from bottleneck.errors import DataError
from bottleneck.learn.dataset import LabelledFeatures
from bottleneck.learn.splits import group_of


def _check_classes(
    data: LabelledFeatures, splits: list[str], log: Callable[[str], None], folds: int | None = None
) -> None:
    """Refuse, before any training, what no head can learn from: one class, a class without training images,
    more folds than the smallest class has images for."""
    if data.multi_label:
        _check_labels(data, splits, log, folds)
        return
    labels = data.labels
    counts = Counter(labels)
    if len(counts) < 2:
        left_out = {
            "failed extraction": data.failed,
            "not in the cache": data.missing,
            "damaged features": data.non_finite,
        }
        others = sorted({p.split("/", 1)[0] for paths in left_out.values() for p in paths if "/" in p} - set(counts))
        why = (
            f"; the images of {len(others)} other class{'es' if len(others) > 1 else ''} "
            f"({', '.join(repr(c) for c in others[:3])}{', ...' if len(others) > 3 else ''}) were left out: "
            + ", ".join(f"{reason} {len(paths)}" for reason, paths in left_out.items() if paths)
            if others
            else ""
        )
        only = f"only class {next(iter(counts))!r} has images with features" if counts else "no image has features"
        raise DataError(
            f"{only}{why}; a head needs at least 2 classes: fix or remove the failed images and run "
            "`bottleneck features` again"
        )
    single = sorted(label for label, n in counts.items() if n < 2)
    if single:
        raise DataError(
            f"class {single[0]!r} has a single image with features"
            + (f" (and {len(single) - 1} more classes)" if len(single) > 1 else "")
            + "; each class needs at least 2 (3 for train, validation and test)"
        )
    train_classes = {label for label, split in zip(labels, splits) if split == "train"}
    absent = sorted(set(counts) - train_classes)
    if absent:
        raise DataError(
            f"class {absent[0]!r} has no training image in this split; give it more images or another split"
        )
    small = sorted(label for label, n in counts.items() if n < 3)
    if small:
        log(f"warning: {len(small)} classes have fewer than 3 images and miss a split: {', '.join(small[:5])}")
    if folds is not None:
        _check_folds(data, splits, folds)


def _check_labels(data: LabelledFeatures, splits: list[str], log: Callable[[str], None], folds: int | None) -> None:
    """The multi-label `_check_classes`: each label on at least 2 images, on a training image and off another."""
    if folds is not None:
        raise DataError("--folds cross-validates heads of one label per image; multi-label runs do not take it yet")
    counts = Counter(label for labels in data.label_sets for label in labels)
    if len(counts) < 2:
        raise DataError(f"only label {next(iter(counts))!r} has images with features; a head needs at least 2")
    single = sorted(label for label, n in counts.items() if n < 2)
    if single:
        raise DataError(
            f"label {single[0]!r} is on a single image with features"
            + (f" (and {len(single) - 1} more labels)" if len(single) > 1 else "")
            + "; each label needs at least 2 (3 for train, validation and test)"
        )
    training = [labels for labels, split in zip(data.label_sets, splits) if split == "train"]
    on_train = Counter(label for labels in training for label in labels)
    absent = sorted(set(counts) - set(on_train))
    if absent:
        raise DataError(
            f"label {absent[0]!r} is on no training image in this split; give it more images or another split"
        )
    everywhere = sorted(label for label, n in on_train.items() if n == len(training))
    if everywhere:
        raise DataError(
            f"label {everywhere[0]!r} is on every training image: a head cannot learn when it is absent; "
            "leave it out of the label file or add images without it"
        )
    small = sorted(label for label, n in counts.items() if n < 3)
    if small:
        log(f"warning: {len(small)} labels are on fewer than 3 images and miss a split: {', '.join(small[:5])}")


def _targets(data: LabelledFeatures) -> np.ndarray:
    """What a head learns for each image: its class, or (multi-label) the tuple of its labels."""
    return _as_array(data.label_sets, object) if data.multi_label else np.array(data.labels)


def _check_folds(data: LabelledFeatures, splits: list[str], folds: int) -> None:
    """K-fold needs each class in every fold: at least `folds` groups of training and validation images."""
    FOLDS.check(folds, "--folds", DataError)
    groups: dict[str, set[str]] = {}
    for relpath, label, split in zip(data.relpaths, data.labels, splits):
        if split != "test":
            groups.setdefault(label, set()).add(group_of(relpath, data.groups))
    label, fewest = min(((label, len(keys)) for label, keys in groups.items()), key=lambda item: (item[1], item[0]))
    if fewest < folds:
        fix = f"use --folds {fewest}" + (" or fewer" if fewest > 2 else "") if fewest >= 2 else "leave --folds out"
        raise DataError(
            f"--folds {folds} is more than class {label!r} can fill: it has {fewest} training and "
            f"validation image{'s' if fewest != 1 else ''} (near-duplicates named _nohash_ count once); "
            f"{fix}, or give that class more images"
        )


def _as_array(values: list, dtype) -> np.ndarray:
    """`values` as a 1-d array of `dtype`; an object array keeps tuples whole (numpy would make them a matrix)."""
    if dtype != object:  # noqa: E721 - a numpy dtype equals `object` when it is the object dtype
        return np.array(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
