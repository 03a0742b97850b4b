"""Train / validation / test splits that are deterministic, stable, grouped and stratified.

Each file lands in a split by a hash of (seed, its group key), where the group key is its path
relative to DATA with any `_nohash_...` suffix of the file name removed (as `retrain.py` did), so
near-duplicates that share a prefix share a split. Nothing depends on the working directory or
the machine. Adding or removing files never moves another file, except in a class whose hash
draw left a split empty: then the groups nearest the empty split's range move into it, so every
class with at least three groups has a train, a validation and a test image.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bottleneck.bounds import PERCENT
from bottleneck.errors import DataError

if TYPE_CHECKING:
    from bottleneck.learn.dataset import LabelledFeatures

SPLITS = ("train", "validation", "test")
_NOHASH = re.compile(r"_nohash_.*$")


@dataclass(frozen=True)
class SplitConfig:
    """Percentages of validation and test images, and the seed of the draw."""

    val_pct: float = 10.0
    test_pct: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.val_pct in PERCENT and self.test_pct in PERCENT and self.val_pct + self.test_pct < PERCENT.top):
            raise DataError(
                f"--val-pct and --test-pct must be between 0 and 100 and leave some training images; "
                f"got {self.val_pct:g} and {self.test_pct:g}"
            )

    def ranges(self) -> dict[str, tuple[float, float]]:
        v, t = self.val_pct / 100, self.test_pct / 100
        return {"validation": (0.0, v), "test": (v, v + t), "train": (v + t, 1.0)}


def group_key(relpath: str) -> str:
    """The key that decides a file's split: its relative path without a `_nohash_` suffix."""
    folder, _, name = relpath.rpartition("/")
    stem, ext = os.path.splitext(name)
    if _NOHASH.search(stem):
        name = _NOHASH.sub("", stem)
    return f"{folder}/{name}" if folder else name


