"""The HDF5 feature store: one per exact backbone, keyed by image content, crash-safe, growing by what is new.

Layout in the cache folder, for a backbone fingerprint FP:

    FP.h5        the index, what readers open: `features` (N, D) and `content_hash` (N,) as HDF5
                 virtual datasets over the segment files, group `failures` (path, content_hash,
                 reason), group `segments` (which rows of which segment), attributes.
    FP.segments/ seg-*.h5: the rows themselves, each file `features`, `content_hash`,
                 `source_path`, `failures`; written once, never edited.
    FP.parts/    batches committed by a run that has not finished (same datasets).
    FP.lock      held by the one run writing this store.

Every file is written under a temporary name, flushed to disk and renamed, so a reader or a
killed run only ever sees whole files. A run commits each batch as a part; at its end the new
rows of its parts become one new segment and the index is rebuilt: adding images writes the
new rows and a small index, never the old rows again. Small segments are merged with their
neighbours of similar size (as a binary counter: each row is rewritten a few times at most,
and never once its segment reaches `SMALL_SEGMENT_BYTES`); `bottleneck cache compact` rewrites
all of them into one. A killed run leaves its parts (and perhaps a new segment not yet in the
index); the next run reads them as they are and brings them in.

A store written before segments existed (format 1) holds its rows in FP.h5 itself; it is read
as it is and becomes the first segment (a rename, not a copy) the next time rows are added.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import io
import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import h5py
import numpy as np

from bottleneck.errors import CacheError, disk_full, is_disk_full

T = TypeVar("T")
FORMAT_VERSION = 2
DTYPES = ("float32", "float16")
#: Segments smaller than this are merged with their neighbours of similar size; larger ones are never rewritten.
SMALL_SEGMENT_BYTES = 64 * 2**20
_COPY_ROWS = 4096
_HASH_DTYPE = "S64"
_LEGACY_SEGMENT = "seg-00000000000000000000-format1.h5"
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Failure:
    """An image that could not be turned into features, and why."""

    path: str
    content_hash: str  # '' when the file could not even be read
    reason: str

    @property
    def key(self) -> str:
        return self.content_hash or "path:" + self.path


@dataclass
class StoredFeatures:
    """Everything a store holds, committed parts included."""

    content_hash: list[str]
    features: np.ndarray
    source_path: list[str]
    failures: list[Failure]
    attrs: dict = field(default_factory=dict)

    def rows_by_hash(self) -> dict[str, int]:
        return {h: i for i, h in enumerate(self.content_hash)}


@dataclass
class StoreIndex:
    """What a store holds, without its features: row `i` of `read_rows_at` has `content_hash[i]`."""

    content_hash: list[str]
    source_path: list[str]
    failures: list[Failure]
    attrs: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.content_hash)

    def rows_by_hash(self) -> dict[str, int]:
        return {h: i for i, h in enumerate(self.content_hash)}


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_NO_LOCKS = ("the file system of {folder} does not support file locking, which HDF5 uses: put the cache on a "
             "local disk, or set HDF5_USE_FILE_LOCKING=FALSE if only one run at a time touches it")


def _is_lock_failure(exc: OSError) -> bool:
    return "unable to lock file" in str(exc).lower()


def _write_hdf5(path: Path, write: Callable[[h5py.File], None]) -> None:
    """Create `path` and `write` it; a full disk is one OSError(ENOSPC), without h5py's tracebacks.

    When a write fills the disk, every HDF5 object freed afterwards tries to flush again, and h5py
    prints a traceback for each from its deallocators straight to sys.stderr; writing and closing
    run with sys.stderr caught, and what was caught is passed on unless the disk was full.
    """
    try:
        handle = h5py.File(path, "w")
    except OSError as exc:
        if _is_lock_failure(exc):
            raise CacheError(_NO_LOCKS.format(folder=path.parent)) from None
        raise
    error: BaseException | None = None
    real, sys.stderr = sys.stderr, io.StringIO()
    hook, sys.unraisablehook = sys.unraisablehook, sys.__unraisablehook__  # which writes to the caught stderr
    try:
        try:
            write(handle)
        except (OSError, RuntimeError) as exc:
            error = exc
        except BaseException:
            handle.close()
            raise
        try:
            handle.close()
        except (OSError, RuntimeError) as exc:
            error = error or exc
        if error is not None:
            error.__traceback__ = None  # frees the half-written file's objects here, while stderr is caught
            del handle
            gc.collect()
        caught = sys.stderr.getvalue()
    finally:
        sys.stderr, sys.unraisablehook = real, hook
    full = error is not None and (is_disk_full(error) if isinstance(error, OSError) else "errno = 28" in str(error))
    if caught and not full:
        real.write(caught)
    if full:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    if error is not None:
        raise error


def _write_atomically(target: Path, write: Callable[[h5py.File], None], needed_bytes: int | None = None) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        _write_hdf5(tmp, write)
        with open(tmp, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(target.parent, needed_bytes) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(target.parent)


def printable(text: str) -> str:
    """UTF-8-safe text: file names that are not valid UTF-8 keep their bytes as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _string_array(values: list[str]) -> np.ndarray:
    return np.array([printable(v) for v in values], dtype=object)


