"""Faults and hostile input: nothing wrong stored, nothing lost, one line and never a traceback."""

from __future__ import annotations

import errno
import json
import sqlite3

import numpy as np
import pytest

from bottleneck import fs
from bottleneck.cli import main
from bottleneck.features import hashing
from bottleneck.features.hashing import INDEX_NAME, HashIndex
from bottleneck.features.store import FeatureStore

from .conftest import PIXELS, make_dataset


def test_a_damaged_hash_index_is_rebuilt_with_a_line_saying_so(pixels_extracted, capsys):
    data, cache = pixels_extracted
    (cache / INDEX_NAME).write_bytes(b"this is not a database" * 100)
    capsys.readouterr()
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["reused"] == 12
    assert "hash index" in captured.err and "damaged" in captured.err and "rebuilt it" in captured.err
    assert "Traceback" not in captured.err


def test_a_read_only_cache_still_trains(pixels_extracted, tmp_path, monkeypatch, capsys):
    data, cache = pixels_extracted
    real_connect = sqlite3.connect

    def read_only(target, *args, **kwargs):
        if str(target) == str(cache / INDEX_NAME):  # what a read-only folder or file gives
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real_connect(target, *args, **kwargs)

    monkeypatch.setattr(hashing.sqlite3, "connect", read_only)
    index = HashIndex(cache)
    assert not index.writable
    index.close()
    assert (
        main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(tmp_path / "runs"), "--json"])
        == 0
    )
    assert "Traceback" not in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_keeps_what_was_committed(pixels_extracted, monkeypatch, capsys):
    data, cache = pixels_extracted
    [index_file] = cache.glob("*.h5")
    fingerprint = index_file.stem
    make_dataset(data, per_class=6, start=4)  # more images to compute
    real_file = fs.h5py.File

    def full(path, mode="r", *args, **kwargs):
        if mode == "w":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_file(path, mode, *args, **kwargs)

    monkeypatch.setattr(fs.h5py, "File", full)
    capsys.readouterr()
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bottleneck: error: disk full at {cache / (fingerprint + '.parts')}: 12.0 KiB needed, "), (
        err
    )  # one batch of 16 images
    assert any(f"{unit} free" in err for unit in ("KiB", "MiB", "GiB", "TiB")) and "run the same command again" in err
    assert len(err.splitlines()) == 1
    monkeypatch.setattr(fs.h5py, "File", real_file)
    assert len(FeatureStore(cache, fingerprint, 192, {}).load().content_hash) == 12  # the old store is whole
    assert (
        main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    )  # room again: it finishes
    assert len(FeatureStore(cache, fingerprint, 192, {}).load().content_hash) == 30


@pytest.mark.parametrize(
    "command", [["train-head", "--data", "D", "--cache", "C", "--runs", "R"], ["report", "--runs", "R"]]
)
def test_ctrl_c_outside_extraction_does_not_talk_about_batches(command, tmp_path, monkeypatch, capsys):
    from bottleneck.cli import report, train_head

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_head, "run", interrupted)
    monkeypatch.setattr(report, "run", interrupted)
    assert (
        main(
            [
                part.replace("D", str(tmp_path)).replace("C", str(tmp_path)).replace("R", str(tmp_path))
                if len(part) == 1
                else part
                for part in command
            ]
        )
        == 130
    )
    assert capsys.readouterr().err.strip() == "bottleneck: interrupted; nothing was written"


def test_the_pixels_backbone_does_not_claim_to_load_weights(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    assert main(["features", str(data), "--cache", str(tmp_path / "cache"), *PIXELS, "--no-progress"]) == 0
    assert "weights" not in capsys.readouterr().err


def test_train_head_uses_features_a_killed_run_left_outside_the_index(pixels_extracted, tmp_path, capsys):
    data, cache = pixels_extracted
    [index_file] = cache.glob("*.h5")
    index_file.unlink()  # as if killed after writing its segment, before the index
    assert (
        main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(tmp_path / "runs"), "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]["train"] == 1.0


def test_an_unreadable_image_is_left_out_of_training_and_counted(pixels_extracted, tmp_path, monkeypatch, capsys):
    data, cache = pixels_extracted
    victim = sorted((data / "red").iterdir())[0]
    real_hash = HashIndex.hash_file

    def no_permission(self, path):
        if str(path) == str(victim.absolute()):
            raise PermissionError(13, "Permission denied", str(path))
        return real_hash(self, path)

    real_lookup = HashIndex.lookup

    def never_hashed(self, path, stamp):  # as when features could not read it either
        return None if str(path) == str(victim.absolute()) else real_lookup(self, path, stamp)

    monkeypatch.setattr(HashIndex, "hash_file", no_permission)
    monkeypatch.setattr(HashIndex, "lookup", never_hashed)
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(tmp_path / "runs")]) == 0
    [run] = (tmp_path / "runs").iterdir()
    assert json.loads((run / "metrics.json").read_text())["excluded"]["failed_extraction"] == 1


