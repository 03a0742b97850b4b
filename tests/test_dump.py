"""`bottleneck dump`: the cache joined to its labels and splits as Parquet or npz, read back by pandas, numpy and
DuckDB; streamed row groups within the memory budget; multi-label and unlabelled data; one-line errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from bottleneck.cli import main
from bottleneck.learn.dataset import find_store
from bottleneck.use.dump import DumpError, dump_features

from .conftest import PIXELS, make_dataset, synthetic_image

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SPLIT_FLAGS = ["--seed", "3", "--val-pct", "25", "--test-pct", "25"]


def dump(*argv: str) -> int:
    return main(["dump", *argv])


def store_rows(cache: Path, hashes: list[str]) -> np.ndarray:
    """The store's own rows for these content hashes, read directly from the store."""
    contents = find_store(cache, None).snapshot()
    rows = contents.rows_by_hash()
    return np.stack([contents.read_rows_at(np.array([rows[h]]))[0] for h in hashes]).astype(np.float32)


def read_split_csv(run: Path) -> dict[str, tuple[str, str]]:
    with open(run / "split.csv", newline="") as handle:
        return {row["path"]: (row["label"], row["split"]) for row in csv.DictReader(handle)}


def train_head_split(cache: Path, runs: Path, *flags: str) -> Path:
    """The run folder of `train-head` with these flags (DATA or --labels among them)."""
    assert main(["train-head", "--cache", str(cache), "--runs", str(runs), *flags]) == 0
    [run] = [p for p in runs.iterdir() if not p.name.startswith(".")]
    return run


