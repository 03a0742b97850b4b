"""The store grows by segments: new rows written once, old ones never again; one virtual index for readers."""

from __future__ import annotations

import errno
import json
import os

import h5py
import numpy as np
import pytest

from bottleneck import fs
from bottleneck.cli import main
from bottleneck.errors import CacheError
from bottleneck.features import store as store_module
from bottleneck.features.maintenance import collect_garbage, compact, stores_in
from bottleneck.features.store import Failure, FeatureStore
from bottleneck.features.store import write as store_write

DIM = 16


def make_store(tmp_path, dtype=None, dim=DIM) -> FeatureStore:
    return FeatureStore(
        tmp_path, "fp", dim, {"architecture": "test", "pretrained": True, "feature_dim": dim}, dtype=dtype
    )


def rows(n: int, start: int = 0, dim: int = DIM):
    hashes = [f"{i:064x}" for i in range(start, start + n)]
    rng = np.random.default_rng(start)
    return hashes, rng.normal(size=(n, dim)).astype(np.float32), [f"/data/{i}.png" for i in range(start, start + n)]


def add(store: FeatureStore, n: int, start: int, batch: int = 50) -> bool:
    hashes, features, paths = rows(n, start, store.feature_dim)
    with store.writer() as writer:
        for at in range(0, n, batch):
            writer.commit(hashes[at : at + batch], features[at : at + batch], paths[at : at + batch])
        return writer.finish()


def plain_read(store: FeatureStore) -> tuple[list[str], np.ndarray]:
    with h5py.File(store.path, "r") as handle:  # what a user without bottleneck does
        return [h.decode() for h in handle["content_hash"][()]], handle["features"][()]


def test_adding_rows_writes_a_new_segment_and_never_touches_the_old(tmp_path, monkeypatch):
    monkeypatch.setattr(store_write, "SMALL_SEGMENT_BYTES", 0)  # every segment counts as large: no merging
    store = make_store(tmp_path)
    add(store, 400, 0)
    [first] = store.segment_files()
    before = (first.stat().st_ino, first.stat().st_mtime_ns, first.stat().st_size)
    add(store, 10, 400)
    segments = store.segment_files()
    assert len(segments) == 2 and first in segments
    assert (first.stat().st_ino, first.stat().st_mtime_ns, first.stat().st_size) == before
    new = next(p for p in segments if p != first)
    assert new.stat().st_size < before[2] / 4  # about what is new (HDF5's own overhead is a few KB)
    assert store.path.stat().st_size < 20_000  # the index holds mappings, not rows
    hashes, features = plain_read(store)
    assert hashes == [*rows(400, 0)[0], *rows(10, 400)[0]]
    np.testing.assert_array_equal(features, np.concatenate([rows(400, 0)[1], rows(10, 400)[1]]))
    np.testing.assert_array_equal(store.load().features, features)


def test_an_unchanged_rerun_writes_nothing(tmp_path):
    store = make_store(tmp_path)
    add(store, 30, 0)
    stamps = {p: p.stat().st_mtime_ns for p in store.files() if p != store.lock_path}
    with store.writer() as writer:
        assert not writer.finish()
    assert {p: p.stat().st_mtime_ns for p in store.files() if p != store.lock_path} == stamps


def test_small_segments_merge_like_a_binary_counter(tmp_path):
    store = make_store(tmp_path)
    for i in range(32):
        add(store, 1, i)
        assert len(store.segment_files()) <= 1 + int(np.log2(i + 1)), i
    hashes, features = plain_read(store)
    assert hashes == [rows(1, i)[0][0] for i in range(32)]
    np.testing.assert_array_equal(features, np.concatenate([rows(1, i)[1] for i in range(32)]))


