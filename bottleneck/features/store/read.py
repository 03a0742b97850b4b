"""The store's read path: `FeatureStore` (its files, reading rows by content or number, the summary) and
`StoreSnapshot`; readers take no lock and read again when a writer merges files away under them."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import h5py
import numpy as np

from bottleneck import naming
from bottleneck.errors import CacheError
from bottleneck.features.store.layout import (
    _COPY_ROWS,
    DTYPES,
    FORMAT_VERSION,
    Failure,
    StoredFeatures,
    StoreIndex,
    T,
    _computed_by,
    _is_run,
    _PartMerged,
    _Plan,
    _read_failures,
    _read_hashes,
    _Source,
    add_counts,
)
from bottleneck.fs import NO_HDF5_LOCKS, exclusive_lock, is_lock_failure
from bottleneck.text import first_line

if TYPE_CHECKING:
    from bottleneck.features.store.write import StoreWriter


class FeatureStore:
    """The feature store of one backbone in one cache folder."""

    def __init__(
        self, cache_dir: str | os.PathLike, fingerprint: str, feature_dim: int, attrs: dict, dtype: str | None = None
    ):
        if dtype is not None and dtype not in DTYPES:
            raise CacheError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        self.cache_dir = Path(cache_dir)
        self.fingerprint = fingerprint
        self.feature_dim = feature_dim
        self.requested_dtype = dtype
        self.attrs = dict(attrs, fingerprint=fingerprint, format_version=FORMAT_VERSION)
        self.path = naming.store_index(self.cache_dir, fingerprint)
        self.parts_dir = naming.store_parts(self.cache_dir, fingerprint)
        self.segments_dir = naming.store_segments(self.cache_dir, fingerprint)
        self.lock_path = naming.store_lock(self.cache_dir, fingerprint)
        self._contents_cache: dict[Path, tuple[tuple[int, int, int], tuple[dict, list[str], list[Failure]]]] = {}

    # ---- files -------------------------------------------------------------------------------

    def part_files(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(self.parts_dir.glob(naming.PART_GLOB))

    def segment_files(self) -> list[Path]:
        if not self.segments_dir.is_dir():
            return []
        return sorted(self.segments_dir.glob(naming.SEGMENT_GLOB))

    def segment_path(self, name: str) -> Path:
        """Where the segment called `name` lives (whether or not it exists)."""
        return self.segments_dir / naming.segment_file(name)

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
                f"pass --dtype {stored}, or convert it with `bottleneck cache compact --dtype {self.requested_dtype}`"
            )
        return stored or self.requested_dtype or "float32"

    def write_segment(
        self,
        name: str,
        hashes: list[str],
        features: np.ndarray,
        paths: list[str],
        failures: Sequence[Failure] = (),
        dtype: str | None = None,
        computed_by: str = "",
    ) -> Path:
        """Write one segment of rows atomically, without the store's lock (names must be unique per writer).

        An engine's shard writes its rows this way; the next `finish` of a writer holding the lock
        brings them into the index. A segment that exists already is left as it is (a retried shard).
        """
        from bottleneck.features.store.write import write_segment

        return write_segment(self, name, hashes, features, paths, failures, dtype, computed_by)

    # ---- reading -----------------------------------------------------------------------------

    def segment_rows(self, name: str) -> tuple[list[str], list[Failure]]:
        """The row hashes and failures of the segment called `name`, read as they are (a shard's own segment)."""
        with h5py.File(self.segment_path(name), "r") as handle:
            return _read_hashes(handle), _read_failures(handle)

    def _open(self, path: Path) -> h5py.File:
        try:
            return h5py.File(path, "r")
        except FileNotFoundError:
            if path.parent in (self.parts_dir, self.segments_dir):  # a writer just merged it away
                raise _PartMerged(path) from None
            raise CacheError(f"feature store {path} disappeared while being read") from None
        except OSError as exc:
            if is_lock_failure(exc):
                raise CacheError(NO_HDF5_LOCKS.format(folder=path.parent)) from None
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
                raise CacheError(
                    f"the index {self.path.name} is damaged ({first_line(exc, 200)}); delete it and the next "
                    f"`bottleneck features` run rebuilds it from {self.segments_dir.name}/"
                ) from None

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
                raise CacheError(
                    f"the feature store {self.path.name} is damaged ({path.name}: {first_line(exc, 200)}); "
                    f"delete {self.path.name} and {self.segments_dir.name}/ to rebuild it"
                ) from None
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
            plan.sources.append(
                _Source(
                    path,
                    kind,
                    len(file_hashes),
                    keep,
                    kept,
                    file_failures,
                    indexed,
                    _computed_by(attrs, len(file_hashes), int(keep.size)),
                )
            )
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

    def snapshot(self) -> StoreSnapshot:
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
    def writer(
        self, lock_timeout: float | None = None, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[StoreWriter]:
        """Hold this store's lock and yield a `StoreWriter`; release the lock at exit."""
        from bottleneck.features.store.write import StoreWriter

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
            raise CacheError(
                f"rows of the feature store {self.store.path} vanished while being read (a segment was "
                "deleted?); run the command again"
            )
        self._translate = translate