def _write_failures(handle: h5py.File, failures: list[Failure]) -> None:
    group = handle.create_group("failures")
    text = h5py.string_dtype()
    group.create_dataset("path", data=_string_array([f.path for f in failures]), dtype=text)
    group.create_dataset("content_hash", data=_string_array([f.content_hash for f in failures]), dtype=text)
    group.create_dataset("reason", data=_string_array([f.reason for f in failures]), dtype=text)


def _read_failures(handle: h5py.File) -> list[Failure]:
    if "failures" not in handle:
        return []
    group = handle["failures"]
    columns = [group[name].asstr()[()] for name in ("path", "content_hash", "reason")]
    return [Failure(str(p), str(h), str(r)) for p, h, r in zip(*columns)]


def _read_hashes(handle: h5py.File) -> list[str]:
    return [h.decode("ascii") for h in handle["content_hash"][()]]


def _as_stored(features: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        features = np.asarray(features, dtype=np.float32)
        if np.any(np.abs(features[np.isfinite(features)]) > _FLOAT16_MAX):
            raise CacheError("these features exceed float16's range (65504); keep this store in float32 (--dtype float32)")
    return np.asarray(features, dtype=dtype)


def _write_rows(handle: h5py.File, hashes: list[str], features: np.ndarray, paths: list[str], dtype: str) -> None:
    handle.create_dataset("features", data=_as_stored(features, dtype))
    handle.create_dataset("content_hash", data=np.array(hashes, dtype=_HASH_DTYPE))
    handle.create_dataset("source_path", data=_string_array(paths), dtype=h5py.string_dtype())


#: A segment's (or part's) attribute: JSON {what computed its rows: how many}, e.g. {"jax 0.10.2, keras 3.15.1": 16}.
COMPUTED_BY = "computed_by"
UNRECORDED = "unrecorded"


def _computed_by(attrs: dict, rows: int, kept: int) -> dict[str, int]:
    """What computed the `kept` surviving rows of a file of `rows` rows, from its attributes."""
    try:
        counts = {str(k): int(v) for k, v in json.loads(attrs.get(COMPUTED_BY, "") or "{}").items()}
    except (TypeError, ValueError, AttributeError):
        counts = {}
    if not counts or sum(counts.values()) != rows:
        counts = {UNRECORDED: rows}
    if kept == rows or not kept:
        return counts if kept else {}
    shares = {name: count * kept // rows for name, count in counts.items()}  # duplicates dropped: in proportion
    first = max(counts, key=counts.get)
    shares[first] += kept - sum(shares.values())
    return {name: count for name, count in shares.items() if count}


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for name, count in one.items():
            total[name] = total.get(name, 0) + count
    return total


def _is_run(values: np.ndarray) -> bool:
    """Consecutive increasing integers (a, a+1, ..., b)."""
    return values.size > 0 and int(values[-1]) - int(values[0]) == values.size - 1 and bool(np.all(np.diff(values) == 1))


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Increasing row numbers as (start, count) runs of consecutive rows."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return [(int(rows[s]), int(e - s)) for s, e in zip(starts, ends)]


def _reason(exc: Exception) -> str:
    text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__


class _PartMerged(Exception):
    """A part or segment vanished between listing and reading: a writer merged it away."""


@dataclass
class _Source:
    """One file of rows, and which of its rows survive de-duplication by content hash."""

    path: Path
    kind: str  # 'legacy' (a format-1 store file), 'segment' or 'part'
    rows: int
    keep: np.ndarray
    hashes: list[str]  # of the kept rows
    failures: list[Failure]
    indexed: bool = False
    computed_by: dict = field(default_factory=dict)  # of the kept rows: what computed them, how many


@dataclass
class _Plan:
    sources: list[_Source] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    failures: list[Failure] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    indexed: bool = False  # FP.h5 is a format-2 index
    missing: list[str] = field(default_factory=list)  # segments the index names that are gone

    @property
    def current(self) -> bool:
        """The index already describes exactly these rows: nothing to write."""
        return self.indexed and not self.missing and all(
            s.indexed and (s.keep.size or s.failures) for s in self.sources)


class FeatureStore:
    """The feature store of one backbone in one cache folder."""

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str, feature_dim: int, attrs: dict,
                 dtype: str | None = None):
        if dtype is not None and dtype not in DTYPES:
            raise CacheError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        self.cache_dir = Path(cache_dir)
        self.fingerprint = fingerprint
        self.feature_dim = feature_dim
        self.requested_dtype = dtype
        self.attrs = dict(attrs, fingerprint=fingerprint, format_version=FORMAT_VERSION)
        self.path = self.cache_dir / f"{fingerprint}.h5"
        self.parts_dir = self.cache_dir / f"{fingerprint}.parts"
        self.segments_dir = self.cache_dir / f"{fingerprint}.segments"
        self.lock_path = self.cache_dir / f"{fingerprint}.lock"
        self._contents_cache: dict[Path, tuple[tuple[int, int, int], tuple[dict, list[str], list[Failure]]]] = {}

    # ---- files -------------------------------------------------------------------------------

    def part_files(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(self.parts_dir.glob("part-*.h5"))

    def segment_files(self) -> list[Path]:
        if not self.segments_dir.is_dir():
            return []
        return sorted(self.segments_dir.glob("seg-*.h5"))

    def segment_path(self, name: str) -> Path:
        """Where the segment called `name` lives (whether or not it exists)."""
        return self.segments_dir / f"seg-{name}.h5"

    def files(self) -> list[Path]:
        """Every file of this store on disk (index, segments, parts, lock)."""
        found = [p for p in (self.path, self.lock_path) if p.exists()]
        for folder in (self.segments_dir, self.parts_dir):
            if folder.is_dir():
                found.extend(sorted(folder.iterdir()))
        return found

    def stored_dtype(self) -> str | None:
        """How the rows on disk are stored, or None when the store has no rows yet."""
        for path in [p for p in [self.path] if p.exists()] + self.segment_files() + self.part_files():
            with contextlib.suppress(OSError, KeyError, _PartMerged, CacheError):
                with self._open(path) as handle:
                    return str(handle.attrs.get("dtype") or handle["features"].dtype)
        return None

    def dtype(self) -> str:
        """The dtype new rows are written in: the store's own, else the one asked for, else float32."""
        stored = self.stored_dtype()
        if stored and self.requested_dtype and stored != self.requested_dtype:
            raise CacheError(
                f"the store {self.path.name} keeps its features as {stored}, not {self.requested_dtype}: "
                f"pass --dtype {stored}, or convert it with `bottleneck cache compact --dtype {self.requested_dtype}`")
        return stored or self.requested_dtype or "float32"

    def write_segment(self, name: str, hashes: list[str], features: np.ndarray, paths: list[str],
                      failures: list[Failure] = (), dtype: str | None = None, computed_by: str = "") -> Path:
        """Write one segment of rows atomically, without the store's lock (names must be unique per writer).

        An engine's shard writes its rows this way; the next `finish` of a writer holding the lock
        brings them into the index. A segment that exists already is left as it is (a retried shard).
        """
        target = self.segment_path(name)
        if target.exists():
            return target
        if features.shape != (len(hashes), self.feature_dim):
            raise CacheError(f"segment of shape {features.shape} does not fit a store of dimension {self.feature_dim}")
        dtype = dtype or self.dtype()
        self.segments_dir.mkdir(parents=True, exist_ok=True)

        def write(handle: h5py.File) -> None:
            _write_rows(handle, hashes, features, paths, dtype)
            _write_failures(handle, list(failures))
            handle.attrs["dtype"] = dtype
            if hashes:
                handle.attrs[COMPUTED_BY] = json.dumps({computed_by or UNRECORDED: len(hashes)})

        _write_atomically(target, write, features.nbytes)
        return target

    # ---- reading -----------------------------------------------------------------------------

    def _open(self, path: Path) -> h5py.File:
        try:
            return h5py.File(path, "r")
        except FileNotFoundError:
            if path.parent in (self.parts_dir, self.segments_dir):  # a writer just merged it away
                raise _PartMerged(path) from None
            raise CacheError(f"feature store {path} disappeared while being read") from None
        except OSError as exc:
            if _is_lock_failure(exc):
                raise CacheError(_NO_LOCKS.format(folder=path.parent)) from None
            raise CacheError(f"cannot read feature store {path} ({exc}); delete it to rebuild") from None

    def _index_contents(self) -> tuple[bool, list[str], dict]:
        """(is a format-2 index, the segment names it lists, its attributes); a format-1 file lists none."""
        if not self.path.exists():
            return False, [], {}
        with self._open(self.path) as handle:
            attrs = dict(handle.attrs)
            if "segments" not in handle:
                return False, [], attrs
            try:
                return True, [str(n) for n in handle["segments/name"].asstr()[()]], attrs
            except (KeyError, ValueError, UnicodeDecodeError) as exc:
                raise CacheError(f"the index {self.path.name} is damaged ({_reason(exc)}); delete it and the next "
                                 f"`bottleneck features` run rebuilds it from {self.segments_dir.name}/") from None

    def _listing(self, tolerate_missing: bool) -> tuple[list[tuple[Path, str, bool]], _Plan]:
        plan = _Plan()
        indexed, names, plan.attrs = self._index_contents()
        plan.indexed = indexed
        listing: list[tuple[Path, str, bool]] = []
        if self.path.exists() and not indexed:
            listing.append((self.path, "legacy", False))
        on_disk = self.segment_files()
        named = [self.segments_dir / name for name in names]
        for path in named:
            if path.exists():
                listing.append((path, "segment", True))
            elif tolerate_missing:
                plan.missing.append(path.name)
            else:
                raise _PartMerged(path)
        listed = set(named)
        listing.extend((path, "segment", False) for path in on_disk if path not in listed)
        listing.extend((path, "part", False) for path in self.part_files())
        return listing, plan

    def _file_contents(self, path: Path) -> tuple[dict, list[str], list[Failure]]:
        """(attributes, row hashes, failures) of one file; remembered while the file is unchanged.

        Segments are written once, so a writer that plans the store again at its end (or a reader
        that plans it for every read) decodes each segment's hashes once, not every time.
        """
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns) if st else None
        cached = self._contents_cache.get(path)
        if cached is not None and stamp is not None and cached[0] == stamp:
            return cached[1]
        with self._open(path) as handle:
            attrs = dict(handle.attrs)
            file_hashes = _read_hashes(handle)
            if handle["features"].shape != (len(file_hashes), self.feature_dim):
                raise ValueError(f"features of shape {handle['features'].shape} for {len(file_hashes)} rows")
            contents = (attrs, file_hashes, _read_failures(handle))
        if stamp is not None and path != self.path:  # the index file is replaced, not kept: never cached
            self._contents_cache[path] = (stamp, contents)
        return contents

    def _plan(self, tolerate_missing: bool = False) -> _Plan:
        """Which rows of which files make up the store, de-duplicated by content hash (first wins)."""
        listing, plan = self._listing(tolerate_missing)
        failures: dict[str, Failure] = {}
        for path, kind, indexed in listing:
            try:
                attrs, file_hashes, file_failures = self._file_contents(path)
                plan.attrs = plan.attrs or attrs
            except (KeyError, ValueError, UnicodeDecodeError, CacheError) as exc:
                if kind == "part" or (kind == "segment" and not indexed):
                    continue  # cut short by a killed run: the next writer drops it and its rows are computed again
                raise CacheError(f"the feature store {self.path.name} is damaged ({path.name}: {_reason(exc)}); "
                                 f"delete {self.path.name} and {self.segments_dir.name}/ to rebuild it") from None
            before = len(plan.seen)
            plan.seen.update(file_hashes)
            if len(plan.seen) - before == len(file_hashes):  # the common case, no duplicate: at C speed
                keep, kept = np.arange(len(file_hashes), dtype=np.int64), file_hashes
            else:
                plan.seen.difference_update(file_hashes)
                plan.seen.update(plan.hashes)  # undo, then keep the first of every content
                chosen: list[int] = []
                for i, h in enumerate(file_hashes):
                    if h not in plan.seen:
                        plan.seen.add(h)
                        chosen.append(i)
                keep, kept = np.array(chosen, dtype=np.int64), [file_hashes[i] for i in chosen]
            plan.sources.append(_Source(path, kind, len(file_hashes), keep, kept, file_failures, indexed,
                                        _computed_by(attrs, len(file_hashes), int(keep.size))))
            plan.hashes.extend(kept)
            for failure in file_failures:
                failures[failure.key] = failure
        plan.failures = [f for f in failures.values() if f.content_hash not in plan.seen]
        return plan

    def _paths(self, plan: _Plan) -> list[str]:
        paths: list[str] = []
        for source in plan.sources:
            if source.keep.size:
                with self._open(source.path) as handle:
                    file_paths = handle["source_path"].asstr()[()]
                paths.extend(str(file_paths[i]) for i in source.keep)
        return paths

    def _blocks(self, sources: list[_Source]) -> Iterator[np.ndarray]:
        for source in sources:
            if not source.keep.size:
                continue
            with self._open(source.path) as handle:
                dataset = handle["features"]
                whole = source.keep.size == dataset.shape[0]
                for start in range(0, source.keep.size, _COPY_ROWS):
                    rows = source.keep[start : start + _COPY_ROWS]
                    yield dataset[rows[0] : rows[-1] + 1] if whole else dataset[rows]

    def _reading(self, read: Callable[[bool], T]) -> T:
        """Run `read`, again if a writer merged a file away under it (readers take no lock)."""
        for _ in range(10):
            try:
                return read(False)
            except _PartMerged:
                time.sleep(0.05)
        return read(True)  # a segment the index names is really gone: read what is left

    def load(self) -> StoredFeatures:
        """Read every row (as float32), uncommitted parts included, de-duplicated by content hash."""
        return self._reading(self._load)

    def _load(self, tolerate_missing: bool) -> StoredFeatures:
        plan = self._plan(tolerate_missing)
        features = np.empty((len(plan.hashes), self.feature_dim), np.float32)
        row = 0
        for source in plan.sources:
            if not source.keep.size:
                continue
            with self._open(source.path) as handle:
                dataset = handle["features"]
                if source.keep.size == dataset.shape[0] and dataset.dtype == np.float32:  # one straight read into place
                    dataset.read_direct(features, dest_sel=np.s_[row : row + source.keep.size])
                elif source.keep.size == dataset.shape[0]:  # float16: NumPy converts far faster than HDF5
                    features[row : row + source.keep.size] = dataset[()]
                else:
                    features[row : row + source.keep.size] = dataset[source.keep]
            row += source.keep.size
        return StoredFeatures(plan.hashes, features, self._paths(plan), plan.failures, plan.attrs)

    def index(self) -> StoreIndex:
        """Hashes, paths and failures of every row, in `read_rows_at` order, without reading features."""
        def read(tolerate_missing: bool) -> StoreIndex:
            plan = self._plan(tolerate_missing)
            return StoreIndex(plan.hashes, self._paths(plan), plan.failures, plan.attrs)

        return self._reading(read)

    def read_rows_at(self, rows: np.ndarray) -> np.ndarray:
        """Features (float32) of the given row numbers of `index()`, in the order given, reading only those rows."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._reading(lambda tolerate: self._read_rows_at(self._plan(tolerate), rows))

    def _read_rows_at(self, plan: _Plan, rows: np.ndarray) -> np.ndarray:
        total = len(plan.hashes)
        if rows.size and (rows.min() < 0 or rows.max() >= total):
            raise CacheError(f"row {int(rows.max())} is outside the feature store {self.path} ({total} rows)")
        features = np.empty((len(rows), self.feature_dim), np.float32)
        start = 0
        for source in plan.sources:
            inside = np.flatnonzero((rows >= start) & (rows < start + source.keep.size))
            if inside.size:
                file_rows = source.keep[rows[inside] - start]
                first = int(file_rows[0])
                if _is_run(inside) and _is_run(file_rows):  # a chunk in store order: straight into place
                    with self._open(source.path) as handle:
                        dataset = handle["features"]
                        into = np.s_[int(inside[0]) : int(inside[0]) + inside.size]
                        if dataset.dtype == np.float32:
                            dataset.read_direct(features, source_sel=np.s_[first : first + inside.size], dest_sel=into)
                        else:  # float16: NumPy converts far faster than HDF5
                            features[into] = dataset[first : first + inside.size]
                    start += source.keep.size
                    continue
                order = np.argsort(file_rows, kind="stable")
                unique_rows, inverse = np.unique(file_rows[order], return_inverse=True)
                with self._open(source.path) as handle:
                    dataset = handle["features"]
                    if unique_rows.size == unique_rows[-1] - unique_rows[0] + 1:  # one contiguous slice
                        block = dataset[unique_rows[0] : unique_rows[-1] + 1]
                    else:
                        block = dataset[unique_rows]  # h5py wants increasing, distinct rows
                features[inside[order]] = block[inverse]
            start += source.keep.size
        return features

    def snapshot(self) -> "StoreSnapshot":
        """The store as it is now: its row hashes, and reads by row number that stay right while writers merge."""
        return StoreSnapshot(self)

    def read_rows(self, hashes: list[str]) -> np.ndarray:
        """Features of `hashes`, in that order, reading only their rows (each must be in the store or a part)."""
        def read(tolerate_missing: bool) -> np.ndarray:
            plan = self._plan(tolerate_missing)
            row_of = {h: i for i, h in enumerate(plan.hashes)}
            absent = [h for h in hashes if h not in row_of]
            if absent:
                raise CacheError(f"{len(absent)} requested rows are not in the feature store {self.path}")
            return self._read_rows_at(plan, np.array([row_of[h] for h in hashes], dtype=np.int64))

        return self._reading(read)

    def known(self) -> tuple[set[str], list[Failure]]:
        """The content hashes with features, and the recorded failures, without reading features."""
        plan = self._reading(self._plan)
        return plan.seen, plan.failures

    def summary(self) -> dict:
        """Rows, failures, files and bytes of this store, for `bottleneck cache info`."""
        plan = self._reading(self._plan)
        sizes = {p: p.stat().st_size for p in self.files() if p.is_file()}
        segments = [s for s in plan.sources if s.kind == "segment"]
        return {
            "fingerprint": self.fingerprint,
            "rows": len(plan.hashes),
            "failures": len(plan.failures),
            "segments": len(segments),
            "pending": sum(1 for s in plan.sources if not s.indexed and s.kind != "legacy"),
            "format": 2 if plan.indexed else 1,
            "dtype": self.stored_dtype() or "float32",
            "computed_by": add_counts(*(s.computed_by for s in plan.sources)),
            "bytes": sum(sizes.values()),
            "attrs": {k: (v.item() if hasattr(v, "item") else v) for k, v in plan.attrs.items()},
        }

    # ---- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, lock_timeout: float | None = None, on_wait: Callable[[str], None] | None = None) -> Iterator["StoreWriter"]:
        """Hold this store's lock and yield a `StoreWriter`; release the lock at exit."""
        with exclusive_lock(self.lock_path, lock_timeout, on_wait):
            yield StoreWriter(self)


class StoreSnapshot:
    """A store's rows as they were when taken: `content_hash[i]` is row i of `read_rows_at`.

    Many reads pay for the store's layout once (a pass over data reads chunk after chunk). If a
    writer merges files away meanwhile, the layout is read again and row numbers are translated
    through the content hashes, so a reader never gets another image's row.
    """

    def __init__(self, store: FeatureStore):
        self.store = store
        self._plan = store._reading(store._plan)
        self.content_hash: list[str] = self._plan.hashes
        self.failures: list[Failure] = self._plan.failures
        self.attrs: dict = self._plan.attrs
        self._translate: np.ndarray | None = None  # row numbers of this snapshot -> rows of the current layout

    @property
    def rows(self) -> int:
        return len(self.content_hash)

    def rows_by_hash(self) -> dict[str, int]:
        return {h: i for i, h in enumerate(self.content_hash)}

    def read_rows_at(self, rows: np.ndarray) -> np.ndarray:
        """Features (float32) of rows of this snapshot, in the order given (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise CacheError(f"row {int(rows.max())} is outside the feature store {self.store.path} ({self.rows} rows)")
        for _ in range(10):
            current = rows if self._translate is None else self._translate[rows]
            try:
                return self.store._read_rows_at(self._plan, current)
            except _PartMerged:
                time.sleep(0.05)
                self._relayout()
        raise CacheError(f"the feature store {self.store.path} keeps changing under this reader; try again")

    def _relayout(self) -> None:
        self._plan = self.store._reading(self.store._plan)
        row_of = {h: i for i, h in enumerate(self._plan.hashes)}
        translate = np.array([row_of.get(h, -1) for h in self.content_hash], dtype=np.int64)
        if (translate < 0).any():
            raise CacheError(f"rows of the feature store {self.store.path} vanished while being read (a segment was "
                             "deleted?); run the command again")
        self._translate = translate


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs on this machine: a leftover of a dead one may be cleared."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def pid_named_folders(target: Path) -> list[tuple[Path, int | None]]:
    """The temporary folders `.NAME.<pid>.*` that writers of `target` make beside it, each with the pid in its name."""
    prefix = f".{target.name}."
    try:
        entries = [entry for entry in target.parent.iterdir() if entry.name.startswith(prefix) and entry.is_dir()]
    except OSError:
        return []
    named = []
    for entry in entries:
        match = re.match(r"(\d+)\.", entry.name[len(prefix):])
        named.append((entry, int(match.group(1)) if match else None))
    return named


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, timeout: float | None, on_wait: Callable[[str], None] | None = None,
                   busy: Callable[[str], Exception] | None = None):
    """Hold an exclusive lock on `lock_path` (waiting up to `timeout` seconds; None: as long as it takes).

    `busy(holder_pid)` makes the error raised when the wait runs out (default: another run writes the store).
    """
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise CacheError(f"cannot write to cache folder {lock_path.parent}: {exc.strerror or exc}") from None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                if deadline is not None and time.monotonic() >= deadline:
                    if busy is not None:
                        raise busy(holder) from None
                    raise CacheError(
                        f"another bottleneck run (pid {holder}) is writing {lock_path.with_suffix('.h5')}; "
                        "wait for it to finish or pass --lock-timeout SECONDS to wait"
                    ) from None
                if not told and on_wait is not None:
                    on_wait(f"waiting for another bottleneck run (pid {holder}) to release {lock_path}")
                    told = True
                time.sleep(0.2)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise CacheError(
                        f"the file system of {lock_path.parent} does not support file locking, which keeps two runs "
                        "from writing one store at once: put the cache on a local disk (--cache) and copy it over "
                        "when done") from None
                raise
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the lock, and the kernel does so if we die


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
            raise CacheError(f"batch of shape {features.shape} does not fit a store of dimension {self.store.feature_dim}")
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
                for tmp in folder.glob(".*.tmp"):
                    if tmp.name.startswith((f".{self.store.fingerprint}", ".part-", ".seg-")):
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
            raise CacheError(f"batch of shape {features.shape} does not fit a store of dimension {self.store.feature_dim}")
        self.store.parts_dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.h5"
        with self._failures_lock:
            failures, self._pending_failures = self._pending_failures, []

        def write(handle: h5py.File) -> None:
            _write_rows(handle, hashes, features, paths, self.dtype)
            _write_failures(handle, failures)
            if hashes:
                handle.attrs[COMPUTED_BY] = json.dumps({computed_by or UNRECORDED: len(hashes)})

        try:
            _write_atomically(self.store.parts_dir / name, write, features.nbytes)
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
        while tail_rows and kept and kept[-1].kind == "segment" and kept[-1].keep.size == kept[-1].rows \
                and _segment_bytes(kept[-1], self.store.feature_dim, itemsize) < SMALL_SEGMENT_BYTES \
                and kept[-1].keep.size <= 2 * tail_rows:
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
        failures = {f.key: f for s in ordered for f in s.failures}
        failures = [f for f in failures.values() if f.content_hash not in plan.seen]
        self._seq += 1
        path = self.store.segments_dir / f"seg-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.h5"
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
        _write_atomically(path, write, len(hashes) * self.store.feature_dim * np.dtype(self.dtype).itemsize)
        return _Source(path, "segment", len(hashes), np.arange(len(hashes), dtype=np.int64), hashes, failures,
                       computed_by=computed_by)

    def _legacy_as_segment(self, source: _Source) -> _Source:
        """A format-1 store file becomes the first segment: a hard link (no copy) where the disk allows."""
        target = self.store.segments_dir / _LEGACY_SEGMENT
        self.store.segments_dir.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                os.link(source.path, tmp)
            except OSError:
                shutil.copyfile(source.path, tmp)
            os.replace(tmp, target)
            _fsync_dir(self.store.segments_dir)
        return _Source(target, "segment", source.rows, source.keep, source.hashes, source.failures,
                       computed_by=source.computed_by)

    def _write_index(self, segments: list[_Source], plan: _Plan, extra: dict) -> None:
        """The index: virtual `features` and `content_hash` over the segments' kept rows, atomically."""
        rows = sum(int(s.keep.size) for s in segments)
        dim = self.store.feature_dim
        hashes = plan.seen  # every content in the store: the segments hold exactly the plan's rows
        failures = {f.key: f for s in segments for f in s.failures}
        failures.update({f.key: f for f in plan.failures})
        attrs = self._merged_attrs(plan.attrs, extra)
        names, runs = [], []
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
                    features[at : at + count] = h5py.VirtualSource(relative, "features", shape=(source.rows, dim))[start : start + count]
                    content[at : at + count] = h5py.VirtualSource(relative, "content_hash", shape=(source.rows,))[start : start + count]
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

        _write_atomically(self.store.path, write)

    def _merged_attrs(self, previous: dict, extra: dict) -> dict:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        merged = {k: v for k, v in previous.items() if k in ("created", "tensorflow_version", "keras_version")}
        merged.update(self.store.attrs)
        merged.update({k: v for k, v in extra.items() if v is not None})
        merged.setdefault("created", now)
        merged["updated"] = now
        return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in merged.items()}