def test_a_runs_folder_that_cannot_be_written_fails_before_training(pixels_extracted, tmp_path, capsys):
    data, cache = pixels_extracted
    blocker = tmp_path / "runs-file"
    blocker.write_text("not a folder")
    capsys.readouterr()
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"bottleneck: error: cannot write run folders to --runs {blocker}: ")
        and len(err.splitlines()) == 1
    )


def test_a_run_folder_half_written_by_a_killed_run_is_cleared(pixels_extracted, tmp_path):
    data, cache = pixels_extracted
    runs = tmp_path / "runs"
    (runs / ".20260101-000000-logreg-abcd.999999999.tmp").mkdir(parents=True)  # its process is long gone
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(runs)]) == 0
    assert [p.name.startswith(".") for p in runs.iterdir()] == [False]


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_features_and_the_rerun_resumes(tmp_path, stop, capsys):
    import signal
    import subprocess
    import sys
    import time

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=40)
    command = [
        sys.executable,
        "-m",
        "bottleneck",
        "features",
        str(data),
        "--cache",
        str(cache),
        *PIXELS,
        "--no-progress",
        "--batch-size",
        "1",
        "--workers",
        "1",
    ]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(cache.glob("*.parts/part-*.h5")):
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    run.send_signal(getattr(signal, stop))
    err = run.communicate(timeout=60)[1]
    assert run.returncode == 130 and "Traceback" not in err
    assert (
        err.strip().splitlines()[-1]
        == "bottleneck: interrupted; committed batches are kept, run the same command again to resume"
    )
    committed = len(
        FeatureStore(cache, next(cache.glob("*.parts")).name[: -len(".parts")], 192, {}).load().content_hash
    )
    assert 1 <= committed < 120
    capsys.readouterr()
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["computed"], summary["reused"]) == (120 - committed, committed)


def test_predict_never_classifies_features_that_rotted_in_the_store(pixels_extracted, tmp_path, capsys):
    import h5py

    data, cache = pixels_extracted
    runs = tmp_path / "runs"
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(runs)]) == 0
    [run] = runs.iterdir()
    [segment] = cache.glob("*.segments/seg-*.h5")
    with h5py.File(segment, "a") as handle:
        rotted = handle["source_path"].asstr()[0]
        handle["features"][0] = np.nan
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(data), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    errors = {line["path"]: line["error"] for line in lines if "error" in line}
    assert len(errors) == 1 and "not finite" in next(iter(errors.values()))
    assert rotted.endswith(next(iter(errors)))
    assert sum("top" in line for line in lines) == 11


def test_train_head_does_not_read_a_64_gb_file_features_refused(pixels_extracted, tmp_path, monkeypatch):
    data, cache = pixels_extracted
    with open(data / "red" / "huge.png", "wb") as handle:
        handle.truncate(64 * 2**30)  # sparse: no disk used
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0

    def never(*args, **kwargs):
        raise AssertionError("a 64 GB file was read")

    monkeypatch.setattr(hashing, "sha256_file", never)
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(tmp_path / "runs")]) == 0
    [run] = (tmp_path / "runs").iterdir()
    assert json.loads((run / "metrics.json").read_text())["excluded"]["failed_extraction"] == 1


@pytest.mark.slow
def test_sigterm_during_train_head_writes_nothing_and_says_so(pixels_extracted, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    data, cache = pixels_extracted
    runs = tmp_path / "runs"
    command = [
        sys.executable,
        "-m",
        "bottleneck",
        "train-head",
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--runs",
        str(runs),
        "--head",
        "keras",
        "--epochs",
        "100000",
        "--patience",
        "100000",
    ]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not runs.exists():  # checked and created before training starts
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(3)  # into TensorFlow's start-up or training
    run.send_signal(signal.SIGTERM)
    err = run.communicate(timeout=60)[1]
    assert run.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "bottleneck: interrupted; nothing was written"
    assert list(runs.iterdir()) == []
