"""Looking after a cache folder: what it holds (`cache info`), one file per store (`cache compact`),
and what can go (`cache gc`). Every change takes the store's lock, like a run that writes it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py

from bottleneck import naming
from bottleneck.errors import CacheError
from bottleneck.features.store import FeatureStore
from bottleneck.fs import exclusive_lock


def fingerprints_in(cache: Path) -> list[str]:
    """Every store in `cache`: an index file, or segments and parts left by a first run that never finished."""
    return sorted(naming.store_fingerprints(cache))


def _feature_dim(cache: Path, fingerprint: str) -> int:
    candidates = [naming.store_index(cache, fingerprint)]
    for folder in (naming.store_segments(cache, fingerprint), naming.store_parts(cache, fingerprint)):
        if folder.is_dir():
            candidates.extend(sorted(folder.glob(f"*{naming.STORE_SUFFIX}")))
    for path in candidates:
        try:
            with h5py.File(path, "r") as handle:
                if "feature_dim" in handle.attrs:
                    return int(handle.attrs["feature_dim"])
                return int(handle["features"].shape[1])
        except (OSError, KeyError, IndexError):
            continue
    raise CacheError(
        f"no readable file of the feature store {fingerprint} in {cache}; delete {fingerprint}.* to rebuild it"
    )


def store_of(cache: Path, fingerprint: str) -> FeatureStore:
    """The store `fingerprint` of a cache folder, whatever state a run left it in."""
    return FeatureStore(cache, fingerprint, _feature_dim(cache, fingerprint), {})


def _names_itself(path: Path, fingerprint: str) -> bool:
    """True if the HDF5 file at `path` carries our attributes for `fingerprint` (its own name and a format version)."""
    try:
        with h5py.File(path, "r") as handle:
            named = handle.attrs.get("fingerprint")
            named = named.decode() if isinstance(named, bytes) else named
            return named == fingerprint and "format_version" in handle.attrs
    except (OSError, ValueError, KeyError):
        return False


def is_ours(cache: Path, fingerprint: str) -> bool:
    """True if `fingerprint` in `cache` is a bottleneck store: its segment or part folders (only we make them), or
    an index file whose attributes name its own fingerprint. A user's `weights.h5` is neither."""
    if any(
        folder.is_dir()
        for folder in (naming.store_segments(cache, fingerprint), naming.store_parts(cache, fingerprint))
    ):
        return True
    return _names_itself(naming.store_index(cache, fingerprint), fingerprint)


def foreign_files(cache_dir: str | os.PathLike) -> list[Path]:
    """The `.h5` files in a cache folder that are not bottleneck stores: never read, locked or removed by us."""
    cache = Path(cache_dir)
    return sorted(naming.store_index(cache, fp) for fp in fingerprints_in(cache) if not is_ours(cache, fp))


def stores_in(cache_dir: str | os.PathLike, only: Iterable[str] = ()) -> list[FeatureStore]:
    """The stores of a cache folder (all of them, or those whose fingerprint starts with one of `only`).

    Only files that are ours count (`is_ours`): anything else in the folder is left alone.
    """
    cache = Path(cache_dir)
    if not cache.is_dir():
        raise CacheError(f"no cache folder at {cache}")
    wanted = list(only)
    found = [
        fp
        for fp in fingerprints_in(cache)
        if (not wanted or any(fp.startswith(w) for w in wanted)) and is_ours(cache, fp)
    ]
    unmatched = [w for w in wanted if not any(fp.startswith(w) for fp in found)]
    if unmatched:
        raise CacheError(
            f"no feature store {unmatched[0]!r} in {cache} (`bottleneck cache info --cache {cache}` lists them)"
        )
    return [store_of(cache, fp) for fp in found]


def store_info(store: FeatureStore) -> dict:
    """One store, as `cache info` reports it."""
    summary = store.summary()
    attrs = summary.pop("attrs")
    summary.update(
        {
            key: attrs.get(key)
            for key in ("architecture", "weights", "input_size", "feature_dim", "pretrained", "created", "updated")
        }
    )
    return summary


def compact(
    store: FeatureStore,
    dtype: str | None = None,
    lock_timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> tuple[bool, int, int]:
    """Rewrite a store into one segment; return (changed, bytes before, bytes after)."""
    before = _bytes(store.files())
    with store.writer(lock_timeout, on_wait) as writer:
        changed = writer.compact(dtype)
    return changed, before, _bytes(store.files())


@dataclass
class Garbage:
    """Something `gc` would remove, and why."""

    path: Path
    reason: str
    bytes: int

    def as_json(self) -> dict:
        return {"path": str(self.path), "reason": self.reason, "bytes": self.bytes}


def _bytes(paths: Iterable[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.exists():
            total += path.stat().st_size
    return total


def collect_garbage(
    cache_dir: str | os.PathLike, keep: set[str] | None = None, delete: bool = False
) -> tuple[list[Garbage], list[str]]:
    """What can be removed from a cache folder (removed with `delete`), and the stores skipped as busy.

    Always: temporary files of killed runs, and segments whose rows all live on in newer segments
    (left by a merge interrupted before its clean-up). With `keep` (the fingerprints runs use,
    `run_folder.referenced_fingerprints`): also every store not in it. Each store is looked at, and
    cleaned, under its lock.
    """
    cache = Path(cache_dir)
    garbage: list[Garbage] = []
    busy: list[str] = []
    stores = stores_in(cache)
    ours = [store.fingerprint for store in stores]  # before any is removed: their killed runs' files go too
    for store in stores:
        try:
            with exclusive_lock(store.lock_path, timeout=0):
                if keep is not None and store.fingerprint not in keep:
                    files = [p for p in (store.path, store.segments_dir, store.parts_dir) if p.exists()]
                    found = [Garbage(p, "no run under --runs uses this store", _bytes([p])) for p in files]
                else:
                    found = _leftovers(store)
                if delete:
                    _remove(found)
                garbage.extend(found)
            if delete and keep is not None and store.fingerprint not in keep:
                store.lock_path.unlink(missing_ok=True)
        except CacheError:
            busy.append(store.fingerprint)
    # Only temporary files named after one of our stores (and not one being written): a user's .*.tmp is theirs.
    stray = [
        Garbage(tmp, "temporary file of a run that was killed", _bytes([tmp]))
        for tmp in cache.glob(naming.TEMPORARY_GLOB)
        if any(tmp.name.startswith(f".{fp}.") for fp in ours) and not any(tmp.name.startswith(f".{fp}.") for fp in busy)
    ]
    if delete:
        _remove(stray)
    return garbage + stray, busy


def _leftovers(store: FeatureStore) -> list[Garbage]:
    found: list[Garbage] = []
    for folder in (store.segments_dir, store.parts_dir):
        if folder.is_dir():
            found.extend(
                Garbage(p, "temporary file of a run that was killed", _bytes([p]))
                for p in folder.glob(naming.TEMPORARY_GLOB)
            )
    plan = store._reading(store._plan)
    for source in plan.sources:
        if source.kind == "segment" and not source.indexed and not source.keep.size and not source.failures:
            found.append(
                Garbage(source.path, "every row is in a newer segment (an interrupted merge)", _bytes([source.path]))
            )
    return found


def _remove(garbage: list[Garbage]) -> None:
    for item in garbage:
        if item.path.is_dir():
            shutil.rmtree(item.path, ignore_errors=True)
        else:
            item.path.unlink(missing_ok=True)
