"""Faults in what is on disk, as `report` and the commands that load cached features meet them.

Features rotted in a segment file (NaN or infinity) are left out with one line or refused with one
line, never handed to scikit-learn; `report` skips a run it cannot read and reports the others.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from bottleneck.cli import main
from bottleneck.errors import CacheError
from bottleneck.learn.dataset import load_labelled_features

from .conftest import PIXELS, make_dataset


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


def test_train_head_leaves_out_images_whose_stored_features_rotted_and_counts_them(pixels_extracted, tmp_path, capsys):
    data, cache = pixels_extracted
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


def test_compare_on_rotted_features_leaves_them_out_instead_of_failing_in_linear_algebra(pixels_extracted, capsys):
    data, cache = pixels_extracted
    rot(cache, [1, 5], np.inf)
    capsys.readouterr()
    assert main(["compare", str(data), str(data), "--cache", str(cache), "--permutations", "5"]) == 0
    captured = capsys.readouterr()
    assert "Frechet distance" in captured.out and "Traceback" not in captured.err
    assert "non-finite features" in captured.err


def test_features_that_all_rotted_are_one_line(pixels_extracted, tmp_path, capsys):
    data, cache = pixels_extracted
    segment = rot(cache, range(12))
    capsys.readouterr()
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(tmp_path / "runs")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "12 images have non-finite features" in line and "no image under" in line and str(segment) in line


def test_a_streamed_read_stops_at_a_rotted_row_with_one_line_naming_the_store(pixels_extracted):
    data, cache = pixels_extracted
    segment = rot(cache, [7])
    loaded = load_labelled_features(data, cache, stream=True, chunk_rows=4)
    assert not loaded.rows.in_memory
    with pytest.raises(CacheError) as caught:
        for _ in loaded.rows.chunks():
            pass
    message = str(caught.value)
    assert "non-finite features" in message and str(loaded.store_path) in message and str(segment) in message
    assert "\n" not in message


# ---- report -----------------------------------------------------------------------------------

NOT_UTF8_CLASS = os.fsdecode(b"r\xffd")  # a folder name whose bytes are not UTF-8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder with one run over a class and a file whose names are not UTF-8, one of them misclassified."""
    root = tmp_path_factory.mktemp("report-faults")
    data, cache, runs = root / "data", root / "cache", root / "runs"
    make_dataset(data, per_class=3)
    (data / "red").rename(data / NOT_UTF8_CLASS)
    victim = sorted((data / NOT_UTF8_CLASS).iterdir())[0]
    odd_file = victim.with_name(os.fsdecode(b"\xfe-odd.png"))
    victim.rename(odd_file)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert (
        main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(runs), "--test-pct", "50"]) == 0
    )
    [run] = runs.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["misclassified"] = [
        {"path": str(odd_file.relative_to(data)), "true": NOT_UTF8_CLASS, "predicted": "blue", "confidence": 0.6}
    ]
    (run / "metrics.json").write_text(json.dumps(metrics))  # as train-head writes a misclassified image
    return runs


def copy_run(runs: Path, name: str, metrics: bytes | None = None) -> Path:
    [good] = [folder for folder in runs.iterdir() if folder.name[0].isdigit()]
    copy = runs / name
    shutil.copytree(good, copy)
    if metrics is not None:
        (copy / "metrics.json").write_bytes(metrics)
    return copy


def small_runs(root: Path) -> Path:
    """A runs folder holding one run folder with the least a run has: a head and no splits."""
    run = root / "runs" / "20260101-000000-logreg-0000"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.json").write_text('{"head": "logreg", "splits": {}}')
    return root / "runs"


