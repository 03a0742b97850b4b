"""Inputs that are not files: predict never hangs on a FIFO or reads /dev/zero until the memory is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bottleneck.cli import main

from .conftest import PIXELS, make_dataset

ROOT = Path(__file__).resolve().parent.parent


def test_predict_refuses_a_fifo_and_a_device_in_one_line_each_and_predicts_the_rest(tmp_path, capsys):
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=4)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(runs)]) == 0
    capsys.readouterr()
    [run] = list(runs.iterdir())
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it for reading would block for good
    good = next((data / "red").iterdir())
    # In a process of its own with a deadline: a hang fails the test instead of stalling the suite.
    done = subprocess.run(
        [sys.executable, "-m", "bottleneck", "predict", "--run", str(run), str(fifo), "/dev/zero", str(good)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    # (long paths are shown with their start elided)
    assert any(
        fifo.name in line and "not a regular file (a FIFO, device or socket): not read" in line for line in lines
    )
    assert any("/dev/zero" in line and "not a regular file" in line for line in lines)
    assert any(good.name in line and " red " in line for line in lines), lines
    assert "Traceback" not in done.stderr


def test_a_fifo_inside_data_is_skipped_without_blocking(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    os.mkfifo(data / "red" / "stuck.png")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bottleneck",
            "features",
            str(data),
            "--cache",
            str(tmp_path / "cache"),
            *PIXELS,
            "--no-progress",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert '"computed": 6' in done.stdout.splitlines()[-1]


def test_predict_csv_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=4)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(runs)]) == 0
    [run] = list(runs.iterdir())
    capsys.readouterr()
    image = next((data / "red").iterdir())
    cases = [
        (tmp_path / "no" / "such" / "out.csv", "the folder"),
        (tmp_path, "is a folder; give the name of a file"),
        ("/dev/full", "cannot write --csv /dev/full: No space left on device"),
    ]
    for target, expected in cases:
        assert main(["predict", "--run", str(run), str(image), "--csv", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1] and err[-1].startswith("bottleneck: error: ") and "Traceback" not in "\n".join(err)


def test_misleading_lines_are_gone(tmp_path, capsys):
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=4)
    (data / "red" / "notes.txt").write_text("not an image")
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(runs)]) == 0
    [run] = list(runs.iterdir())
    capsys.readouterr()
    # predict counts the files it skipped in a folder, so "predicted 12 of 12" is not read as "of all 13"
    assert main(["predict", "--run", str(run), str(data)]) == 0
    assert "; skipped 1 files in the folders given (" in capsys.readouterr().err
    # --tta on a head that never saw views says what it costs
    assert main(["predict", "--run", str(run), str(data / "red"), "--tta", "2"]) == 0
    err = capsys.readouterr().err
    assert "was trained without augmented views" in err
    assert "(computed 0 features and 8 augmented views, from the cache 4," in err  # not "computed 0" after 8 views
    # views held for another flip probability are named, not "holds no augmented views"
    assert (
        main(
            [
                "features",
                str(data),
                "--cache",
                str(cache),
                *PIXELS,
                "--augment",
                "1",
                "--augment-flip",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(cache),
                *PIXELS,
                "--runs",
                str(runs),
                "--augment",
                "--augment-flip",
                "0.3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "holds views of these features for another recipe (" in err and "not for --augment-flip 0.3" in err
    assert "--augment-flip 0 " in err.replace(")", " ") and "--augment-flip 0.5" in err  # predict --tta made 0.5's
    # --augment-flip without --augment is not silently ignored
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--augment-flip", "0"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--augment-flip sets the flips of augmented views: it needs --augment N")
    )
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(cache),
                *PIXELS,
                "--runs",
                str(runs),
                "--augment-flip",
                "0",
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--augment-flip picks the augmented views to train on: it needs --augment")
    )


def test_an_exclude_list_holds_any_file_name_escaped(tmp_path, capsys):

    from bottleneck.learn.dataset import escape_listed_name, unescape_listed_name

    names = ["odd\nname.png", "#hash.png", " edge .png", "back\\slash.png", "form\x0cfeed.png"]
    for name in names:
        line = escape_listed_name(name)
        assert (
            "\n" not in line
            and not line.startswith("#")
            and line == line.strip()
            and unescape_listed_name(line) == name
        )
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=5)
    source = next((data / "red").iterdir()).read_bytes()
    for i, name in enumerate(names):  # each a distinct image: the same pixels with one byte of metadata changed
        (data / "red" / name).write_bytes(source[:-12] + bytes([i]) + source[-11:])
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    listing = tmp_path / "exclude.txt"
    listing.write_text(
        "# written as the audit writes it\n" + "".join(f"red/{escape_listed_name(n)}\n" for n in names),
        encoding="utf-8",
    )
    capsys.readouterr()
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(cache),
                *PIXELS,
                "--runs",
                str(runs),
                "--exclude",
                str(listing),
            ]
        )
        == 0
    )
    assert f"images left out of training and validation: listed in {listing}" in capsys.readouterr().out
    (run,) = runs.iterdir()
    record = json.loads((run / "config.json").read_text())["exclude"]
    assert record["listed"] == record["left_out"] + record["test_kept"] == len(names)  # every odd name was found


def test_pretrain_and_views_read_images_with_the_guards_of_features(tmp_path):
    """A 64 GB file in DATA is refused before reading by pretrain's loader and by the views, as by `features`."""
    from bottleneck.features.decode import UnreadableImage, decode_image_file
    from bottleneck.learn.pretrain import load_images

    data = tmp_path / "data"
    make_dataset(data, per_class=3)
    huge = data / "red" / "huge.png"
    with open(huge, "wb") as handle:  # sparse: no disk used, but read_bytes() would try to hold 64 GB
        handle.truncate(64 * 2**30)
    pixels, labels, relpaths, _ = load_images(data, 16)
    assert len(pixels) == 9 and "red/huge.png" not in relpaths
    with pytest.raises(UnreadableImage, match=r"^file of 64\.0 GiB is larger than any image bottleneck decodes"):
        decode_image_file(huge, 16)