def test_parquet_dump_opens_in_pandas_with_the_store_rows_and_train_heads_split(pixels_extracted, tmp_path, capsys):
    data, cache = pixels_extracted
    run = train_head_split(cache, tmp_path / "runs", "--data", str(data), *SPLIT_FLAGS)
    out = tmp_path / "out" / "features.parquet"  # a missing folder is made
    capsys.readouterr()
    assert dump("--data", str(data), "--cache", str(cache), *PIXELS, *SPLIT_FLAGS, "--out", str(out), "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 12 and summary["out"] == str(out) and summary["seconds"] >= 0
    assert summary["columns"] == ["path", "label", "split", "content_hash", "features"]

    frame = pd.read_parquet(out)
    assert list(frame.columns) == summary["columns"] and len(frame) == 12
    for column in ("path", "label", "split", "content_hash"):
        assert all(isinstance(value, str) for value in frame[column])
    features = np.stack(frame["features"].to_numpy())
    assert features.dtype == np.float32 and features.shape == (12, 8 * 8 * 3)
    assert np.array_equal(features, store_rows(cache, list(frame["content_hash"])))
    for path, label, content_hash in zip(frame["path"], frame["label"], frame["content_hash"]):
        assert label == path.split("/")[0]
        assert content_hash == hashlib.sha256((data / path).read_bytes()).hexdigest()
    assert dict(zip(frame["path"], zip(frame["label"], frame["split"]))) == read_split_csv(run)
    assert set(frame["split"]) == {"train", "validation", "test"}

    schema = pq.read_schema(out)
    assert schema.field("features").type == pa.list_(pa.float32(), 192)
    meta = {key.decode(): value.decode() for key, value in schema.metadata.items()}
    fingerprint = find_store(cache, None).path.stem
    assert meta["bottleneck.fingerprint"] == fingerprint and meta["bottleneck.architecture"] == "pixels"
    assert meta["bottleneck.pretrained"] == "true" and meta["bottleneck.feature_dim"] == "192"

    # --split-file: the run's split, whatever the seed
    assert (
        dump(
            "--data",
            str(data),
            "--cache",
            str(cache),
            "--seed",
            "9",
            "--split-file",
            str(run / "split.csv"),
            "--out",
            str(out),
        )
        == 0
    )
    assert dict(zip(*pd.read_parquet(out, columns=["path", "split"]).to_dict("list").values())) == {
        p: s for p, (_, s) in read_split_csv(run).items()
    }
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_npz_dump_loads_without_pickle_and_matches_the_parquet_dump(pixels_extracted, tmp_path):
    data, cache = pixels_extracted
    parquet, npz = tmp_path / "f.parquet", tmp_path / "f.npz"
    npz.write_bytes(b"an older dump")  # a regular file is replaced
    for out in (parquet, npz):
        assert dump("--data", str(data), "--cache", str(cache), *SPLIT_FLAGS, "--out", str(out)) == 0
    frame = pd.read_parquet(parquet)
    with np.load(npz, allow_pickle=False) as arrays:
        for column in ("path", "label", "split", "content_hash"):
            assert arrays[column].dtype.kind == "U" and arrays[column].tolist() == frame[column].tolist()
        assert arrays["features"].dtype == np.float32 and arrays["features"].shape == (12, 192)
        assert np.array_equal(arrays["features"], np.stack(frame["features"].to_numpy()))
        assert str(arrays["fingerprint"]) == find_store(cache, None).path.stem
        assert str(arrays["architecture"]) == "pixels" and bool(arrays["pretrained"]) is True
        assert int(arrays["feature_dim"]) == 192 and int(arrays["image_size"]) == 8


def test_duckdb_reads_the_parquet_dump(pixels_extracted, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    data, cache = pixels_extracted
    out = tmp_path / "f.parquet"
    assert dump("--data", str(data), "--cache", str(cache), "--out", str(out)) == 0
    counts = duckdb.sql(f"select label, count(*) as n from '{out}' group by label order by label").fetchall()
    assert counts == [("blue", 4), ("green", 4), ("red", 4)]
    query = f"select len(features), features[1] from '{out}' where path = 'red/red_000.png'"
    [(width, first)] = duckdb.sql(query).fetchall()
    frame = pd.read_parquet(out)
    assert width == 192 and np.float32(first) == frame.loc[frame["path"] == "red/red_000.png", "features"].iloc[0][0]


def test_a_streamed_dump_writes_several_row_groups_equal_to_the_in_memory_dump(pixels_extracted, tmp_path):
    data, cache = pixels_extracted
    whole = dump_features(data, cache, tmp_path / "whole.parquet")
    streamed = dump_features(data, cache, tmp_path / "streamed.parquet", stream=True, chunk_rows=5)
    assert not whole.streamed and whole.row_groups == 1
    assert streamed.streamed and streamed.row_groups == 3 and pq.ParquetFile(streamed.out).num_row_groups == 3
    assert pq.read_table(streamed.out).equals(pq.read_table(whole.out))
    with pytest.raises(DumpError, match=r"npz holds one array: write \.parquet"):
        dump_features(data, cache, tmp_path / "streamed.npz", stream=True, chunk_rows=5)
    assert not (tmp_path / "streamed.npz").exists()


def test_max_memory_under_the_features_streams_parquet_and_refuses_npz_in_one_line(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=50)  # 150 x 768 bytes: over a 300K budget in memory, 3 chunks of 64 rows streamed
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    out = tmp_path / "f.parquet"
    capsys.readouterr()
    assert dump("--data", str(data), "--cache", str(cache), "--max-memory", "300K", "--out", str(out), "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["streamed"] and summary["row_groups"] == 3 == pq.ParquetFile(out).num_row_groups
    whole = dump_features(data, cache, tmp_path / "whole.parquet")
    assert pq.read_table(out).equals(pq.read_table(whole.out))
    npz = tmp_path / "f.npz"
    assert dump("--data", str(data), "--cache", str(cache), "--max-memory", "300K", "--out", str(npz)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "write .parquet" in err and not npz.exists()


@pytest.mark.slow
def test_multi_label_dump_has_a_list_column_in_parquet_and_joined_labels_in_npz(tmp_path):
    root = tmp_path / "ml"
    (root / "images").mkdir(parents=True)
    sets = [("cat",), ("cat", "dog"), ("dog",), ("beach", "dog"), ("beach",), ("beach", "cat")] * 2
    for i in range(len(sets)):
        synthetic_image((40 * (i % 6), 90, 200), seed=i).save(root / "images" / f"{i:02d}.png")
    labels = root / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"images/{i:02d}.png,{';'.join(s)}\n" for i, s in enumerate(sets)))
    cache = root / "cache"
    assert main(["features", "--labels", str(labels), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    run = train_head_split(cache, root / "runs", "--labels", str(labels))
    parquet = dump_features(None, cache, root / "f.parquet", labels=labels)
    assert parquet.columns == ["path", "labels", "split", "content_hash", "features"]
    assert pq.read_schema(parquet.out).field("labels").type == pa.list_(pa.string())
    frame = pd.read_parquet(parquet.out)
    assert {p: tuple(v) for p, v in zip(frame["path"], frame["labels"])} == {
        f"images/{i:02d}.png": tuple(sorted(s)) for i, s in enumerate(sets)
    }
    assert {p: s for p, (_, s) in read_split_csv(run).items()} == dict(zip(frame["path"], frame["split"]))
    dump_features(None, cache, root / "f.npz", labels=labels)
    with np.load(root / "f.npz", allow_pickle=False) as arrays:
        assert arrays["labels"].tolist() == [";".join(v) for v in frame["labels"]]


def test_unlabelled_images_get_an_empty_label_and_no_split(tmp_path):
    data, cache = tmp_path / "plain", tmp_path / "cache"
    data.mkdir()
    for i in range(4):
        synthetic_image((30, 60 * i, 90), seed=i).save(data / f"{i}.png")
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert dump("--data", str(data), "--cache", str(cache), "--out", str(tmp_path / "f.parquet")) == 0
    frame = pd.read_parquet(tmp_path / "f.parquet")
    assert sorted(frame["path"]) == ["0.png", "1.png", "2.png", "3.png"]
    assert set(frame["label"]) == {""} and frame["split"].isna().all()
    assert dump("--data", str(data), "--cache", str(cache), "--out", str(tmp_path / "f.npz")) == 0
    with np.load(tmp_path / "f.npz", allow_pickle=False) as arrays:
        assert set(arrays["split"].tolist()) == {""} and arrays["features"].shape == (4, 192)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bottleneck: error: ") and "Traceback" not in err, err
    return err


def test_bad_out_and_missing_cache_are_one_line_each_exit_2(pixels_extracted, tmp_path, capsys):
    data, cache = pixels_extracted
    base = ["--data", str(data), "--cache", str(cache)]
    tmp_path = tmp_path / "outs"
    tmp_path.mkdir()
    assert dump(*base, "--out", str(tmp_path / "f.csv")) == 2
    assert "must end in .parquet or .npz" in one_line_error(capsys)
    (tmp_path / "folder.parquet").mkdir()
    assert dump(*base, "--out", str(tmp_path / "folder.parquet")) == 2
    assert "is a folder" in one_line_error(capsys)
    os.symlink(tmp_path / "elsewhere.parquet", tmp_path / "link.parquet")
    assert dump(*base, "--out", str(tmp_path / "link.parquet")) == 2
    assert "not a regular file" in one_line_error(capsys)
    (tmp_path / "file").write_text("")
    assert dump(*base, "--out", str(tmp_path / "file" / "f.parquet")) == 2
    assert "cannot use --out" in one_line_error(capsys)  # a file where a folder should be
    (tmp_path / "file").unlink()
    assert dump("--data", str(data), "--cache", str(tmp_path / "no-cache"), "--out", str(tmp_path / "f.parquet")) == 2
    assert "no feature cache in" in one_line_error(capsys)
    assert dump("--cache", str(cache), "--out", str(tmp_path / "f.parquet")) == 2
    assert "give DATA" in one_line_error(capsys)
    assert not (tmp_path / "f.parquet").exists() and not (tmp_path / "elsewhere.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.parquet", "link.parquet"]