def test_a_kill_between_segment_and_index_loses_nothing(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    add(store, 20, 0)
    real_write = store_module.StoreWriter._write_index

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the new segment was renamed into place

    monkeypatch.setattr(store_module.StoreWriter, "_write_index", die)
    with pytest.raises(KeyboardInterrupt):
        add(store, 20, 20)
    monkeypatch.setattr(store_module.StoreWriter, "_write_index", real_write)
    assert store.load().content_hash == rows(40, 0)[0][:20] + rows(20, 20)[0]  # segment + parts read as they are
    with store.writer() as writer:
        assert writer.known_hashes == set(rows(40, 0)[0][:20] + rows(20, 20)[0])
        assert writer.finish()
    assert store.part_files() == [] and plain_read(store)[0] == rows(20, 0)[0] + rows(20, 20)[0]
    assert collect_garbage(tmp_path)[0] == []  # the merge's leftovers are gone


def test_a_segment_written_by_a_shard_is_adopted_without_a_copy(tmp_path):
    store = make_store(tmp_path)
    add(store, 10, 0)
    shard = store.write_segment("shard-a", *rows(5, 10), failures=[Failure("/data/bad.png", "e" * 64, "truncated")])
    inode = shard.stat().st_ino
    assert store.write_segment("shard-a", *rows(5, 10)) == shard  # a retried shard finds its segment
    assert store.index().content_hash == rows(15, 0)[0][:10] + rows(5, 10)[0]
    with store.writer() as writer:
        assert writer.finish()
    assert shard.exists() and shard.stat().st_ino == inode
    assert plain_read(store)[0] == rows(10, 0)[0] + rows(5, 10)[0]
    assert [f.reason for f in store.load().failures] == ["truncated"]


def test_a_missing_segment_is_dropped_from_the_index(tmp_path, monkeypatch):
    monkeypatch.setattr(store_write, "SMALL_SEGMENT_BYTES", 0)
    store = make_store(tmp_path)
    add(store, 10, 0)
    add(store, 10, 10)
    first = store.segment_files()[0]
    first.unlink()  # deleted by hand: its rows will be computed again
    assert store.load().content_hash == rows(10, 10)[0]
    with store.writer() as writer:
        assert writer.finish()
    assert plain_read(store)[0] == rows(10, 10)[0]


def test_a_format_1_store_becomes_the_first_segment(tmp_path):
    store = make_store(tmp_path)
    hashes, features, paths = rows(8, 0)
    with h5py.File(store.path, "w") as handle:  # as bottleneck 0.1 wrote it
        handle["features"] = features
        handle["content_hash"] = np.array(hashes, dtype="S64")
        handle.create_dataset("source_path", data=np.array(paths, dtype=object), dtype=h5py.string_dtype())
        handle.attrs.update({"fingerprint": "fp", "feature_dim": DIM, "format_version": 1})
    assert store.load().content_hash == hashes
    add(store, 4, 8)
    assert plain_read(store)[0] == hashes + rows(4, 8)[0]
    np.testing.assert_array_equal(store.load().features[:8], features)
    assert store.summary()["format"] == 2


def test_float16_halves_the_size_and_reads_as_float32(tmp_path):
    wide, narrow = make_store(tmp_path / "a", dim=512), make_store(tmp_path / "b", dtype="float16", dim=512)
    add(wide, 300, 0)
    add(narrow, 300, 0)
    assert narrow.summary()["bytes"] < 0.6 * wide.summary()["bytes"]
    loaded = narrow.load().features
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, rows(300, 0, 512)[1], rtol=1e-3, atol=1e-3)
    with h5py.File(narrow.path, "r") as handle:
        assert handle["features"].dtype == np.float16
    with pytest.raises(CacheError, match="keeps its features as float32, not float16.*cache compact --dtype float16"):
        with make_store(tmp_path / "a", dtype="float16", dim=512).writer():
            pass
    changed, before, after = compact(make_store(tmp_path / "a", dim=512), dtype="float16")
    assert changed and after < 0.6 * before
    assert make_store(tmp_path / "a", dim=512).stored_dtype() == "float16"


def test_compact_rewrites_every_segment_into_one(tmp_path, monkeypatch):
    monkeypatch.setattr(store_write, "SMALL_SEGMENT_BYTES", 0)
    store = make_store(tmp_path)
    for i in range(4):
        add(store, 5, 5 * i)
    assert len(store.segment_files()) == 4
    changed, _, _ = compact(store)
    assert changed and len(store.segment_files()) == 1
    assert plain_read(store)[0] == rows(20, 0)[0]
    assert compact(store)[0] is False


