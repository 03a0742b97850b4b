"""A real full disk (a small tmpfs: the tests run as root here) under every command that writes.

Each command ends with one line, `bottleneck: error: disk full at ...`, exit code 2, no traceback,
no temporary file left behind, and what existed before is intact; with room again it finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from bottleneck.cli import main

from .conftest import PIXELS, make_dataset


class SmallDisk(type(Path())):
    """A mounted tmpfs that can be given more room."""

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs, remountable with more room; refused where mounting is not allowed (not root)."""
    mount_point = SmallDisk(tmp_path / "small-disk")
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); test_faults.py injects ENOSPC instead"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    """Fill the disk of `folder` but `leave` bytes."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def bottleneck(*args: str) -> tuple[int, str, str]:
    """Run the command in its own process: HDF5 is not fit to go on in-process after writes failed."""
    import sys

    done = subprocess.run([sys.executable, "-m", "bottleneck", *args], capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def one_disk_full_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("bottleneck:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("bottleneck: error: disk full at "), err
    return lines[0]


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_features_on_a_full_disk_then_with_room(tmp_path, small_disk, capsys):
    data, cache = tmp_path / "data", small_disk / "cache"
    make_dataset(data, per_class=60)
    big = ["--backbone", "pixels", "--image-size", "32"]  # 12 KB a row: 180 rows do not fit in 1 MB
    code, _, err = bottleneck("features", str(data), "--cache", str(cache), *big, "--no-progress", "--batch-size", "4")
    assert code == 2
    one_disk_full_line(err)
    small_disk.resize("20m")
    assert main(["features", str(data), "--cache", str(cache), *big, "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["computed"] + summary["reused"] == 180 and summary["reused"] > 0  # committed batches were kept
    assert temporaries(cache) == []


@pytest.fixture
def trained(tmp_path):
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=4)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(runs)]) == 0
    return data, cache, runs


@pytest.mark.slow
def test_train_head_report_and_predict_on_a_full_disk(trained, small_disk, capsys):
    data, cache, runs = trained
    [run] = runs.iterdir()
    fill(small_disk, leave=0)
    capsys.readouterr()
    code, _, err = bottleneck(
        "train-head", "--data", str(data), "--cache", str(cache), "--runs", str(small_disk / "runs")
    )
    assert code == 2
    one_disk_full_line(err)
    assert temporaries(small_disk) == [] and not any(p.name.startswith(".") for p in (small_disk / "runs").glob("*"))
    code, _, err = bottleneck("report", "--runs", str(runs), "--out", str(small_disk / "report.html"))
    assert code == 2
    one_disk_full_line(err)
    assert temporaries(small_disk) == [] and not (small_disk / "report.html").exists()
    small_disk.resize("30m")
    (small_disk / "filler").unlink()
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(small_disk / "runs")]) == 0
    assert main(["report", "--runs", str(runs), "--out", str(small_disk / "report.html")]) == 0
    capsys.readouterr()
    assert run.exists()


@pytest.mark.slow
def test_predict_and_export_on_a_full_disk(tmp_path, small_disk, capsys):
    data, cache, runs = tmp_path / "data", small_disk / "cache", tmp_path / "runs"
    small_disk.resize("20m")
    make_dataset(data, per_class=4)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(runs)]) == 0
    [run] = runs.iterdir()
    fresh = tmp_path / "fresh"
    make_dataset(fresh, per_class=40, start=10)  # new images: predict must write their features
    fill(small_disk, leave=0)
    code, _, err = bottleneck("predict", "--run", str(run), str(fresh))
    assert code == 2
    one_disk_full_line(err)
    code, _, err = bottleneck("export", "--run", str(run), "--out", str(small_disk / "exported"))
    assert code == 2
    assert one_disk_full_line(err).startswith(f"bottleneck: error: disk full at {small_disk}:")  # --out's disk
    assert temporaries(small_disk) == [] and not (small_disk / "exported").exists()
    (small_disk / "filler").unlink()
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(fresh), "--json"]) == 0


def test_export_to_a_read_only_file_system_is_one_line(tmp_path, small_disk):
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=4)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(runs)]) == 0
    [run] = runs.iterdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        code, _, err = bottleneck("export", "--run", str(run), "--out", str(small_disk / "exported"))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"bottleneck: error: cannot write the export to {small_disk / 'exported'}: Read-only file system"
    )


def _read_only(mount_point: Path):
    """Remount `mount_point` read-only for the `with` block."""
    import contextlib

    @contextlib.contextmanager
    def remounted():
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        try:
            yield
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mount_point)], check=True)

    return remounted()


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _predicted(args: list[str]) -> tuple[dict[str, dict], str]:
    code, out, err = bottleneck("predict", *args, "--json", "--top", "3")
    assert code == 0 and "Traceback" not in err, err
    return {
        row["path"]: {t["label"]: t["probability"] for t in row["top"]} for row in map(json.loads, out.splitlines())
    }, err


