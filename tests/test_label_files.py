"""`--labels FILE`: images and labels from a CSV, TSV or Parquet file, end to end; bad files are one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bottleneck.cli import main

from .conftest import PIXELS, make_dataset


def write_table(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def images_with_labels(root: Path, per_class: int = 6) -> list[tuple[str, str]]:
    """Images in one flat folder (no class folders), and their labels."""
    made = make_dataset(root / "nested", per_class=per_class)
    flat = root / "images"
    flat.mkdir()
    pairs = []
    for path in made:
        target = flat / f"{path.parent.name}-{path.name}"
        path.rename(target)
        pairs.append((f"images/{target.name}", path.parent.name))
    return sorted(pairs)


def only_run(runs: Path) -> Path:
    [run] = [p for p in runs.iterdir() if not p.name.startswith(".")]
    return run


def test_a_csv_names_images_in_a_flat_folder_and_every_unusable_row_is_counted(tmp_path, capsys):
    pairs = images_with_labels(tmp_path)
    rows = [[path, label] for path, label in pairs]
    rows += [
        ["images/gone.png", "red"],
        [pairs[0][0], pairs[0][1]],
        [pairs[1][0], " ; "],
        ["images", "red"],
        ["bad\0name.png", "red"],
    ]
    labels = write_table(tmp_path / "labels.csv", ["Path", "Label"], rows)
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    assert main(["features", "--labels", str(labels), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "18 images in 3 classes" in out and "label file labels.csv: 18 images in 3 classes" in out
    for kind, first in [
        ("missing file", "images/gone.png"),
        ("listed again", pairs[0][0]),
        ("empty label", pairs[1][0]),
        ("not a regular file", "images"),
        ("not a file name", "bad\\x00name.png"),
    ]:
        assert f"warning: 1 row of labels.csv left out: {kind} (first: {first})" in err, err
    assert main(["train-head", "--labels", str(labels), "--cache", str(cache), *PIXELS, "--runs", str(runs)]) == 0
    run = only_run(runs)
    with open(run / "split.csv", newline="") as handle:
        split = {row["path"]: row["split"] for row in csv.DictReader(handle)}
    assert len(split) == 18 and all(path.startswith("images/") for path in split)  # relative to the file's folder
    assert set(split.values()) == {"train", "validation", "test"}
    config = json.loads((run / "config.json").read_text())
    assert config["layout"] == "label-file" and config["labels_file"] == str(labels)
    assert config["data"] == str(tmp_path)
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(tmp_path / pairs[5][0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top"][0]["label"] == pairs[5][1]
    assert main(["report", "--runs", str(runs), "--out", str(tmp_path / "report.html")]) == 0
    assert (
        main(["audit", "--labels", str(labels), "--cache", str(cache), *PIXELS, "--out", str(tmp_path / "audit")]) == 0
    )
    # the audit's exclude list, relative to the label file's folder, is read back by train-head --exclude
    (tmp_path / "exclude.txt").write_text(pairs[3][0] + "\n")
    assert (
        main(
            [
                "train-head",
                "--labels",
                str(labels),
                "--cache",
                str(cache),
                *PIXELS,
                "--runs",
                str(tmp_path / "r2"),
                "--exclude",
                str(tmp_path / "exclude.txt"),
            ]
        )
        == 0
    )
    assert pairs[3][0] not in (only_run(tmp_path / "r2") / "split.csv").read_text()


def test_a_tsv_gives_splits_and_groups_and_images_under_data_it_does_not_name_are_counted(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, per_class=8)
    listed = sorted(p for p in data.rglob("*.png") if not p.name.endswith("_007.png"))  # 3 images not named
    rows = []
    for path in listed:
        number = int(path.stem.rsplit("_", 1)[1])
        split = "TEST" if number == 6 else "val" if number == 5 else ""  # empty: drawn (train here)
        rows.append([str(path), path.parent.name, split, f"g{number // 2}"])  # absolute paths; pairs share a group
    labels = write_table(tmp_path / "labels.tsv", ["path", "label", "split", "group"], rows, delimiter="\t")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    assert main(["features", str(data), "--labels", str(labels), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"warning: 3 images under {data} are not in labels.tsv and are left out (first: blue/blue_007.png" in err
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--labels",
                str(labels),
                "--cache",
                str(cache),
                *PIXELS,
                "--runs",
                str(runs),
            ]
        )
        == 0
    )
    assert (
        "splits: train from the label file's train rows, validation from the label file's validation rows, test "
        "from the label file's test rows"
    ) in capsys.readouterr().err
    with open(only_run(runs) / "split.csv", newline="") as handle:
        split = {row["path"]: row["split"] for row in csv.DictReader(handle)}
    assert len(split) == 21
    for path, name in split.items():
        number = int(Path(path).stem.rsplit("_", 1)[1])
        assert name == {6: "test", 5: "validation"}.get(number, "train")


def test_groups_keep_their_images_in_one_split(tmp_path):
    from bottleneck.learn.splits import SplitConfig, assign_folds, assign_splits

    items = [(f"img{i}.png", "a" if i % 2 else "b") for i in range(200)]
    groups = {path: f"patient{i // 10}" for i, (path, _) in enumerate(items)}
    drawn = assign_splits(items, SplitConfig(20, 20, seed=3), groups)
    for group in set(groups.values()):
        by_label = {}
        for path, label in items:
            if groups[path] == group:
                by_label.setdefault(label, set()).add(drawn[path])
        assert all(len(splits) == 1 for splits in by_label.values())
    assert set(drawn.values()) == {"train", "validation", "test"}
    fold_of = assign_folds(items, 4, seed=3, groups=groups)  # --folds keeps a group in one fold too
    for group in set(groups.values()):
        for label in ("a", "b"):
            assert len({fold_of[p] for p, lab in items if groups[p] == group and lab == label}) == 1


def test_a_parquet_label_file_reads_like_its_csv(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pairs = images_with_labels(tmp_path, per_class=3)
    pq.write_table(
        pa.table({"path": [p for p, _ in pairs], "label": [label for _, label in pairs]}), tmp_path / "labels.parquet"
    )
    assert (
        main(
            [
                "features",
                "--labels",
                str(tmp_path / "labels.parquet"),
                "--cache",
                str(tmp_path / "cache"),
                *PIXELS,
                "--no-progress",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["computed"] == 9


def test_bad_label_files_are_one_line(tmp_path, capsys):
    pairs = images_with_labels(tmp_path, per_class=2)
    cases = [
        (
            write_table(tmp_path / "nopath.csv", ["file", "label"], [[p, label] for p, label in pairs]),
            "label file {f} needs the columns path and label (and may have split, group); its header is file, label",
        ),
        (
            write_table(tmp_path / "badsplit.csv", ["path", "label", "split"], [[pairs[0][0], "red", "holdout"]]),
            "label file {f}, line 2: unknown split 'holdout'; use train, val (or valid, validation) or test, or leave it "
            "empty",
        ),
        (
            write_table(tmp_path / "none.csv", ["path", "label"], [["images/gone.png", "red"]]),
            "label file {f} names no usable image (1 row of none.csv left out: missing file (first: images/gone.png))",
        ),
        (tmp_path / "absent.csv", "label file not found: {f}"),
        (tmp_path, "label file {f} is not a regular file"),
    ]
    for path, message in cases:
        assert main(["features", "--labels", str(path), "--cache", str(tmp_path / "cache"), *PIXELS]) == 2
        assert capsys.readouterr().err.strip() == "bottleneck: error: " + message.format(f=path)
    assert main(["features", "--cache", str(tmp_path / "cache"), *PIXELS]) == 2
    assert capsys.readouterr().err.strip() == (
        "bottleneck: error: give DATA (a folder of images) or --labels FILE (a label file naming them)"
    )


@pytest.mark.slow
def test_fine_tune_and_export_of_a_run_from_a_label_file(tmp_path):
    from bottleneck.learn.pretrain import PretrainConfig, pretrain

    pairs = images_with_labels(tmp_path, per_class=6)
    labels = write_table(tmp_path / "labels.csv", ["path", "label"], [[p, label] for p, label in pairs])
    base = pretrain(
        None, tmp_path / "base.keras", PretrainConfig(image_size=16, blocks=2, filters=4, epochs=1), labels=str(labels)
    ).path
    backbone = ["--backbone", str(base), "--layer", "features"]
    assert (
        main(["features", "--labels", str(labels), "--cache", str(tmp_path / "cache"), *backbone, "--no-progress"]) == 0
    )
    assert (
        main(
            [
                "train-head",
                "--labels",
                str(labels),
                "--cache",
                str(tmp_path / "cache"),
                *backbone,
                "--runs",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    parent = only_run(tmp_path / "runs")
    assert main(["fine-tune", "--run", str(parent), "--runs", str(tmp_path / "tuned"), "--epochs", "1"]) == 0
    assert (only_run(tmp_path / "tuned") / "split.csv").read_text() == (parent / "split.csv").read_text()
    assert main(["export", "--run", str(parent), "--out", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "export.json").read_text())["parity"]["model.keras"]