def test_report_shows_names_that_are_not_utf8_and_their_pictures(runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    capsys.readouterr()
    assert main(["report", "--runs", str(runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| r\\xffd |" in captured.out and "Traceback" not in captured.err
    page = out.read_text(encoding="utf-8")
    assert "\\xfe-odd.png" in page and "file missing" not in page
    assert len(re.findall(r'<img alt="r\\xffd/\\xfe-odd.png" src="data:image/jpeg;base64,', page)) == 1  # its own
    assert page.count('<div class="neighbours">') == 1 and ' data-c="r\\xffd/\\xfe-odd.png' in page  # neighbours, map


def alone(runs: Path, tmp_path: Path, **paths: Path) -> Path:
    """A copy of the run in a runs folder of its own, its config's paths (`data`, `store`) replaced by `paths`."""
    [run] = [folder for folder in runs.iterdir() if folder.name[0].isdigit()]
    copy = shutil.copytree(run, tmp_path / "sent" / run.name)
    config = json.loads((copy / "config.json").read_text())
    config.update({key: str(path) for key, path in paths.items()})
    (copy / "config.json").write_text(json.dumps(config))
    return copy.parent


@pytest.mark.parametrize("gone", ["cache", "data"])
def test_report_of_a_run_sent_without_its_cache_or_data_says_so_in_one_line_per_picture(runs, tmp_path, capsys, gone):
    config = json.loads(next(runs.glob("2*/config.json")).read_text())
    moved = {"cache": {"store": tmp_path / "gone" / Path(config["store"]).name}, "data": {"data": tmp_path / "gone"}}[
        gone
    ]
    sent = alone(runs, tmp_path, **moved)
    capsys.readouterr()
    assert main(["report", "--runs", str(sent)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    page = (sent / "report.html").read_text(encoding="utf-8")
    why = {
        "cache": f"its feature cache {tmp_path / 'gone'} is gone",
        "data": f"its images are not found (DATA {tmp_path / 'gone'} is gone)",
    }
    assert re.findall(r'<p class="note unavailable">([^<]*)</p>', page) == [
        f"embedding map unavailable: {why[gone]}",
        f"nearest training images unavailable: {why[gone]}",
    ]
    assert 'alt="reliability diagram" src="data:image/png;base64,' in page  # from test_predictions.csv alone


def test_report_with_rotted_features_draws_the_map_of_the_others(runs, tmp_path, capsys):
    root = shutil.copytree(runs.parent / "data", tmp_path / "data", symlinks=True), tmp_path / "cache"
    shutil.copytree(runs.parent / "cache", root[1])
    config = json.loads(next(runs.glob("2*/config.json")).read_text())
    rot(root[1], range(0, 9, 2))
    sent = alone(runs, tmp_path, data=root[0], store=root[1] / Path(config["store"]).name)
    assert main(["report", "--runs", str(sent)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    page = (sent / "report.html").read_text(encoding="utf-8")
    assert "nan" not in re.findall(r"<svg.*</svg>", page, re.S)[0] and page.count(" data-c=") == 4
    assert "5 images have non-finite features" in page


def test_report_skips_runs_it_cannot_read_with_one_line_each_and_reports_the_others(runs, tmp_path, capsys):
    bad = {
        "z-empty": b"{}",
        "z-null": b"null",
        "z-list": b"[]",
        "z-latin1": '{"head": "é"}'.encode("latin-1"),
        "z-cut": b'{"head": "logreg", "spl',
    }
    copies = {name: copy_run(runs, name, metrics) for name, metrics in bad.items()}
    deep = copy_run(runs, "z-deep")
    metrics = json.loads((deep / "metrics.json").read_text())
    metrics["splits"]["test"]["per_class"] = 5
    (deep / "metrics.json").write_text(json.dumps(metrics))
    copies["z-deep"] = deep
    try:
        out = tmp_path / "report.html"
        capsys.readouterr()
        assert main(["report", "--runs", str(runs), "--out", str(out)]) == 0
        captured = capsys.readouterr()
        warnings = [line for line in captured.err.splitlines() if line.startswith("warning: skipped run ")]
        assert len(warnings) == len(copies) and "Traceback" not in captured.err
        for name, folder in copies.items():
            assert sum(f"skipped run {folder}:" in line for line in warnings) == 1, name
            assert name not in captured.out and name not in out.read_text()
        assert "holds null, not an object" in captured.err and "holds a list, not an object" in captured.err
        assert "names no head" in captured.err and "its metrics.json is not UTF-8 text" in captured.err
        assert "its metrics.json is damaged (" in captured.err
        assert "| r\\xffd |" in captured.out  # the readable run is reported
    finally:
        for folder in copies.values():
            shutil.rmtree(folder)


def test_report_with_no_readable_run_is_one_line(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "metrics.json").write_text("null")
    assert main(["report", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("warning: skipped run") == 2
    assert one_error_line(err.split("\n", 2)[2]).startswith(
        f"bottleneck: error: none of the 2 runs in {tmp_path} can be read"
    )
    assert not (tmp_path / "report.html").exists()


def test_report_out_naming_a_folder_is_one_line_and_leaves_nothing(tmp_path, capsys):
    runs = small_runs(tmp_path / "in")
    folder = tmp_path / "rr"
    folder.mkdir()
    (tmp_path / ".rr.tmp").write_bytes(b"")  # as an older version left it, writing to --out rr
    capsys.readouterr()
    assert main(["report", "--runs", str(runs), "--out", str(folder)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert (
        line
        == f"bottleneck: error: --out {folder} is a folder: name the HTML file to write, as --out {folder}/report.html"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "rr"] and not any(folder.iterdir())


def test_report_on_a_full_disk_leaves_no_temporary_file_and_the_next_run_clears_an_old_one(
    tmp_path, monkeypatch, capsys
):
    runs = small_runs(tmp_path / "in")
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    out = tmp_path / "report.html"
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real_write_text(self, "")
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    capsys.readouterr()
    assert main(["report", "--runs", str(runs), "--out", str(out)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"bottleneck: error: disk full at {tmp_path}: ")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / ".report.html.tmp").write_bytes(b"")  # as a run killed while writing leaves it
    assert main(["report", "--runs", str(runs), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "cannot read its test_predictions.csv (No such file or directory)"),
        ("path,true,guess\n", "its test_predictions.csv does not start with path,label,predicted,probability_..."),
        (
            "path,label,predicted,probability_blue\nblue/x.png,blue,blue,high\n",
            "its test_predictions.csv has a row whose probabilities are not numbers",
        ),
    ],
)
def test_report_of_a_run_whose_test_predictions_are_gone_or_damaged_says_so_in_one_line(
    runs, tmp_path, capsys, content, why
):
    sent = alone(runs, tmp_path)
    [run] = sent.iterdir()
    (run / "test_predictions.csv").unlink()
    if content is not None:
        (run / "test_predictions.csv").write_text(content)
    capsys.readouterr()
    assert main(["report", "--runs", str(sent)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    page = (sent / "report.html").read_text(encoding="utf-8")
    assert re.findall(r'<p class="note unavailable">([^<]*)</p>', page) == [
        f"ROC, precision-recall and calibration unavailable: {why}"
    ]
    assert '<h3>embedding map</h3><div class="emap"' in page  # the other pictures stand
