"""DATA laid out in split folders (`DATA/{train,val,test}/<class>/...`): the folders are the splits, end to end."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from bottleneck.cli import main
from bottleneck.features.discover import discover_images

from .conftest import PIXELS, make_dataset


def split_folders(root: Path, **folders: int) -> Path:
    """DATA/<folder>/<class>/... with `count` images per class in each folder (distinct images everywhere)."""
    for start, (name, count) in enumerate(folders.items()):
        make_dataset(root / name, per_class=count, start=100 * start)
    return root


def read_split(run: Path) -> dict[str, str]:
    with open(run / "split.csv", newline="") as handle:
        return {row["path"]: row["split"] for row in csv.DictReader(handle)}


def only_run(runs: Path) -> Path:
    [run] = [p for p in runs.iterdir() if not p.name.startswith(".")]
    return run


def test_train_and_val_folders_val_is_the_test_split_and_validation_is_drawn_from_train(tmp_path, capsys):
    data, cache, runs = split_folders(tmp_path / "data", train=8, val=4), tmp_path / "cache", tmp_path / "runs"
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "36 images in 3 classes" in out and "split folders: train 24, val 12; the sub-folders are the classes" in out
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(runs)]) == 0
    err = capsys.readouterr().err
    assert "splits: train from the train folder, test from the val folder, validation drawn from train (10%)" in err
    run = only_run(runs)
    split = read_split(run)
    assert {s for p, s in split.items() if p.startswith("val/")} == {"test"}  # a held-out image is never trained on
    assert {s for p, s in split.items() if p.startswith("train/")} == {"train", "validation"}
    assert sum(s == "validation" for s in split.values()) == 3  # one per class at least, from train only
    config = json.loads((run / "config.json").read_text())
    assert config["layout"] == "split-folders" and config["labels"] == ["blue", "green", "red"]
    # the same split again: stable
    assert (
        main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(tmp_path / "again")])
        == 0
    )
    assert read_split(only_run(tmp_path / "again")) == split
    # predict a held-out folder; the report takes the run like any other
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(data / "val" / "red"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and all(row["top"][0]["label"] == "red" for row in rows)
    assert main(["report", "--runs", str(runs), "--out", str(tmp_path / "report.html")]) == 0
    assert run.name in (tmp_path / "report.html").read_text()


def test_train_valid_and_test_folders_in_any_case_give_all_three_splits(tmp_path, capsys):
    data, cache, runs = (
        split_folders(tmp_path / "data", Train=6, Valid=3, TEST=3),
        tmp_path / "cache",
        tmp_path / "runs",
    )
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
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
                "--val-pct",
                "30",
                "--test-pct",
                "30",
            ]
        )
        == 0
    )
    assert (
        "splits: train from the train folder, validation from the validation folder, test from the test folder"
        in capsys.readouterr().err
    )
    split = read_split(only_run(runs))
    expected = {"Train": "train", "Valid": "validation", "TEST": "test"}
    assert all(split[path] == expected[path.split("/")[0]] for path in split)  # --val-pct/--test-pct: folders win


def test_a_train_folder_alone_draws_validation_and_test_from_it(tmp_path, capsys):
    data, cache, runs = split_folders(tmp_path / "data", train=10), tmp_path / "cache", tmp_path / "runs"
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(runs)]) == 0
    assert "validation drawn from train (10%), test drawn from train (10%)" in capsys.readouterr().err
    assert set(read_split(only_run(runs)).values()) == {"train", "validation", "test"}


def test_a_file_in_the_train_and_the_test_folder_is_held_out(tmp_path):
    data = split_folders(tmp_path / "data", train=4, test=2)
    shared = next((data / "test" / "red").iterdir())
    os.link(shared, data / "train" / "red" / "also.png")  # the same file (a hard link) in both folders
    discovery = discover_images(data)
    [image] = [im for im in discovery.images if im.inode == shared.stat().st_ino]
    assert discovery.folder_splits[image.relpath] == "test"


def test_an_ambiguous_layout_is_one_line_asking_for_layout(tmp_path, capsys):
    data = split_folders(tmp_path / "data", train=3, val=2)
    make_dataset(data, per_class=2, classes={"cats": (200, 100, 50)})  # a class folder beside the split folders
    assert main(["features", str(data), "--cache", str(tmp_path / "cache"), *PIXELS, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"bottleneck: error: cannot tell how {data} is laid out: train, val look like split folders, beside "
        "cats; pass --layout split-folders (DATA/train/<class>/...) or --layout classes (DATA/<class>/...)"
    )
    assert (
        main(
            ["features", str(data), "--cache", str(tmp_path / "cache"), *PIXELS, "--no-progress", "--layout", "classes"]
        )
        == 0
    )
    assert "in 3 classes" in capsys.readouterr().out  # cats, train, val: what the user asked for
    flat = tmp_path / "flat"
    make_dataset(flat, per_class=2)
    assert main(["features", str(flat), "--cache", str(tmp_path / "cache"), *PIXELS, "--layout", "split-folders"]) == 2
    assert "--layout split-folders: the top folders of" in capsys.readouterr().err
    held = split_folders(tmp_path / "held", val=2, test=2)  # no train folder: nothing to learn from
    assert main(["features", str(held), "--cache", str(tmp_path / "cache"), *PIXELS]) == 2
    assert "look like split folders, without a train folder; pass --layout" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_fine_tune_and_export_from_split_folders(tmp_path, capsys):
    from bottleneck.learn.pretrain import load_images

    data, cache, runs = split_folders(tmp_path / "data", train=6, val=3), tmp_path / "cache", tmp_path / "runs"
    base = tmp_path / "base.keras"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(data),
                "--out",
                str(base),
                "--image-size",
                "16",
                "--blocks",
                "2",
                "--filters",
                "4",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    _, _, relpaths, splits = load_images(data, 16, wanted=("train", "validation"))
    assert not any(p.startswith("val/") for p in relpaths) and set(splits) == {"train", "validation"}
    backbone = ["--backbone", str(base), "--layer", "features"]
    assert main(["features", str(data), "--cache", str(cache), *backbone, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *backbone, "--runs", str(runs)]) == 0
    parent = only_run(runs)
    assert (
        main(
            [
                "fine-tune",
                "--run",
                str(parent),
                "--runs",
                str(tmp_path / "tuned"),
                "--epochs",
                "1",
                "--learning-rate",
                "1e-3",
            ]
        )
        == 0
    )
    tuned = only_run(tmp_path / "tuned")
    assert read_split(tuned) == read_split(parent)
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert metrics["splits"]["test"]["per_class"]["red"]["support"] == 3  # the val folder is its exam
    assert main(["export", "--run", str(parent), "--out", str(tmp_path / "exported")]) == 0
    parity = json.loads((tmp_path / "exported" / "export.json").read_text())["parity"]
    assert parity["model.keras"]  # measured on the run's test images: the val folder's


def test_a_plain_folder_of_images_is_extracted_and_compared_but_trains_no_head(tmp_path, capsys):
    from .conftest import synthetic_image

    folders = {}
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        folder = tmp_path / name
        (folder / "more").mkdir(parents=True)
        for i in range(6):  # a: images at the top only; b: some in a sub-folder too, read with --layout plain
            where = "more" if name == "b" and i % 2 else "."
            synthetic_image(colour, i + (0 if name == "a" else 50)).save(folder / where / f"{i}.png")
        folders[name] = folder
    (folders["a"] / "more").rmdir()
    cache = tmp_path / "cache"
    for folder, layout in ((folders["a"], []), (folders["b"], ["--layout", "plain"])):
        assert main(["features", str(folder), "--cache", str(cache), *PIXELS, "--no-progress", *layout]) == 0
        out = capsys.readouterr().out
        assert "6 images ->" in out and "a plain folder: 6 images, no labels" in out
    assert (
        main(
            [
                "compare",
                str(folders["a"]),
                str(folders["b"]),
                "--cache",
                str(cache),
                *PIXELS,
                "--json",
                "--layout",
                "plain",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["images_a"] == result["images_b"] == 6 and result["mmd_p_value"] < 0.05
    # the audit of a plain folder: duplicates and outliers, no label issues
    (folders["a"] / "copy.png").write_bytes((folders["a"] / "0.png").read_bytes())
    assert main(["features", str(folders["a"]), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert (
        main(
            [
                "audit",
                "--data",
                str(folders["a"]),
                "--cache",
                str(cache),
                *PIXELS,
                "--out",
                str(tmp_path / "audit"),
                "--json",
            ]
        )
        == 0
    )
    audit = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert audit["images"] == 7 and audit["classes"] == {} and audit["label_issues"] == []
    assert [sorted((pair["a"], pair["b"])) for pair in audit["exact_duplicates"]] == [["0.png", "copy.png"]]
    assert any("a plain folder: no labels" in note for note in audit["notes"])
    assert "a plain folder: no labels" in (tmp_path / "audit" / "audit.html").read_text()
    assert (
        main(
            [
                "train-head",
                "--data",
                str(folders["a"]),
                "--cache",
                str(cache),
                *PIXELS,
                "--runs",
                str(tmp_path / "runs"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == (
        f"bottleneck: error: {folders['a']} holds images but no labels: a head "
        "needs labels, from one sub-folder per class (DATA/<class>/...), split "
        "folders of those, a .cls member beside each image in tar shards, or "
        "--labels FILE"
    )
