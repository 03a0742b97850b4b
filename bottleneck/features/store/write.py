"""The store's write path: `StoreWriter` (batches committed as atomic parts; `finish` turns them into a
segment, merges small segments and rebuilds the index; `compact`) and `MemoryWriter` (a cache that cannot
be written: rows kept in this process)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from bottleneck import naming
from bottleneck.errors import CacheError
from bottleneck.features.store.layout import (
    _HASH_DTYPE,
    COMPUTED_BY,
    SMALL_SEGMENT_BYTES,
    UNRECORDED,
    Failure,
    _as_stored,
    _Plan,
    _read_hashes,
    _runs,
    _Source,
    _string_array,
    _write_failures,
    _write_rows,
    add_counts,
)
from bottleneck.fs import fsync_dir, write_hdf5_atomically

if TYPE_CHECKING:
    from bottleneck.features.store.read import FeatureStore


def write_segment(
    store: FeatureStore,
    name: str,
    hashes: list[str],
    features: np.ndarray,
    paths: list[str],
    failures: Sequence[Failure] = (),
    dtype: str | None = None,
    computed_by: str = "",
) -> Path:
    """`FeatureStore.write_segment`: one segment of rows, atomically, without the store's lock."""
    target = store.segment_path(name)
    if target.exists():
        return target
    if features.shape != (len(hashes), store.feature_dim):
        raise CacheError(f"segment of shape {features.shape} does not fit a store of dimension {store.feature_dim}")
    dtype = dtype or store.dtype()
    store.segments_dir.mkdir(parents=True, exist_ok=True)

    def write(handle: h5py.File) -> None:
        _write_rows(handle, hashes, features, paths, dtype)
        _write_failures(handle, list(failures))
        handle.attrs["dtype"] = dtype
        if hashes:
            handle.attrs[COMPUTED_BY] = json.dumps({computed_by or UNRECORDED: len(hashes)})

    write_hdf5_atomically(target, write, features.nbytes)
    return target


class MemoryWriter:
    """A `StoreWriter` for a cache that cannot be written: what it computes stays in this process.

    It knows what the store holds, takes computed rows in memory and writes nothing; `read_rows`
    reads each row from memory or from the store.
    """

    def __init__(self, store: FeatureStore):
        self.store = store
        self.dtype = "float32"
        hashes, failures = store.known()
        self.known_hashes: set[str] = set(hashes)
        self.known_failures: dict[str, Failure] = {f.key: f for f in failures}
        self.rows: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # failures arrive from the main thread, commits from another

    def add_failure(self, failure: Failure) -> None:
        with self._lock:
            self.known_failures[failure.key] = failure

    def commit(self, hashes: list[str], features: np.ndarray, paths: list[str], computed_by: str = "") -> None:
        """Keep one batch in memory."""
        if features.shape != (len(hashes), self.store.feature_dim):
            raise CacheError(
                f"batch of shape {features.shape} does not fit a store of dimension {self.store.feature_dim}"
            )
        with self._lock:
            self.rows.update(zip(hashes, np.asarray(features, np.float32)))
            self.known_hashes.update(hashes)

    def finish(self, extra_attrs: dict | None = None) -> bool:
        """Nothing is written."""
        return False

    def read_rows(self, hashes: list[str]) -> np.ndarray:
        """Features of `hashes` in that order: computed here, or read from the store."""
        features = np.empty((len(hashes), self.store.feature_dim), np.float32)
        stored = [i for i, h in enumerate(hashes) if h not in self.rows]
        if stored:
            features[stored] = self.store.read_rows([hashes[i] for i in stored])
        for i, h in enumerate(hashes):
            if h in self.rows:
                features[i] = self.rows[h]
        return features


def _segment_bytes(source: _Source, feature_dim: int, itemsize: int) -> int:
    return int(source.keep.size) * feature_dim * itemsize


