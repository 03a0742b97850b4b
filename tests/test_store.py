"""The HDF5 store: atomic parts, merging, de-duplication, crash leftovers, the lock."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bottleneck import fs
from bottleneck.errors import CacheError
from bottleneck.features.store import Failure, FeatureStore

DIM = 8


def make_store(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path, "test-fp", DIM, {"architecture": "test", "pretrained": False})


def rows(n: int, start: int = 0) -> tuple[list[str], np.ndarray, list[str]]:
    hashes = [f"{i:064x}" for i in range(start, start + n)]
    features = np.arange(start * DIM, (start + n) * DIM, dtype=np.float32).reshape(n, DIM)
    return hashes, features, [f"/data/{i}.png" for i in range(start, start + n)]


def test_commit_then_finish_gives_one_plain_h5_file(tmp_path):
    store = make_store(tmp_path)
    with store.writer() as writer:
        writer.commit(*rows(3))
        writer.add_failure(Failure("/data/bad.jpg", "f" * 64, "truncated image"))
        writer.commit(*rows(2, start=3))
        assert len(store.part_files()) == 2
        assert writer.finish()
    assert store.part_files() == [] and not store.parts_dir.exists()
    with h5py.File(store.path, "r") as handle:  # readable without bottleneck
        assert handle["features"].shape == (5, DIM) and handle["features"].dtype == np.float32
        assert handle["content_hash"][0].decode() == rows(1)[0][0]
        assert handle["failures/reason"].asstr()[0] == "truncated image"
        assert handle.attrs["fingerprint"] == "test-fp" and not handle.attrs["pretrained"]
    np.testing.assert_array_equal(store.load().features, rows(5)[1])


def test_parts_are_visible_before_the_merge_and_duplicates_collapse(tmp_path):
    store = make_store(tmp_path)
    with store.writer() as writer:
        writer.commit(*rows(3))
        writer.finish()
    with store.writer() as writer:
        assert writer.known_hashes == set(rows(3)[0])
        writer.commit(*rows(3, start=2))  # row 2 is already in the store
        loaded = store.load()  # a killed run stops here: store file + parts
        assert len(loaded.content_hash) == 5
        writer.finish()
    loaded = store.load()
    assert loaded.content_hash == rows(5)[0]
    np.testing.assert_array_equal(loaded.features, rows(5)[1])


def test_rerun_with_nothing_new_rewrites_nothing(tmp_path):
    store = make_store(tmp_path)
    with store.writer() as writer:
        writer.commit(*rows(2))
        writer.finish()
    before = store.path.stat().st_mtime_ns
    with store.writer() as writer:
        assert not writer.finish()
    assert store.path.stat().st_mtime_ns == before


def test_death_during_merge_leaves_the_old_store_and_the_parts(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    with store.writer() as writer:
        writer.commit(*rows(2))
        writer.finish()
    real_replace = fs.os.replace

    def die_before_rename(src, dst):
        raise KeyboardInterrupt  # as if killed with the temporary file fully written

    with store.writer() as writer:
        writer.commit(*rows(2, start=2))
        monkeypatch.setattr(fs.os, "replace", die_before_rename)
        with pytest.raises(KeyboardInterrupt):
            writer.finish()
    monkeypatch.setattr(fs.os, "replace", real_replace)
    (tmp_path / ".test-fp.h5.999.tmp").write_bytes(b"half-written by a killed run")
    assert len(store.load().content_hash) == 4
    with store.writer() as writer:
        writer.finish()
    assert list(tmp_path.glob(".*.tmp")) == []
    assert store.load().content_hash == rows(4)[0]


def test_a_damaged_part_is_dropped_and_recomputed(tmp_path):
    store = make_store(tmp_path)
    with store.writer() as writer:
        writer.commit(*rows(2))
    store.part_files()[0].write_bytes(b"garbage")
    with store.writer() as writer:
        assert writer.known_hashes == set()
    assert store.part_files() == []


def test_second_writer_waits_then_refuses_clearly(tmp_path):
    store = make_store(tmp_path)
    waits = []
    with store.writer():
        with pytest.raises(CacheError) as caught:
            with store.writer(lock_timeout=0.3, on_wait=waits.append):
                pass
    assert str(caught.value).startswith("another bottleneck run (pid ")
    assert "pass --lock-timeout SECONDS to wait" in str(caught.value)
    assert len(waits) == 1 and waits[0].startswith("waiting for another bottleneck run")
    with store.writer(lock_timeout=0):  # released
        pass


def test_corrupt_store_file_is_a_clear_error(tmp_path):
    store = make_store(tmp_path)
    store.path.write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="cannot read feature store .* delete it to rebuild"):
        store.load()


def test_a_reader_survives_a_merge_under_it(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    with store.writer() as writer:
        writer.commit(*rows(2))
        writer.commit(*rows(2, start=2))
        listed = store.part_files()
        writer.finish()  # the parts are merged and removed
    listings = iter([listed])  # the first listing is stale (taken before the merge), later ones are empty

    monkeypatch.setattr(FeatureStore, "part_files", lambda self: next(listings, []))
    assert store.load().content_hash == rows(4)[0]