@pytest.mark.slow
def test_predict_reads_a_read_only_cache_and_computes_what_it_lacks_in_memory(tmp_path, small_disk):
    data, fresh, runs = tmp_path / "data", tmp_path / "fresh", tmp_path / "runs"
    cache = small_disk / "cache"
    small_disk.resize("20m")
    make_dataset(data, per_class=4)
    make_dataset(fresh, per_class=2, start=10)  # not in the cache
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(runs)]) == 0
    [run] = runs.iterdir()
    before = _listing(cache)
    with _read_only(small_disk):
        got, err = _predicted(["--run", str(run), str(data / "red"), str(fresh)])
        assert (
            f"warning: cannot write to cache folder {cache}: Read-only file system: reading what it holds; images "
            "it lacks are computed in this process only, not cached"
        ) in err
        assert "(computed 6, from the cache 4, failed 0)" in err
        with_views, err = _predicted(["--run", str(run), str(fresh), "--tta", "2"])
        assert "computed 6 features and 12 augmented views" in err
    assert _listing(cache) == before  # nothing written, not even a lock
    writable = tmp_path / "writable"
    shutil.copytree(cache, writable)
    expected, _ = _predicted(["--run", str(run), "--cache", str(writable), str(data / "red"), str(fresh)])
    assert got.keys() == expected.keys() and len(got) == 10
    for path, top in got.items():
        assert top == pytest.approx(expected[path], abs=1e-12)
    assert with_views.keys() == {p for p in expected if p.startswith(str(fresh))}


@pytest.mark.slow
def test_predict_on_a_read_only_cache_converts_for_openvino_in_a_scratch_folder(tmp_path, small_disk):
    from bottleneck.features.extract import ExtractOptions
    from bottleneck.learn.pretrain import PretrainConfig, pretrain
    from bottleneck.use.predict import predict_images

    data, fresh, runs = tmp_path / "data", tmp_path / "fresh", tmp_path / "runs"
    cache = small_disk / "cache"
    small_disk.resize("20m")
    make_dataset(data, per_class=4)
    make_dataset(fresh, per_class=1, start=10)
    base = pretrain(
        data, tmp_path / "base.keras", PretrainConfig(image_size=16, blocks=2, filters=4, epochs=1, batch_size=8)
    ).path
    backbone = ["--backbone", str(base), "--layer", "features"]
    assert main(["features", str(data), "--cache", str(cache), *backbone, "--no-progress", "--runtime", "keras"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *backbone, "--runs", str(runs)]) == 0
    [run] = runs.iterdir()
    scratch_before = set(Path(tempfile.gettempdir()).glob("bottleneck-openvino-*"))
    said: list[str] = []
    with _read_only(small_disk):
        converted = predict_images(
            run, [str(fresh)], top=3, options=ExtractOptions(runtime="openvino"), log=said.append
        )
        keras_made = predict_images(run, [str(fresh)], top=3, options=ExtractOptions(runtime="keras"))
    assert any("Read-only file system" in line for line in said) and not list(cache.glob("*.openvino"))
    assert set(Path(tempfile.gettempdir()).glob("bottleneck-openvino-*")) == scratch_before  # the scratch is gone
    assert converted.computed == keras_made.computed == 3
    for ours, reference in zip(converted.predictions, keras_made.predictions):
        assert ours.path == reference.path and dict(ours.top) == pytest.approx(dict(reference.top), abs=1e-4)


_WRITE_BIG_FILE = """
import sys
from pathlib import Path
import numpy as np
from bottleneck import fs
from bottleneck.errors import DiskFullError
fs.IN_MEMORY_HDF5_BYTES = 0  # HDF5 writes to the disk itself, as for a segment over 64 MiB

def write(handle):
    handle.create_dataset("features", data=np.ones((1000, 1000), dtype="float32"))

try:
    fs.write_hdf5_atomically(Path(sys.argv[1]) / "big.h5", write, needed_bytes=int(sys.argv[2]))
except DiskFullError as exc:
    sys.exit(f"bottleneck: error: {exc}")
"""


@pytest.mark.parametrize("stated", [4_000_000, 1], ids=["refused-before-writing", "size-understated"])
def test_a_file_too_big_to_build_in_memory_on_a_full_disk(small_disk, stated):
    """Over IN_MEMORY_HDF5_BYTES HDF5 writes directly: the free space is checked first, and where the size was
    understated and HDF5 meets the full disk itself, it is still one line."""
    import sys

    small_disk.resize("2m")
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_BIG_FILE, str(small_disk), str(stated)], capture_output=True, text=True
    )
    assert done.returncode == 1
    one_disk_full_line(done.stderr)
    assert list(small_disk.iterdir()) == []
