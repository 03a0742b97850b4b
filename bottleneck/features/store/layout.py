"""The store's format: its datasets and attributes, the rows of one file, and the plan of which rows of
which files make up a store (see `bottleneck.features.store` for the layout on disk)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np

from bottleneck.errors import CacheError
from bottleneck.text import printable

T = TypeVar("T")
FORMAT_VERSION = 2
DTYPES = ("float32", "float16")
#: Segments smaller than this are merged with their neighbours of similar size; larger ones are never rewritten.
SMALL_SEGMENT_BYTES = 64 * 2**20
_COPY_ROWS = 4096
_HASH_DTYPE = "S64"
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
            raise CacheError(
                "these features exceed float16's range (65504); keep this store in float32 (--dtype float32)"
            )
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
    first = max(counts, key=lambda name: counts[name])
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
    return (
        values.size > 0 and int(values[-1]) - int(values[0]) == values.size - 1 and bool(np.all(np.diff(values) == 1))
    )


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Increasing row numbers as (start, count) runs of consecutive rows."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return [(int(rows[s]), int(e - s)) for s, e in zip(starts, ends)]


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
        return (
            self.indexed and not self.missing and all(s.indexed and (s.keep.size or s.failures) for s in self.sources)
        )
