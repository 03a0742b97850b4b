"""Webdataset tar shards as DATA: members read in place, labels from their samples, end to end."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.features import shards as shards_module
from bottleneck.features.discover import discover_images
from bottleneck.features.extract import extract_features
from bottleneck.features.shards import UNSAFE_NAME, expand_pattern, list_shard, member_of, sample_key

from .conftest import COLOURS, PIXELS, image_bytes, synthetic_image


def add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def write_shards(folder: Path, per_shard: int, shards: int, label_ext: str = ".cls", start: int = 0) -> list[Path]:
    """`shards` tar files of `per_shard` PNG samples, cycling through the classes; labels in `label_ext` members."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    classes = list(COLOURS.items())
    for s in range(shards):
        path = folder / f"train-{s:03d}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(per_shard):
                number = start + s * per_shard + i
                label, colour = classes[number % len(classes)]
                key = f"sample{number:05d}"
                add_member(archive, f"{key}.png", image_bytes(synthetic_image(colour, seed=number), "PNG"))
                payload = {".cls": label, ".txt": label, ".json": json.dumps({"label": label, "caption": "x"})}[
                    label_ext
                ]
                add_member(archive, key + label_ext, payload.encode())
        paths.append(path)
    return paths


def only_run(runs: Path) -> Path:
    [run] = [p for p in runs.iterdir() if not p.name.startswith(".")]
    return run


def test_sample_keys_and_brace_patterns(tmp_path):
    assert sample_key("a/b.seg.JPG") == ("a/b", ".seg.jpg") and sample_key("x.cls") == ("x", ".cls")
    assert [p.name for p in expand_pattern(str(tmp_path / "s-{08..11}.tar"))] == [
        "s-08.tar",
        "s-09.tar",
        "s-10.tar",
        "s-11.tar",
    ]
    assert [p.name for p in expand_pattern("a{1..2}-{0..1}.tar")] == ["a1-0.tar", "a1-1.tar", "a2-0.tar", "a2-1.tar"]


@pytest.mark.parametrize("label_ext", [".cls", ".txt", ".json"])
def test_labels_come_from_the_samples_label_member(tmp_path, label_ext):
    write_shards(tmp_path / "data", per_shard=6, shards=2, label_ext=label_ext)
    found = discover_images(tmp_path / "data")
    assert found.layout == "shards" and len(found.images) == 12 and found.classes == sorted(COLOURS)
    assert found.layout_line().startswith("tar shards: 2 shards, 12 images in 3 classes")
    first = found.images[0]
    assert first.relpath == "train-000.tar/sample00000.png" and first.label == "red"
    assert first.container == str(tmp_path / "data" / "train-000.tar")