class StoreWriter:
    """Commits batches to a store as atomic parts; `finish` turns them into a segment and rebuilds the index."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self._remove_stale_temporaries()
        self._drop_unreadable_files()
        self.dtype = store.dtype()
        hashes, failures = store.known()
        self.known_hashes: set[str] = hashes
        self.known_failures: dict[str, Failure] = {f.key: f for f in failures}
        self._pending_failures: list[Failure] = []
        self._failures_lock = threading.Lock()  # failures arrive from the main thread, commits from another
        self._seq = 0

    def _remove_stale_temporaries(self) -> None:
        for folder in (self.store.cache_dir, self.store.parts_dir, self.store.segments_dir):
            if folder.is_dir():
                for tmp in folder.glob(naming.TEMPORARY_GLOB):
                    if tmp.name.startswith(naming.store_temporary_prefixes(self.store.fingerprint)):
                        tmp.unlink(missing_ok=True)

    def _drop_unreadable_files(self) -> None:
        """Parts and unindexed segments that cannot be read were cut short: their rows get recomputed."""
        _, named, _ = self.store._index_contents()
        indexed = {self.store.segments_dir / name for name in named}
        for path in self.store.part_files() + [p for p in self.store.segment_files() if p not in indexed]:
            try:
                with h5py.File(path, "r") as handle:
                    _read_hashes(handle)
                    handle["features"].shape  # noqa: B018 - reading it checks the dataset opens
            except (OSError, KeyError):
                path.unlink(missing_ok=True)

    def add_failure(self, failure: Failure) -> None:
        """Record a failure; it is committed with the next batch or at `finish`."""
        with self._failures_lock:
            self.known_failures[failure.key] = failure
            self._pending_failures.append(failure)

    def commit(self, hashes: list[str], features: np.ndarray, paths: list[str], computed_by: str = "") -> None:
        """Write one batch (and pending failures) as a part file, atomically; `computed_by` names the runtime."""
        if features.shape != (len(hashes), self.store.feature_dim):
            raise CacheError(
                f"batch of shape {features.shape} does not fit a store of dimension {self.store.feature_dim}"
            )
        self.store.parts_dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = naming.new_file_name("part", self._seq)
        with self._failures_lock:
            failures, self._pending_failures = self._pending_failures, []

        def write(handle: h5py.File) -> None:
            _write_rows(handle, hashes, features, paths, self.dtype)
            _write_failures(handle, failures)
            if hashes:
                handle.attrs[COMPUTED_BY] = json.dumps({computed_by or UNRECORDED: len(hashes)})

        try:
            write_hdf5_atomically(self.store.parts_dir / name, write, features.nbytes)
        except BaseException:
            with self._failures_lock:
                self._pending_failures[:0] = failures
            raise
        self.known_hashes.update(hashes)

    def finish(self, extra_attrs: dict | None = None) -> bool:
        """Bring parts and new segments into the index; return whether anything was written.

        The new rows of the parts become one new segment, merged with the small segments before it
        of similar size; older segments are never rewritten. An unchanged store writes nothing.
        """
        if self._pending_failures:
            self.commit([], np.zeros((0, self.store.feature_dim), np.float32), [])
        plan = self.store._plan(tolerate_missing=True)
        if plan.current:
            return False
        kept, consumed = self._choose_segments(plan)
        final = list(kept)
        if any(s.keep.size for s in consumed) or any(s.failures for s in consumed):
            final.append(self._write_merged_segment(consumed, plan))
        final = [self._legacy_as_segment(s) if s.kind == "legacy" else s for s in final]
        self._write_index(final, plan, extra_attrs or {})
        for source in consumed:
            if source.kind != "legacy":
                source.path.unlink(missing_ok=True)
        for folder in (self.store.parts_dir, self.store.segments_dir):
            with contextlib.suppress(OSError):
                folder.rmdir()
        return True

    def compact(self, dtype: str | None = None, extra_attrs: dict | None = None) -> bool:
        """Rewrite every row into one segment (optionally in another dtype); return whether anything changed."""
        plan = self.store._plan(tolerate_missing=True)
        segments = [s for s in plan.sources if s.keep.size or s.failures]
        if dtype is None or dtype == self.dtype:
            if plan.current and len(segments) == 1 and segments[0].keep.size == segments[0].rows:
                return False
        self.dtype = dtype or self.dtype
        merged = self._write_merged_segment(plan.sources, plan)
        self._write_index([merged], plan, dict(extra_attrs or {}, dtype=self.dtype))
        for source in plan.sources:
            if source.path != merged.path and source.path != self.store.path:
                source.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.store.parts_dir.rmdir()
        return True

    def _choose_segments(self, plan: _Plan) -> tuple[list[_Source], list[_Source]]:
        """Split the sources into segments kept as they are and sources rewritten into one new segment."""
        kept: list[_Source] = []
        consumed: list[_Source] = []
        for source in plan.sources:
            if source.kind == "part" or (source.kind == "segment" and not source.keep.size):
                consumed.append(source)
            else:
                kept.append(source)
        tail_rows = sum(int(s.keep.size) for s in consumed if s.kind == "part")
        itemsize = np.dtype(self.dtype).itemsize
        while (
            tail_rows
            and kept
            and kept[-1].kind == "segment"
            and kept[-1].keep.size == kept[-1].rows
            and _segment_bytes(kept[-1], self.store.feature_dim, itemsize) < SMALL_SEGMENT_BYTES
            and kept[-1].keep.size <= 2 * tail_rows
        ):
            merged = kept.pop()
            consumed.insert(0, merged)
            tail_rows += int(merged.keep.size)
        return kept, consumed

    def _write_merged_segment(self, sources: list[_Source], plan: _Plan) -> _Source:
        """One new segment holding the kept rows of `sources`, in order, and their failures."""
        ordered = [s for s in plan.sources if any(s is c for c in sources)]
        hashes = [h for s in ordered for h in s.hashes]
        paths: list[str] = []
        for source in ordered:
            if source.keep.size:
                with self.store._open(source.path) as handle:
                    file_paths = handle["source_path"].asstr()[()]
                paths.extend(str(file_paths[i]) for i in source.keep)
        by_key = {f.key: f for s in ordered for f in s.failures}
        failures = [f for f in by_key.values() if f.content_hash not in plan.seen]
        self._seq += 1
        path = self.store.segments_dir / naming.new_file_name("seg", self._seq)
        self.store.segments_dir.mkdir(parents=True, exist_ok=True)

        def write(handle: h5py.File) -> None:
            dataset = handle.create_dataset("features", shape=(len(hashes), self.store.feature_dim), dtype=self.dtype)
            row = 0
            for block in self.store._blocks(ordered):
                dataset[row : row + len(block)] = _as_stored(block, self.dtype)
                row += len(block)
            handle.create_dataset("content_hash", data=np.array(hashes, dtype=_HASH_DTYPE))
            handle.create_dataset("source_path", data=_string_array(paths), dtype=h5py.string_dtype())
            _write_failures(handle, failures)
            handle.attrs["dtype"] = self.dtype
            if hashes:
                handle.attrs[COMPUTED_BY] = json.dumps(computed_by)

        computed_by = add_counts(*(s.computed_by for s in ordered))
        write_hdf5_atomically(path, write, len(hashes) * self.store.feature_dim * np.dtype(self.dtype).itemsize)
        return _Source(
            path,
            "segment",
            len(hashes),
            np.arange(len(hashes), dtype=np.int64),
            hashes,
            failures,
            computed_by=computed_by,
        )

    def _legacy_as_segment(self, source: _Source) -> _Source:
        """A format-1 store file becomes the first segment: a hard link (no copy) where the disk allows."""
        target = self.store.segments_dir / naming.LEGACY_SEGMENT
        self.store.segments_dir.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            tmp = naming.temporary_path(target)
            try:
                os.link(source.path, tmp)
            except OSError:
                shutil.copyfile(source.path, tmp)
            os.replace(tmp, target)
            fsync_dir(self.store.segments_dir)
        return _Source(
            target, "segment", source.rows, source.keep, source.hashes, source.failures, computed_by=source.computed_by
        )

    def _write_index(self, segments: list[_Source], plan: _Plan, extra: dict) -> None:
        """The index: virtual `features` and `content_hash` over the segments' kept rows, atomically."""
        rows = sum(int(s.keep.size) for s in segments)
        dim = self.store.feature_dim
        hashes = plan.seen  # every content in the store: the segments hold exactly the plan's rows
        failures = {f.key: f for s in segments for f in s.failures}
        failures.update({f.key: f for f in plan.failures})
        attrs = self._merged_attrs(plan.attrs, extra)
        names: list[str] = []
        runs: list[tuple[int, int, int]] = []
        for number, source in enumerate(segments):
            names.append(source.path.name)
            runs.extend((number, start, count) for start, count in _runs(source.keep))

        def write(handle: h5py.File) -> None:
            if rows:
                features = h5py.VirtualLayout((rows, dim), dtype=self.dtype)
                content = h5py.VirtualLayout((rows,), dtype=_HASH_DTYPE)
                at = 0
                for number, start, count in runs:
                    source = segments[number]
                    relative = f"{self.store.segments_dir.name}/{source.path.name}"
                    features[at : at + count] = h5py.VirtualSource(relative, "features", shape=(source.rows, dim))[
                        start : start + count
                    ]
                    content[at : at + count] = h5py.VirtualSource(relative, "content_hash", shape=(source.rows,))[
                        start : start + count
                    ]
                    at += count
                handle.create_virtual_dataset("features", features, fillvalue=np.nan)
                handle.create_virtual_dataset("content_hash", content)
            else:
                handle.create_dataset("features", shape=(0, dim), dtype=self.dtype)
                handle.create_dataset("content_hash", shape=(0,), dtype=_HASH_DTYPE)
            group = handle.create_group("segments")
            group.create_dataset("name", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
            group.create_dataset("rows", data=np.array([s.rows for s in segments], dtype=np.int64))
            group.create_dataset("runs", data=np.array(runs, dtype=np.int64).reshape(-1, 3))
            _write_failures(handle, [f for f in failures.values() if f.content_hash not in hashes])
            for key, value in attrs.items():
                handle.attrs[key] = value
            handle.attrs["dtype"] = self.dtype

        write_hdf5_atomically(self.store.path, write)

    def _merged_attrs(self, previous: dict, extra: dict) -> dict:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        merged = {k: v for k, v in previous.items() if k == "created" or k.endswith("_version")}  # any backend's
        merged.update(self.store.attrs)
        merged.update({k: v for k, v in extra.items() if v is not None})
        merged.setdefault("created", now)
        merged["updated"] = now
        return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in merged.items()}


#: What computes into a store: its own writer, or the in-memory one used where the cache cannot be written.
FeatureWriter = StoreWriter | MemoryWriter
