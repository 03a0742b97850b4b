"""The HDF5 feature store: one file per exact backbone, keyed by image content, crash-safe.

Layout in the cache folder, for a backbone fingerprint FP:

    FP.h5        the store: `features` (N, D) float32, `content_hash` (N,) SHA-256 hex,
                 `source_path` (N,), group `failures` (path, content_hash, reason), attributes.
    FP.parts/    batches committed by a run that has not finished merging (same datasets).
    FP.lock      held by the one run writing this store.

Every file is written under a temporary name, flushed to disk and renamed, so a reader or a
killed run only ever sees whole files. A run commits each batch as a part; at its end it
merges the store and its parts into a new store file, atomically, and removes the parts.
A run that was killed leaves its parts behind and the next run starts from them.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import h5py
import numpy as np

from bottleneck.errors import CacheError

T = TypeVar("T")
FORMAT_VERSION = 1
_COPY_ROWS = 4096
_HASH_DTYPE = "S64"


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


def _write_atomically(target: Path, write: Callable[[h5py.File], None]) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as handle:
            write(handle)
        with open(tmp, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(tmp, target)
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


def _write_rows(handle: h5py.File, hashes: list[str], features: np.ndarray, paths: list[str]) -> None:
    handle.create_dataset("features", data=np.asarray(features, dtype=np.float32))
    handle.create_dataset("content_hash", data=np.array(hashes, dtype=_HASH_DTYPE))
    handle.create_dataset("source_path", data=_string_array(paths), dtype=h5py.string_dtype())


class _PartMerged(Exception):
    """A part file vanished between listing and reading: a writer merged it into the store."""


@dataclass
class _MergePlan:
    sources: list[tuple[Path, np.ndarray]] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    failures: list[Failure] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)


class FeatureStore:
    """The feature store of one backbone in one cache folder."""

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str, feature_dim: int, attrs: dict):
        self.cache_dir = Path(cache_dir)
        self.fingerprint = fingerprint
        self.feature_dim = feature_dim
        self.attrs = dict(attrs, fingerprint=fingerprint, format_version=FORMAT_VERSION)
        self.path = self.cache_dir / f"{fingerprint}.h5"
        self.parts_dir = self.cache_dir / f"{fingerprint}.parts"
        self.lock_path = self.cache_dir / f"{fingerprint}.lock"
        self.segments_dir = self.cache_dir / f"{fingerprint}.segments"

    def part_files(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.glob("part-*.h5"))

    def segment_path(self, name: str) -> Path:
        """Where the segment called `name` lives (whether or not it exists)."""
        return self.segments_dir / f"seg-{name}.h5"

    def segment_files(self) -> list[Path]:
        if not self.segments_dir.is_dir():
            return []
        return sorted(self.segments_dir.glob("seg-*.h5"))

    def write_segment(self, name: str, hashes: list[str], features: np.ndarray, paths: list[str],
                      failures: list[Failure] = ()) -> Path:
        """Write one segment of rows atomically, without the store's lock (names must be unique per writer).

        An engine's shard writes its rows this way; the next `finish` of a writer holding the lock
        brings them into the store. A segment that exists already is left as it is (a retried shard).
        """
        target = self.segment_path(name)
        if target.exists():
            return target
        if features.shape != (len(hashes), self.feature_dim):
            raise CacheError(f"segment of shape {features.shape} does not fit a store of dimension {self.feature_dim}")
        self.segments_dir.mkdir(parents=True, exist_ok=True)

        def write(handle: h5py.File) -> None:
            _write_rows(handle, hashes, features, paths)
            _write_failures(handle, list(failures))

        _write_atomically(target, write)
        return target

    def _open(self, path: Path) -> h5py.File:
        try:
            return h5py.File(path, "r")
        except FileNotFoundError:
            if path.parent == self.parts_dir:  # a writer just merged it into the store file
                raise _PartMerged(path) from None
            raise CacheError(f"feature store {path} disappeared while being read") from None
        except OSError as exc:
            raise CacheError(f"cannot read feature store {path} ({exc}); delete it to rebuild") from None

    def _plan(self) -> "_MergePlan":
        """Which rows of the store file and of each part survive de-duplication by content hash."""
        plan = _MergePlan()
        failures: dict[str, Failure] = {}
        for path in ([self.path] if self.path.exists() else []) + self.segment_files() + self.part_files():
            with self._open(path) as handle:
                plan.attrs = plan.attrs or dict(handle.attrs)
                file_hashes = _read_hashes(handle)
                keep = [i for i, h in enumerate(file_hashes) if h not in plan.seen]
                if keep:
                    file_paths = handle["source_path"].asstr()[()]
                    plan.sources.append((path, np.array(keep, dtype=np.int64)))
                    plan.hashes.extend(file_hashes[i] for i in keep)
                    plan.paths.extend(str(file_paths[i]) for i in keep)
                    plan.seen.update(file_hashes[i] for i in keep)
                for failure in _read_failures(handle):
                    failures[failure.key] = failure
        plan.failures = [f for f in failures.values() if f.content_hash not in plan.seen]
        return plan

    def _blocks(self, plan: "_MergePlan") -> Iterator[np.ndarray]:
        for path, keep in plan.sources:
            with self._open(path) as handle:
                dataset = handle["features"]
                whole = len(keep) == dataset.shape[0]
                for start in range(0, len(keep), _COPY_ROWS):
                    rows = keep[start : start + _COPY_ROWS]
                    yield dataset[rows[0] : rows[-1] + 1] if whole else dataset[rows]

    def _reading(self, read: Callable[[], T]) -> T:
        """Run `read`, again if a writer merged a part away under it (readers take no lock)."""
        for _ in range(10):
            try:
                return read()
            except _PartMerged:
                time.sleep(0.05)
        return read()

    def load(self) -> StoredFeatures:
        """Read the store and any committed parts (rows de-duplicated by content hash)."""
        return self._reading(self._load)

    def _load(self) -> StoredFeatures:
        plan = self._plan()
        features = np.empty((len(plan.hashes), self.feature_dim), np.float32)
        row = 0
        for path, keep in plan.sources:
            with self._open(path) as handle:
                dataset = handle["features"]
                if len(keep) == dataset.shape[0]:  # the common case: one straight read into place
                    dataset.read_direct(features, dest_sel=np.s_[row : row + len(keep)])
                else:
                    features[row : row + len(keep)] = dataset[keep]
            row += len(keep)
        return StoredFeatures(plan.hashes, features, plan.paths, plan.failures, plan.attrs)

    def read_rows(self, hashes: list[str]) -> np.ndarray:
        """Features of `hashes`, in that order, reading only their rows (each must be in the store or a part)."""
        return self._reading(lambda: self._read_rows(hashes))

    def _read_rows(self, hashes: list[str]) -> np.ndarray:
        plan = self._plan()
        wanted: dict[str, list[int]] = {}
        for position, content_hash in enumerate(hashes):
            wanted.setdefault(content_hash, []).append(position)
        features = np.empty((len(hashes), self.feature_dim), np.float32)
        found, start = 0, 0
        for path, keep in plan.sources:
            source_hashes = plan.hashes[start : start + len(keep)]
            start += len(keep)
            hits = [(int(keep[i]), h) for i, h in enumerate(source_hashes) if h in wanted]
            if not hits:
                continue
            hits.sort()
            with self._open(path) as handle:
                rows = handle["features"][[row for row, _ in hits]]
            for block_row, (_, content_hash) in enumerate(hits):
                features[wanted[content_hash]] = rows[block_row]
                found += len(wanted[content_hash])
        if found != len(hashes):
            raise CacheError(f"{len(hashes) - found} requested rows are not in the feature store {self.path}")
        return features

    def index(self) -> StoreIndex:
        """Hashes, paths and failures of every row, in `read_rows_at` order, without reading features."""
        plan = self._reading(self._plan)
        return StoreIndex(plan.hashes, plan.paths, plan.failures, plan.attrs)

    def read_rows_at(self, rows: np.ndarray) -> np.ndarray:
        """Features (float32) of the given row numbers of `index()`, in the order given, reading only those rows."""
        return self._reading(lambda: self._read_rows_at(np.asarray(rows, dtype=np.int64)))

    def _read_rows_at(self, rows: np.ndarray) -> np.ndarray:
        plan = self._plan()
        total = len(plan.hashes)
        if rows.size and (rows.min() < 0 or rows.max() >= total):
            raise CacheError(f"row {int(rows.max())} is outside the feature store {self.path} ({total} rows)")
        features = np.empty((len(rows), self.feature_dim), np.float32)
        start = 0
        for path, keep in plan.sources:
            inside = np.flatnonzero((rows >= start) & (rows < start + len(keep)))
            if inside.size:
                file_rows = keep[rows[inside] - start]
                order = np.argsort(file_rows, kind="stable")
                unique_rows, inverse = np.unique(file_rows[order], return_inverse=True)
                with self._open(path) as handle:
                    block = handle["features"][unique_rows]  # h5py wants increasing, distinct rows
                features[inside[order]] = block[inverse]
            start += len(keep)
        return features

    def known(self) -> tuple[set[str], list[Failure]]:
        """The content hashes with features, and the recorded failures, without reading features."""
        plan = self._reading(self._plan)
        return plan.seen, plan.failures

    @contextlib.contextmanager
    def writer(self, lock_timeout: float | None = None, on_wait: Callable[[str], None] | None = None) -> Iterator["StoreWriter"]:
        """Hold this store's lock and yield a `StoreWriter`; release the lock at exit."""
        with _exclusive_lock(self.lock_path, lock_timeout, on_wait):
            yield StoreWriter(self)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, timeout: float | None, on_wait: Callable[[str], None] | None):
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
                    raise CacheError(
                        f"another bottleneck run (pid {holder}) is writing {lock_path.with_suffix('.h5')}; "
                        "wait for it to finish or pass --lock-timeout SECONDS to wait"
                    ) from None
                if not told and on_wait is not None:
                    on_wait(f"waiting for another bottleneck run (pid {holder}) to release {lock_path}")
                    told = True
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the lock, and the kernel does so if we die