@pytest.mark.slow
def test_shards_end_to_end_features_train_predict_report(tmp_path, capsys):
    files, data = tmp_path / "files", tmp_path / "shards"
    write_shards(data, per_shard=12, shards=3)
    for number in range(6):  # some of the same pictures as plain files, extracted first
        label, colour = list(COLOURS.items())[number % 3]
        (files / label).mkdir(parents=True, exist_ok=True)
        (files / label / f"{number}.png").write_bytes(image_bytes(synthetic_image(colour, seed=number), "PNG"))
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    assert main(["features", str(files), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress", "--json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert first["images"] == 36 and first["failed"] == 0
    # Content keys are the image bytes' SHA-256: the pictures already extracted from files are not computed again.
    assert first["reused"] == 6 and first["computed"] == 30
    # An unchanged rerun settles every member from the hash index without reading one image byte.
    assert (
        main(["features", f"{data}/train-{{000..002}}.tar", "--cache", str(cache), *PIXELS, "--no-progress", "--json"])
        == 0
    )
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (again["computed"], again["reused"]) == (0, 36)
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(runs)]) == 0
    assert "tar shards: 3 shards, 36 images in 3 classes" in capsys.readouterr().err
    run = only_run(runs)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["splits"]["test"]["accuracy"] == 1.0
    split = (run / "split.csv").read_text()
    assert "train-001.tar/sample00012.png" in split
    # predict takes a shard, a member inside one and a pattern
    member = data / "train-002.tar" / "sample00025.png"
    assert main(["predict", "--run", str(run), str(data / "train-000.tar"), str(member), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 13 and rows[-1]["path"] == str(member) and rows[-1]["top"][0]["label"] == "green"
    assert all(row["top"][0]["label"] == list(COLOURS)[int(row["path"][-9:-4]) % 3] for row in rows)
    # the report's thumbnails read members like files
    from bottleneck.inspect.report import thumbnail_uri

    assert thumbnail_uri(member).startswith("data:image/jpeg;base64,")
    assert main(["report", "--runs", str(runs), "--out", str(tmp_path / "report.html")]) == 0
    # export's parity check reads the test members out of their shards, as predict does
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    parity = json.loads((tmp_path / "export" / "export.json").read_text())["parity"]["saved_model"]["as given"]
    assert parity["images"] >= 3 and parity["max_abs_diff"] < 1e-4


def test_a_changed_shard_is_read_again_and_an_unchanged_one_never(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    [shard] = write_shards(data, per_shard=6, shards=1)
    spec = BackboneSpec(architecture="pixels", image_size=8)
    assert extract_features(data, cache, spec).computed == 6

    def no_reading(*args):
        raise AssertionError("an unchanged shard's members were read")

    monkeypatch.setattr(shards_module, "read_member", no_reading)
    assert extract_features(data, cache, spec).reused == 6
    monkeypatch.undo()
    with tarfile.open(
        shard, "a"
    ) as archive:  # one more sample: the shard's mtime changes, its members are hashed again
        add_member(archive, "extra.png", image_bytes(synthetic_image((9, 9, 9), seed=99), "PNG"))
        add_member(archive, "extra.cls", b"red")
    os.utime(shard, ns=(1, 10**18))
    result = extract_features(data, cache, spec)
    assert (result.computed, result.reused, result.images) == (1, 6, 7)


def test_bad_shards_and_members_are_one_line_each_and_the_rest_goes_on(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_shards(data, per_shard=6, shards=2)
    with tarfile.open(data / "train-001.tar", "a") as archive:
        add_member(archive, "broken.png", b"not a png at all")
        add_member(archive, "broken.cls", b"red")
        add_member(archive, "notes.bin", b"\0" * 10)
    whole = (data / "train-000.tar").read_bytes()
    (data / "train-002.tar").write_bytes(whole[: len(whole) // 2])  # cut short in the middle of a member
    (data / "train-003.tar").write_bytes(b"\x1f\x8b" + os.urandom(2000))  # not a plain tar
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    kept = len(list_shard(data / "train-002.tar").members)
    assert 0 < kept < 6
    assert (result["images"], result["failed"]) == (6 + 7 + kept, 1)
    assert "shard train-002.tar: cut short" in captured.err and "shard train-003.tar: not a plain tar" in captured.err
    assert "Traceback" not in captured.err
    # every shard unusable: one line, exit 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.tar").write_bytes(os.urandom(3000))
    assert main(["features", str(bad), "--cache", str(cache), *PIXELS, "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"bottleneck: error: no images found in the 1 shards of {bad}")
    assert main(["features", f"{data}/train-{{000..009}}.tar", "--cache", str(cache), *PIXELS]) == 2
    assert "6 of the 10 shards" in capsys.readouterr().err


def test_a_member_path_never_reads_outside_its_member(tmp_path, monkeypatch):
    data = tmp_path / "data"
    [shard] = write_shards(data, per_shard=3, shards=1)
    assert member_of(shard / "sample00001.png").size > 0
    assert member_of(shard / "sample00001.cls") is None  # labels are not images
    assert member_of(shard / "missing.png") is None and member_of(tmp_path / "x.tar" / "a.png") is None
    from bottleneck.features.decode import UnreadableImage, read_image_file

    with pytest.raises(UnreadableImage, match="nor a member of a tar shard"):
        read_image_file(shard / "missing.png")
    data_bytes, stamp = read_image_file(shard / "sample00001.png")
    assert data_bytes.startswith(b"\x89PNG") and stamp[0] == len(data_bytes)
    from bottleneck.features import decode

    monkeypatch.setattr(decode, "FILE_SLACK_BYTES", 0)  # a limit of 8 bytes: the member is refused unread
    monkeypatch.setattr(shards_module, "read_member", lambda *args: pytest.fail("read past the limit"))
    with pytest.raises(UnreadableImage, match="larger than any image"):
        read_image_file(shard / "sample00001.png", max_pixels=1)


def test_unlabelled_shards_serve_features_but_not_a_head(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "a.tar", "w") as archive:
        for i in range(4):
            add_member(archive, f"{i}.png", image_bytes(synthetic_image((200, 10, 10), seed=i), "PNG"))
    cache = tmp_path / "cache"
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert "4 images" in capsys.readouterr().out
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(tmp_path / "r")]) == 2
    assert "holds images but no labels" in capsys.readouterr().err


def write_parquet(
    path: Path,
    count: int,
    struct: bool = True,
    extra_bytes_column: bool = False,
    empty_rows: tuple[int, ...] = (),
    row_group_size: int = 7,
) -> None:
    """A Hugging Face style Parquet file: an image column ({bytes, path} structs or plain bytes), a ClassLabel."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(COLOURS)
    cells, labels = [], []
    for number in range(count):
        data = image_bytes(synthetic_image(COLOURS[names[number % 3]], seed=number), "PNG")
        data = None if number in empty_rows else data
        cells.append({"bytes": data, "path": f"{number}.png"} if struct else data)
        labels.append(number % 3)
    columns = {"image": pa.array(cells), "label": pa.array(labels)}
    if extra_bytes_column:
        columns["thumb"] = pa.array([b"x"] * count)
    meta = {
        b"huggingface": json.dumps({"info": {"features": {"label": {"names": names, "_type": "ClassLabel"}}}}).encode()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns).replace_schema_metadata(meta), path, row_group_size=row_group_size)


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_image_bytes_end_to_end(tmp_path, capsys, struct):
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    write_parquet(data / "train-0.parquet", 24, struct=struct)
    write_parquet(data / "train-1.parquet", 12, struct=struct)  # the same first 12 images: content keys match
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert (result["images"], result["computed"], result["reused"], result["failed"]) == (36, 24, 12, 0)
    assert "Parquet files: 2 files, 36 images in 3 classes (labels from the label column)" in captured.err
    assert (
        main(
            ["train-head", "--data", str(data / "train-0.parquet"), "--cache", str(cache), *PIXELS, "--runs", str(runs)]
        )
        == 0
    )
    capsys.readouterr()
    run = only_run(runs)
    config = json.loads((run / "config.json").read_text())
    assert config["layout"] == "shards" and "train-0.parquet/image/5" in (run / "split.csv").read_text()
    assert json.loads((run / "metrics.json").read_text())["splits"]["test"]["accuracy"] == 1.0
    assert main(["predict", "--run", str(run), str(data / "train-1.parquet" / "image" / "4"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top"][0]["label"] == "green"
    from bottleneck.inspect.report import thumbnail_uri

    assert thumbnail_uri(data / "train-1.parquet" / "image" / "4").startswith("data:image/jpeg;base64,")


def test_parquet_columns_named_or_refused_in_one_line(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_parquet(data / "a.parquet", 9, extra_bytes_column=True, empty_rows=(4,))
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 2
    assert (
        "needs one column of image bytes and has several (image, thumb): name it with --image-column"
        in capsys.readouterr().err
    )
    assert (
        main(
            [
                "features",
                str(data),
                "--cache",
                str(cache),
                *PIXELS,
                "--no-progress",
                "--json",
                "--image-column",
                "image",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert (result["images"], result["computed"], result["failed"]) == (9, 8, 1)  # the empty cell: one failure
    assert "row 4 of column 'image' is empty" in captured.out + captured.err
    for flags, expected in (
        (["--image-column", "label"], "column 'label' holds int64, not image bytes"),
        (["--image-column", "nope"], "no column 'nope'"),
        (["--image-column", "image", "--label-column", "image"], "not labels"),
    ):
        assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress", *flags]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    (data / "b.parquet").write_bytes((data / "a.parquet").read_bytes()[:300])  # cut short: one line, the rest goes on
    assert (
        main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress", "--image-column", "image"]) == 0
    )
    assert "shard b.parquet: not a readable Parquet file" in capsys.readouterr().err


def test_hostile_member_names_and_links_are_read_in_place_never_followed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(image_bytes(synthetic_image((1, 2, 3), seed=7), "PNG"))
    with tarfile.open(data / "a.tar", "w") as archive:
        for name in ("../escape.png", "/abs/root.png", "x.tar/inner.png"):
            add_member(archive, name, image_bytes(synthetic_image((200, 0, 0), seed=len(name)), "PNG"))
            add_member(archive, name.rsplit(".", 1)[0] + ".cls", b"red")
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, str(secret)
        archive.addfile(link)
        add_member(archive, "b.png", image_bytes(synthetic_image((0, 0, 200), seed=1), "PNG"))
        add_member(archive, "b.cls", b"blue")
    found = discover_images(data)
    assert sorted(image.relpath for image in found.images) == ["a.tar/b.png", "a.tar/x.tar/inner.png"]
    assert found.skipped["not a regular member (a link or device)"] == 1
    assert found.skipped[UNSAFE_NAME] == 4  # 2 images, 2 labels: such paths leave the shard
    from bottleneck.features.decode import read_image_file

    for image in found.images:  # every one is read from inside the shard, nothing outside it
        data_bytes, _ = read_image_file(image.path)
        assert data_bytes.startswith(b"\x89PNG")
    assert not (tmp_path / "escape.png").exists()


def test_an_unchanged_shard_is_listed_once_for_good(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    [shard] = write_shards(data, per_shard=4, shards=1)
    write_parquet(data / "p.parquet", 5)
    spec = BackboneSpec(architecture="pixels", image_size=8)
    assert extract_features(data, cache, spec).computed == 5  # the Parquet file's first 4 images are the tar's
    shards_module._LISTED.clear()  # a new process: nothing listed in memory
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("an unchanged shard was listed again"))
    monkeypatch.setattr(
        shards_module, "_parquet_listing", lambda *a: pytest.fail("an unchanged Parquet file was listed again")
    )
    monkeypatch.setattr(shards_module, "read_member", lambda *a: pytest.fail("a member was read"))
    again = extract_features(data, cache, spec)
    assert (again.computed, again.reused, again.images) == (0, 9, 9)
    monkeypatch.undo()
    os.utime(shard, ns=(1, 10**18))  # touched: listed (and its members hashed) again
    assert extract_features(data, cache, spec).reused == 9


def test_a_label_file_names_images_inside_shards(tmp_path, capsys):
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    write_shards(data, per_shard=9, shards=2)
    write_parquet(data / "more.parquet", 9)
    names = list(COLOURS)
    rows = ["path,label"] + [f"train-00{n // 9}.tar/sample{n:05d}.png,{names[n % 3]}" for n in range(18)]
    rows += [f"more.parquet/image/{n},{names[n % 3]}" for n in range(9)]
    rows += ["train-000.tar/nothere.png,red", "more.parquet/image/99,red"]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    assert (
        main(
            [
                "features",
                "--labels",
                str(data / "labels.csv"),
                "--cache",
                str(cache),
                *PIXELS,
                "--no-progress",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert (result["images"], result["failed"]) == (27, 0)
    assert (
        "2 rows of labels.csv left out: missing file (first: train-000.tar/nothere.png, more.parquet/image/99)"
        in captured.err
    )
    assert (
        main(["train-head", "--labels", str(data / "labels.csv"), "--cache", str(cache), *PIXELS, "--runs", str(runs)])
        == 0
    )
    run = only_run(runs)
    assert json.loads((run / "metrics.json").read_text())["splits"]["test"]["accuracy"] == 1.0
    assert "more.parquet/image/4" in (run / "split.csv").read_text()
