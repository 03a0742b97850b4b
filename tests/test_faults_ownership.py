"""Cleaning never deletes a file we did not write: `cache info` and `cache gc` leave a user's files alone."""

from __future__ import annotations

import h5py
import numpy as np

from bottleneck.cli import main

from .conftest import PIXELS, make_dataset


def test_cache_gc_and_info_leave_a_users_files_alone(tmp_path, capsys):
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=2)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    with h5py.File(cache / "weights.h5", "w") as handle:  # a user's file that even has a 'features' dataset
        handle["features"] = np.ones((3, 4), np.float32)
    (cache / ".notes.tmp").write_text("mine")
    runs.mkdir()
    capsys.readouterr()

    assert main(["cache", "info", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"{cache / 'weights.h5'}: not a bottleneck file, left alone" in out and "pixels-8-raw-" in out

    assert main(["cache", "gc", "--cache", str(cache), "--runs", str(runs)]) == 0  # a dry run
    out = capsys.readouterr().out
    assert "weights.h5: not a bottleneck file, left alone" in out and "a run is writing it" not in out
    assert not (cache / "weights.lock").exists() and ".notes.tmp" not in out

    assert main(["cache", "gc", "--cache", str(cache), "--runs", str(runs), "--delete"]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and "no run under --runs uses this store" in out
    assert (cache / "weights.h5").exists() and (cache / ".notes.tmp").read_text() == "mine"
    assert not list(cache.glob("pixels-*.h5"))  # our store, which no run used, is gone