def draw(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from the seed and a group key."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_of(p: float, ranges: dict[str, tuple[float, float]]) -> str:
    for name in ("validation", "test"):
        low, high = ranges[name]
        if low <= p < high:
            return name
    return "train"


def _distance(p: float, interval: tuple[float, float]) -> float:
    low, high = interval
    return 0.0 if low <= p < high else min(abs(p - low), abs(p - high))


def _fill_empty_splits(groups: dict[str, float], assigned: dict[str, str], config: SplitConfig) -> None:
    ranges = config.ranges()
    wanted = [s for s in ("validation", "test", "train") if ranges[s][1] > ranges[s][0]]
    for split in wanted:
        counts: defaultdict[str, int] = defaultdict(int)
        for s in assigned.values():
            counts[s] += 1
        if counts[split]:
            continue
        movable = [k for k, s in assigned.items() if counts[s] > 1]
        if not movable:
            return
        chosen = min(movable, key=lambda k: (_distance(groups[k], ranges[split]), k))
        assigned[chosen] = split


def group_of(relpath: str, groups: dict[str, str] | None) -> str:
    """A file's group key: the group a label file gives it, else `group_key` of its path."""
    given = groups.get(relpath) if groups else None
    return f"group:{given}" if given else group_key(relpath)


def rarest_labels(label_sets: list[tuple[str, ...]]) -> list[str]:
    """Each multi-label image's rarest label (ties by name): what its split is stratified by, so every label,
    the rare ones first, reaches every split."""
    counts: dict[str, int] = defaultdict(int)
    for labels in label_sets:
        for label in labels:
            counts[label] += 1
    return [min(labels, key=lambda label: (counts[label], label)) for labels in label_sets]


def assign_splits(
    items: list[tuple[str, str]], config: SplitConfig, groups: dict[str, str] | None = None
) -> dict[str, str]:
    """Map each (relpath, label) to 'train', 'validation' or 'test'; files of one group (`groups`) share one."""
    ranges = config.ranges()
    by_class: dict[str, dict[str, float]] = defaultdict(dict)
    for relpath, label in items:
        key = group_of(relpath, groups)
        by_class[label][key] = draw(config.seed, key)
    group_split: dict[tuple[str, str], str] = {}
    for label, drawn in by_class.items():
        assigned = {key: _split_of(p, ranges) for key, p in drawn.items()}
        if len(drawn) >= 3:
            _fill_empty_splits(drawn, assigned, config)
        group_split.update({(label, key): split for key, split in assigned.items()})
    return {relpath: group_split[(label, group_of(relpath, groups))] for relpath, label in items}


def splits_from_folders(
    items: list[tuple[str, str]],
    folder_splits: dict[str, str],
    config: SplitConfig,
    groups: dict[str, str] | None = None,
    source: str = "the {} folder",
) -> tuple[dict[str, str], str]:
    """Splits of DATA laid out in split folders (or given by a label file), and one line saying where each came from.

    The test split is the test folder, else the val folder; validation is the val folder when
    there is a test folder too, else drawn from train (`--val-pct`, seeded and stable as
    `assign_splits`); with a train folder alone, validation and test are both drawn from it.
    An image of a held-out folder is never trained on. `source` names where a split comes from.
    """
    present = set(folder_splits.values())
    if "train" not in present:
        raise DataError(
            f"no image comes from {source.format('train')}: the other splits are held out, so nothing "
            "would be trained on"
        )
    if "test" in present:
        held: dict[str, str] = {split: split for split in ("validation", "test") if split in present}
    else:  # train and val (the ants/bees set): val is the exam; or a train folder alone
        held = {"validation": "test"} if "validation" in present else {}
    from_folders = {relpath: held[folder_splits[relpath]] for relpath, _ in items if folder_splits[relpath] != "train"}
    drawn_pct = {
        "validation": 0.0 if "validation" in held.values() else config.val_pct,
        "test": 0.0 if "test" in held.values() else config.test_pct,
    }
    train_items = [(relpath, label) for relpath, label in items if folder_splits[relpath] == "train"]
    drawn = assign_splits(train_items, SplitConfig(drawn_pct["validation"], drawn_pct["test"], config.seed), groups)
    said = [
        f"{split} from {source.format('val' if split == 'test' and held.get('validation') == 'test' else split)}"
        for split in ("validation", "test")
        if split in held.values()
    ]
    said += [f"{split} drawn from train ({pct:g}%)" for split, pct in drawn_pct.items() if pct]
    return {**drawn, **from_folders}, f"splits: train from {source.format('train')}, " + ", ".join(said)


def assign_folds(
    items: list[tuple[str, str]], folds: int, seed: int, groups: dict[str, str] | None = None
) -> dict[str, int]:
    """Map each (relpath, label) to a fold in 0..folds-1, stratified by class, grouped by key."""
    by_class: dict[str, set[str]] = defaultdict(set)
    for relpath, label in items:
        by_class[label].add(group_of(relpath, groups))
    fold_of: dict[tuple[str, str], int] = {}
    for label, keys in by_class.items():
        ordered = sorted(keys, key=lambda k: (draw(seed + 1, k), k))
        fold_of.update({(label, key): i % folds for i, key in enumerate(ordered)})
    return {relpath: fold_of[(label, group_of(relpath, groups))] for relpath, label in items}


def _strata(data: LabelledFeatures) -> list[str]:
    """What each image's split is stratified by: its class, or a multi-label image's rarest label."""
    return rarest_labels(data.label_sets) if data.multi_label else list(data.labels)


def splits_for(
    data: LabelledFeatures, config: SplitConfig, split_file: str | None, log: Callable[[str], None]
) -> list[str]:
    """Each image's split as `train-head` draws it: split folders or a split column, else drawn by `config`;
    `split_file` (a saved split.csv) wins for the images it lists."""
    items = list(zip(data.relpaths, _strata(data)))
    if data.folder_splits and split_file is None:
        drawn, said = splits_from_folders(items, data.folder_splits, config, data.groups, data.split_source)
        log(said)
    else:
        drawn = assign_splits(items, config, data.groups)
    if split_file is None:
        return [drawn[p] for p in data.relpaths]
    saved = read_split_csv(split_file)
    if data.multi_label:  # a label set written in another order (`dog;beach`) is the same set
        from bottleneck.features.label_file import joined_labels, split_labels

        saved = {p: (joined_labels(split_labels(label)), split) for p, (label, split) in saved.items()}
    contradicted = [
        (p, saved[p][0], label) for p, label in zip(data.relpaths, data.labels) if p in saved and saved[p][0] != label
    ]
    if contradicted:
        from bottleneck.text import printable

        path, said, folder = contradicted[0]
        raise DataError(
            f"split file {split_file} labels {len(contradicted)} images other than their class folders do, first "
            f"{printable(path)} ({printable(said)!r}, folder {printable(folder)!r}); labels come from the folders: "
            "move the images or fix the label column"
        )
    unknown = [p for p in data.relpaths if p not in saved]
    if unknown:
        log(f"warning: {len(unknown)} images are not in {split_file}; they get the split drawn for them")
    return [saved[p][1] if p in saved else drawn[p] for p in data.relpaths]


def write_split_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """Write `split.csv`: columns path,label,split; path relative to DATA."""
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(sorted(rows))


def read_split_csv(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """Read a saved `split.csv` into {path: (label, split)}; a short row, an unknown split name or a path listed
    twice differently is refused with the file and line number."""
    rows: dict[str, tuple[str, str]] = {}
    where: dict[str, int] = {}
    bad: dict[str, int] = {}
    reader = None
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or not {"path", "label", "split"} <= set(header):
                raise DataError(f"split file {path} needs the columns path,label,split")
            column = {name: header.index(name) for name in ("path", "label", "split")}
            width = max(column.values()) + 1
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) < width:
                    raise DataError(
                        f"split file {path}, line {line}: {len(row)} of the {width} columns "
                        f"{','.join(header[:width])}; complete or delete that row"
                    )
                relpath, label, split = (row[column[name]] for name in ("path", "label", "split"))
                if split not in SPLITS:
                    bad.setdefault(split, line)
                if relpath in rows and rows[relpath] != (label, split):
                    raise DataError(
                        f"split file {path}, line {line}: {_shown(relpath)!r} again, with another label or split "
                        f"than on line {where[relpath]}; keep one of the two rows"
                    )
                rows[relpath] = (label, split)
                where.setdefault(relpath, line)
    except OSError as exc:
        raise DataError(f"cannot read split file {path}: {exc.strerror or exc}") from None
    except csv.Error as exc:
        raise DataError(f"split file {path}, line {reader.line_num if reader else 1}: not CSV ({exc})") from None
    if bad:
        names = sorted(bad, key=lambda name: bad[name])
        raise DataError(
            f"split file {path} has unknown split names: {', '.join(_shown(n) if n else repr(n) for n in names)} "
            f"(first on line {bad[names[0]]}; use train, validation, test)"
        )
    return rows


def _shown(text: str) -> str:
    """Text safe to print: bytes that are not UTF-8 (kept by surrogateescape) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