class StoreWriter:
    """Commits batches to a store as atomic parts and merges them into the store file."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self._remove_stale_temporaries()
        self._drop_unreadable_parts()
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

    def _drop_unreadable_parts(self) -> None:
        for part in self.store.part_files() + self.store.segment_files():
            try:
                with h5py.File(part, "r") as handle:
                    _read_hashes(handle)
            except (OSError, KeyError):
                part.unlink(missing_ok=True)

    def add_failure(self, failure: Failure) -> None:
        """Record a failure; it is committed with the next batch or at `finish`."""
        with self._failures_lock:
            self.known_failures[failure.key] = failure
            self._pending_failures.append(failure)

    def commit(self, hashes: list[str], features: np.ndarray, paths: list[str]) -> None:
        """Write one batch (and pending failures) as a part file, atomically."""
        if features.shape != (len(hashes), self.store.feature_dim):
            raise CacheError(f"batch of shape {features.shape} does not fit a store of dimension {self.store.feature_dim}")
        self.store.parts_dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.h5"
        with self._failures_lock:
            failures, self._pending_failures = self._pending_failures, []

        def write(handle: h5py.File) -> None:
            _write_rows(handle, hashes, features, paths)
            _write_failures(handle, failures)

        try:
            _write_atomically(self.store.parts_dir / name, write)
        except BaseException:
            with self._failures_lock:
                self._pending_failures[:0] = failures
            raise
        self.known_hashes.update(hashes)

    def finish(self, extra_attrs: dict | None = None) -> bool:
        """Merge the store and its parts into one store file; return whether anything changed."""
        if self._pending_failures:
            self.commit([], np.zeros((0, self.store.feature_dim), np.float32), [])
        parts = self.store.segment_files() + self.store.part_files()
        if not parts and self.store.path.exists():
            return False
        plan = self.store._plan()
        attrs = self._merged_attrs(plan.attrs, extra_attrs or {})

        def write(handle: h5py.File) -> None:
            features = handle.create_dataset("features", shape=(len(plan.hashes), self.store.feature_dim), dtype=np.float32)
            row = 0
            for block in self.store._blocks(plan):
                features[row : row + len(block)] = block
                row += len(block)
            handle.create_dataset("content_hash", data=np.array(plan.hashes, dtype=_HASH_DTYPE))
            handle.create_dataset("source_path", data=_string_array(plan.paths), dtype=h5py.string_dtype())
            _write_failures(handle, plan.failures)
            for key, value in attrs.items():
                handle.attrs[key] = value

        _write_atomically(self.store.path, write)
        for part in parts:
            part.unlink(missing_ok=True)
        for folder in (self.store.parts_dir, self.store.segments_dir):
            with contextlib.suppress(OSError):
                folder.rmdir()
        return True

    def _merged_attrs(self, previous: dict, extra: dict) -> dict:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        merged = {k: v for k, v in previous.items() if k in ("created", "tensorflow_version", "keras_version")}
        merged.update(self.store.attrs)
        merged.update({k: v for k, v in extra.items() if v is not None})
        merged.setdefault("created", now)
        merged["updated"] = now
        return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in merged.items()}
