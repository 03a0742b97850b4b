"""Splits: deterministic, stable under additions and removals, grouped, stratified, saved."""

from __future__ import annotations

from collections import Counter

import pytest

from bottleneck.errors import DataError
from bottleneck.learn.splits import SplitConfig, assign_folds, assign_splits, group_key, read_split_csv, write_split_csv


def items(per_class: dict[str, int], prefix: str = "img") -> list[tuple[str, str]]:
    return [(f"{label}/{prefix}_{i:04d}.jpg", label) for label, n in per_class.items() for i in range(n)]


def test_same_split_anywhere_and_roughly_the_asked_percentages(tmp_path, monkeypatch):
    data = items({"a": 600, "b": 400})
    first = assign_splits(data, SplitConfig(seed=3))
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    assert assign_splits(data, SplitConfig(seed=3)) == first
    share = Counter(first.values())
    assert 0.07 < share["validation"] / 1000 < 0.13 and 0.07 < share["test"] / 1000 < 0.13
    assert assign_splits(data, SplitConfig(seed=4)) != first


def test_adding_and_removing_files_moves_nobody_else():
    config = SplitConfig(val_pct=20, test_pct=20)
    base = items({"a": 50, "b": 50})
    before = assign_splits(base, config)
    after = assign_splits(base + items({"a": 30, "b": 30, "c": 30}, prefix="new"), config)
    assert all(after[path] == split for path, split in before.items())
    fewer = assign_splits(base[::2], config)
    assert all(before[path] == split for path, split in fewer.items())


def test_every_class_with_three_images_gets_every_split():
    for seed in range(30):
        result = assign_splits(items({"tiny": 3, "small": 4, "big": 40}), SplitConfig(seed=seed))
        for label in ("tiny", "small", "big"):
            got = {s for p, s in result.items() if p.startswith(label + "/")}
            assert got == {"train", "validation", "test"}, (seed, label)


def test_nohash_groups_share_a_split():
    data = [(f"a/photo{i}_nohash_{j}.jpg", "a") for i in range(40) for j in range(3)] + items({"b": 10})
    result = assign_splits(data, SplitConfig())
    for i in range(40):
        assert len({result[f"a/photo{i}_nohash_{j}.jpg"] for j in range(3)}) == 1
    assert group_key("a/x/photo_nohash_2.jpg") == "a/x/photo" and group_key("a/b.jpg") == "a/b.jpg"


def test_folds_are_stratified_and_grouped():
    data = items({"a": 20, "b": 10})
    folds = assign_folds(data, 5, seed=0)
    for label, n in (("a", 20), ("b", 10)):
        assert Counter(f for p, f in folds.items() if p.startswith(label)) == {k: n // 5 for k in range(5)}


def test_split_csv_round_trip_and_errors(tmp_path):
    path = tmp_path / "split.csv"
    write_split_csv(path, [("b/2.jpg", "b", "test"), ("a/1.jpg", "a", "train")])
    assert path.read_text().splitlines()[0] == "path,label,split"
    assert read_split_csv(path) == {"a/1.jpg": ("a", "train"), "b/2.jpg": ("b", "test")}
    path.write_text("path,label,split\na/1.jpg,a,holdout\n")
    with pytest.raises(DataError, match="unknown split names: holdout"):
        read_split_csv(path)
    with pytest.raises(DataError, match="leave some training images; got 60 and 40"):
        SplitConfig(val_pct=60, test_pct=40)
