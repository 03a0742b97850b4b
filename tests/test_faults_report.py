"""Faults in what is on disk, as `report` and the commands that load cached features meet them.

Features rotted in a segment file (NaN or infinity) are left out with one line or refused with one
line, never handed to scikit-learn; `report` skips a run it cannot read and reports the others.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from bottleneck.cli import main
from bottleneck.errors import CacheError
from bottleneck.learn.dataset import load_labelled_features

from .conftest import make_dataset

PIXELS = ["--backbone", "pixels", "--image-size", "8"]


@pytest.fixture
def extracted(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=4)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    return data, cache


def rot(cache: Path, rows, value=np.nan) -> Path:
    """Write `value` into the given rows of the (only) segment's features, as bit rot would; return the segment."""
    [segment] = cache.glob("*.segments/seg-*.h5")
    with h5py.File(segment, "a") as handle:
        features = handle["features"]
        for row in rows:
            features[row, 3] = value
    return segment


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bottleneck: error: ") and "Traceback" not in err, err
    return lines[0]


def test_train_head_leaves_out_images_whose_stored_features_rotted_and_counts_them(extracted, tmp_path, capsys):
    data, cache = extracted
    segment = rot(cache, [0])
    capsys.readouterr()
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    [warning] = [line for line in err.splitlines() if "non-finite" in line]
    assert warning.startswith("warning: 1 image has non-finite features (NaN or infinity) in the feature store ")
    assert "is left out" in warning and f"delete the damaged segment {segment}" in warning
    [run] = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["excluded"]["non_finite"] == 1
    assert sum(split["images"] for split in metrics["splits"].values()) == 11


def test_compare_on_rotted_features_leaves_them_out_instead_of_failing_in_linear_algebra(extracted, capsys):
    data, cache = extracted
    rot(cache, [1, 5], np.inf)
    capsys.readouterr()
    assert main(["compare", str(data), str(data), "--cache", str(cache), "--permutations", "5"]) == 0
    captured = capsys.readouterr()
    assert "Frechet distance" in captured.out and "Traceback" not in captured.err
    assert "non-finite features" in captured.err


def test_features_that_all_rotted_are_one_line(extracted, tmp_path, capsys):
    data, cache = extracted
    segment = rot(cache, range(12))
    capsys.readouterr()
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(tmp_path / "runs")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "12 images have non-finite features" in line and "no image under" in line and str(segment) in line


def test_a_streamed_read_stops_at_a_rotted_row_with_one_line_naming_the_store(extracted):
    data, cache = extracted
    segment = rot(cache, [7])
    loaded = load_labelled_features(data, cache, stream=True, chunk_rows=4)
    assert not loaded.rows.in_memory
    with pytest.raises(CacheError) as caught:
        for _ in loaded.rows.chunks():
            pass
    message = str(caught.value)
    assert "non-finite features" in message and str(loaded.store_path) in message and str(segment) in message
    assert "\n" not in message