def test_cache_commands(tmp_path, capsys):
    cache = tmp_path / "cache"
    store = make_store(cache)
    add(store, 12, 0)
    (cache / ".fp.h5.123.tmp").write_bytes(b"left by a killed run")
    assert main(["cache", "info", "--cache", str(cache), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stores"]
    assert [(s["fingerprint"], s["rows"], s["segments"], s["architecture"]) for s in listed] == [("fp", 12, 1, "test")]
    assert main(["cache", "gc", "--cache", str(cache)]) == 0
    assert "would remove" in capsys.readouterr().out and (cache / ".fp.h5.123.tmp").exists()  # a dry run
    runs = tmp_path / "runs" / "r1"
    runs.mkdir(parents=True)
    (runs / "config.json").write_text(json.dumps({"fingerprint": "other"}))
    assert main(["cache", "gc", "--cache", str(cache), "--runs", str(tmp_path / "runs"), "--delete", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["deleted"] and not store.path.exists() and not store.segments_dir.exists()
    assert not (cache / ".fp.h5.123.tmp").exists()
    assert main(["cache", "compact", "--cache", str(cache), "nope"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"bottleneck: error: no feature store 'nope' in {cache} (`bottleneck cache info --cache {cache}` lists them)"
    )


def test_gc_leaves_a_store_being_written_alone(tmp_path):
    store = make_store(tmp_path)
    add(store, 3, 0)
    with store.writer():
        garbage, busy = collect_garbage(tmp_path)
    assert busy == ["fp"] and garbage == []
    assert [s.fingerprint for s in stores_in(tmp_path)] == ["fp"]


def test_a_file_system_without_locks_is_one_clear_line(tmp_path, monkeypatch):
    def no_locks(handle, flags):
        raise OSError(errno.ENOLCK, "No locks available")  # what flock says on some network file systems

    monkeypatch.setattr(fs.fcntl, "flock", no_locks)
    with pytest.raises(CacheError, match="does not support file locking.*local disk"):
        with make_store(tmp_path).writer():
            pass


def test_hdf5_refusing_to_lock_is_one_clear_line(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    add(store, 3, 0)
    real_file = fs.h5py.File

    def refuse_on_disk(name, *args, **kwargs):
        if isinstance(name, (str, os.PathLike)):
            raise OSError(
                "Unable to synchronously open file (unable to lock file, errno = 37, error message = 'No locks available')"
            )
        return real_file(name, *args, **kwargs)

    monkeypatch.setattr(fs.h5py, "File", refuse_on_disk)
    with pytest.raises(CacheError, match="does not support file locking, which HDF5 uses.*HDF5_USE_FILE_LOCKING=FALSE"):
        store.load()
    # a segment is built in memory and written with a plain write: HDF5 takes no lock on disk
    assert store.write_segment("x", *rows(2, 10)).is_file()


def test_a_store_damaged_inside_is_one_clear_line_and_a_damaged_part_is_skipped(tmp_path):
    store = make_store(tmp_path)
    add(store, 5, 0)
    store.parts_dir.mkdir()
    with h5py.File(store.parts_dir / "part-x.h5", "w") as handle:
        handle["content_hash"] = np.array(rows(2, 5)[0], dtype="S64")  # cut short: no features
    assert store.load().content_hash == rows(5, 0)[0]
    [segment] = store.segment_files()
    with h5py.File(segment, "a") as handle:
        del handle["features"]
    with pytest.raises(
        CacheError,
        match=r"^the feature store fp.h5 is damaged \(seg-.*features.*\); delete fp.h5 and fp.segments/ to rebuild it$",
    ):
        store.load()
    with h5py.File(store.path, "a") as handle:
        del handle["segments/name"]
    with pytest.raises(CacheError, match="^the index fp.h5 is damaged"):
        store.index()


def test_features_dtype_float16_end_to_end(tmp_path, capsys):
    from tests.conftest import make_dataset

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=3)
    flags = ["--cache", str(cache), "--backbone", "pixels", "--image-size", "16", "--no-progress"]
    assert main(["features", str(data), *flags, "--dtype", "float16", "--json"]) == 0
    [index] = cache.glob("*.h5")
    with h5py.File(index, "r") as handle:
        assert handle["features"].dtype == np.float16 and handle.attrs["dtype"] == "float16"
    capsys.readouterr()
    assert main(["features", str(data), *flags, "--dtype", "float32"]) == 2
    assert "keeps its features as float16, not float32" in capsys.readouterr().err
    assert main(["features", str(data), *flags]) == 0  # no --dtype: the store's own
    runs = tmp_path / "runs"
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(runs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]["train"] == 1.0


def test_a_snapshot_keeps_reading_the_right_rows_while_a_writer_merges(tmp_path):
    store = make_store(tmp_path)
    add(store, 6, 0)
    add(store, 3, 6)  # small: merges with the first segment, which is deleted
    snapshot = store.snapshot()
    want = np.concatenate([rows(6, 0)[1], rows(3, 6)[1]])
    np.testing.assert_array_equal(snapshot.read_rows_at([8, 0]), want[[8, 0]])
    np.testing.assert_array_equal(snapshot.read_rows_at(np.arange(2, 9)), want[2:9])  # a chunk in store order
    add(store, 20, 9)  # merges every small segment into a new one: the snapshot's files are gone
    assert not any(p.exists() for p in (s.path for s in snapshot._plan.sources))
    np.testing.assert_array_equal(snapshot.read_rows_at([8, 0, 3]), want[[8, 0, 3]])
    assert snapshot.rows == 9
