"""Labelled features for a data folder, read from the cache: what every training step starts from.

Training never loads the backbone or decodes an image: images are matched to store rows by
content hash (unchanged files are not even read, thanks to the hash index). Features that fit
the memory budget are read into one array; larger ones stay in the store as `FeatureRows` that
read chunk by chunk (see `bottleneck.learn.memory`).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck import naming
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import CacheError, DataError
from bottleneck.features.decode import too_large
from bottleneck.features.discover import discover_images
from bottleneck.features.hashing import HashIndex, file_stamp
from bottleneck.features.shards import Columns
from bottleneck.features.store import FeatureStore, StoreSnapshot
from bottleneck.learn.memory import MemoryBudgetError, MemoryPlan, plan_memory
from bottleneck.text import format_bytes

#: Below this share of wanted rows in a span of the store, a chunk reads only its rows, not the span.
_DENSE_ENOUGH = 0.25


class FeatureRows:
    """n rows of float32 features, held in one array or left in a store and read in chunks.

    Positions 0..n-1 are this object's own; in a store, position i is store row `rows[i]`
    (duplicates allowed: two images with one content share a row). `chunks` reads spans of
    at most `chunk_rows` consecutive store rows (one contiguous read where the span is dense
    enough), so a pass over the data holds one chunk at a time.

    Every chunk read from a store is checked as it is read: a row that is not finite (NaN or
    infinity: bit rot in a segment file, since `features` never stores such rows) stops the read
    with a one-line `CacheError` naming the store and the segment, rather than reaching
    scikit-learn or Keras. Features read whole into memory are checked once, by
    `load_labelled_features`, which leaves such images out (it reads them with `check_finite=False`).
    """

    def __init__(
        self,
        array: np.ndarray | None = None,
        *,
        store: StoreSnapshot | None = None,
        rows: np.ndarray | None = None,
        dim: int | None = None,
        chunk_rows: int = 4096,
        check_finite: bool = True,
    ):
        self.array = array
        self.check_finite = check_finite
        self.store = store
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if array is not None:
            self.dim = int(array.shape[1])
        elif dim is not None:
            self.dim = int(dim)
        else:
            raise TypeError("rows of a store need their dim")  # int(None) raised a TypeError here before
        self.chunk_rows = max(1, int(chunk_rows))
        self._groups: dict[int, list[np.ndarray]] = {}
        self._reader = store.read_rows_at if store is not None else None

    @property
    def in_memory(self) -> bool:
        return self.array is not None

    def __len__(self) -> int:
        if self.array is not None:
            return len(self.array)
        assert self.rows is not None  # not in memory: rows of a store
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    @property
    def nbytes(self) -> int:
        """Bytes of these features as float32."""
        return len(self) * self.dim * 4

    def subset(self, positions) -> FeatureRows:
        """The rows at `positions` (indices or a boolean mask), as FeatureRows of the same kind."""
        positions = np.asarray(positions)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        if self.array is not None:
            return FeatureRows(self.array[positions], chunk_rows=self.chunk_rows)
        assert self.rows is not None  # not in memory: rows of a store
        return FeatureRows(
            store=self.store,
            rows=self.rows[positions],
            dim=self.dim,
            chunk_rows=self.chunk_rows,
            check_finite=self.check_finite,
        )

    def _groups_of(self, chunk_rows: int) -> list[np.ndarray]:
        """Positions grouped by spans of at most `chunk_rows` consecutive store rows, in store order."""
        if chunk_rows not in self._groups:
            groups = []
            if self.array is not None:
                groups = [
                    np.arange(start, min(start + chunk_rows, len(self))) for start in range(0, len(self), chunk_rows)
                ]
            else:
                assert self.rows is not None  # not in memory: rows of a store
                order = np.argsort(self.rows, kind="stable")
                ordered = self.rows[order]
                i = 0
                while i < len(order):
                    end = int(np.searchsorted(ordered, ordered[i] + chunk_rows, side="left"))
                    end = min(end, i + chunk_rows)
                    groups.append(order[i:end])
                    i = end
            self._groups[chunk_rows] = groups
        return self._groups[chunk_rows]

    def batches(self, chunk_rows: int, batch_size: int) -> int:
        """How many batches `chunks(chunk_rows)` yields when each chunk is cut into `batch_size` rows."""
        return sum(-(-len(group) // batch_size) for group in self._groups_of(int(chunk_rows)))

    def _read(self, positions: np.ndarray) -> np.ndarray:
        """Features at `positions`, which lie within one span of `chunk_rows` store rows."""
        if self.array is not None:
            return self.array[positions]
        assert self.rows is not None and self._reader is not None  # not in memory: rows of a store
        rows = self.rows[positions]
        first, last = int(rows.min()), int(rows.max())
        if len(rows) >= _DENSE_ENOUGH * (last - first + 1):  # one contiguous read beats a scattered one
            block = self._reader(np.arange(first, last + 1))[rows - first]
        else:
            block = self._reader(rows)
        if self.check_finite:
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                raise CacheError(non_finite_message(self.store, rows[bad], "and a streamed read stops there"))
        return block

    def chunks(
        self, chunk_rows: int | None = None, rng: np.random.Generator | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, features) chunk by chunk; with `rng`, chunks and the rows in each come shuffled."""
        groups = self._groups_of(int(chunk_rows or self.chunk_rows))
        order = range(len(groups)) if rng is None else rng.permutation(len(groups))
        for g in order:
            positions = groups[g] if rng is None else groups[g][rng.permutation(len(groups[g]))]
            yield positions, self._read(positions)

    def take(self, positions) -> np.ndarray:
        """Features at `positions`, in that order (read chunk by chunk from a store)."""
        return self.subset(positions).materialise()

    def materialise(self) -> np.ndarray:
        """All rows as one (n, d) float32 array."""
        if self.array is not None:
            return self.array
        out = np.empty((len(self), self.dim), np.float32)
        for positions, block in self.chunks():
            out[positions] = block
        return out


@dataclass
class LabelledFeatures:
    """Features of the images under DATA that have them, with labels and relative paths."""

    relpaths: list[str]
    labels: list[str]
    rows: FeatureRows  # (n, d) float32, in memory or in the store
    store_path: Path
    attrs: dict
    missing: list[str] = field(default_factory=list)  # under DATA, not in the cache
    failed: list[str] = field(default_factory=list)  # extraction failed for these
    non_finite: list[str] = field(default_factory=list)  # left out: their stored features are NaN or infinite
    memory: MemoryPlan | None = None
    content_hashes: list[str] = field(default_factory=list)  # of each image in `relpaths`, when known
    root: Path | None = None  # DATA, or the folder of the label file that named the images
    folder_splits: dict[str, str] = field(default_factory=dict)  # split folders or a split column: relpath -> split
    groups: dict[str, str] = field(default_factory=dict)  # a label file's group column: relpath -> group
    split_source: str = "the {} folder"  # names where `folder_splits` come from (see `splits_from_folders`)
    layout: str = "classes"  # how DATA was read (see `bottleneck.features.discover`)
    columns: Columns | None = None  # a Parquet DATA's image and label columns as given (`shards.Columns`), or None
    multi_label: bool = False  # a label file gave some image several labels
    label_sets: list[tuple[str, ...]] = field(
        default_factory=list
    )  # multi-label: each image's labels (`labels` joins them)

    @property
    def classes(self) -> list[str]:
        """The labels a head learns: single-label the classes; multi-label every label any image carries."""
        if self.multi_label:
            return sorted({label for labels in self.label_sets for label in labels})
        return sorted(set(self.labels))

    @property
    def features(self) -> np.ndarray:
        """All features as one array; refused when they were left in the store for being over the memory budget."""
        if self.rows.array is None:
            raise MemoryBudgetError(
                f"the features of these {len(self.rows)} images ({format_bytes(self.rows.nbytes)}) do not fit the memory "
                f"budget ({format_bytes(self.memory.max_memory_bytes) if self.memory else '?'}): read them in chunks "
                f"(`rows.chunks()`), or a sample (`rows.take(...)`), or raise --max-memory"
            )
        return self.rows.array


def _store_path(store) -> str:
    """The path of a store or of a snapshot's store, for messages."""
    path = getattr(store, "path", None) or getattr(getattr(store, "store", None), "path", None)
    return str(path) if path is not None else "the feature store"


def damaged_segments(store, rows: np.ndarray) -> list[str]:
    """The files (segments or parts) that hold the given rows of a store snapshot, for messages; [] if unknown."""
    plan = getattr(store, "_plan", None)
    sources = getattr(plan, "sources", None)
    if sources is None:
        return []
    translate = getattr(store, "_translate", None)
    rows = np.asarray(rows, dtype=np.int64) if translate is None else translate[np.asarray(rows, dtype=np.int64)]
    found, start = [], 0
    for source in sources:
        size = source.keep.size
        if size and ((rows >= start) & (rows < start + size)).any():
            found.append(str(source.path))
        start += size
    return found


def non_finite_message(store, rows: np.ndarray, outcome: str, images: int | None = None) -> str:
    """'N images have non-finite features ... in STORE (bit rot?) OUTCOME: delete SEGMENT and ...'."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    segments = damaged_segments(store, rows)
    count = len(rows) if images is None else images
    fix = (
        f"delete the damaged segment {segments[0]}"
        if len(segments) == 1
        else f"delete the damaged segments {', '.join(segments)}"
        if segments
        else "run `bottleneck cache info` to list its segments and delete the damaged one"
    )
    return (
        f"{count} image{'s' if count != 1 else ''} ha{'ve' if count != 1 else 's'} non-finite features (NaN or infinity) "
        f"in the feature store {_store_path(store)} (bit rot?) {outcome}: {fix}, then run `bottleneck features` "
        "again to recompute them"
    )


def find_store(cache_dir: str | os.PathLike, spec: BackboneSpec | None, index: HashIndex | None = None) -> FeatureStore:
    """The store for `spec` in the cache, or the only store there when `spec` is None.

    A store counts as soon as a run committed anything to it, even if that run was killed before
    it brought its parts into the index: its features are used as `features` itself would.
    """
    from bottleneck.backbones.quantize import with_default_calibration
    from bottleneck.features.maintenance import fingerprints_in, store_of

    cache = Path(cache_dir)
    found = fingerprints_in(cache) if cache.is_dir() else []
    found = [
        name for name in found if not naming.is_views_store(name)
    ]  # augmented views belong to their backbone's store
    if not found:
        raise CacheError(
            f"no feature cache in {cache}: run `bottleneck features DATA --cache {shlex.quote(str(cache))}` first"
        )
    if spec is None:
        if len(found) > 1:
            raise CacheError(
                f"{cache} holds {len(found)} feature stores ({', '.join(found)}); pick one with the backbone "
                "flags (--backbone, --weights, --image-size)"
            )
        return store_of(cache, found[0])
    spec = with_default_calibration(spec, cache)
    if spec.precision == "int8" and spec.calibration is None:
        raise CacheError(
            f"no int8 features in {cache} yet: run `bottleneck features DATA --cache "
            f"{shlex.quote(str(cache))} --precision int8` first (it calibrates once, on DATA's images)"
        )
    fingerprint = spec.fingerprint(index.hash_file if index else None)
    if fingerprint not in found:
        raise CacheError(
            f"no features for backbone {fingerprint} in {cache}; it holds features of another backbone "
            f"({', '.join(found)}): run `bottleneck features` with these backbone flags, or use the flags of that store"
        )
    return store_of(cache, fingerprint)


def content_hashes(data_dir: str | os.PathLike, cache_dir: str | os.PathLike, relpaths: list[str]) -> list[str]:
    """The content hash of each image under DATA, from the hash index (files whose stamp changed are read)."""
    root = Path(data_dir)
    index = HashIndex(Path(cache_dir))
    try:
        return [_content_hash(index, root / relpath) for relpath in relpaths]
    finally:
        index.close()


def _content_hash(index: HashIndex, path: Path) -> str:
    """The file's content hash, or '' when it cannot be read (it then counts as failed, like in `features`).

    A file `features` never hashed that is larger than any image (a 64 GB file dropped into DATA) is
    not read either: `features` refused it the same way.
    """
    try:
        key = str(Path(path).absolute())
        stamp = file_stamp(key)
        known = index.lookup(key, stamp)
        if known is not None:
            return known
        if too_large(stamp[0]):
            return ""
        return index.hash_file(path)
    except OSError:
        return ""


def load_labelled_features(
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    spec: BackboneSpec | None = None,
    log: Callable[[str], None] = lambda message: None,
    max_memory: int | None = None,
    batch_size: int = 0,
    stream: bool | None = None,
    chunk_rows: int | None = None,
    layout: str = "auto",
    labels: str | os.PathLike | None = None,
    need_labels: bool = True,
    columns: Columns | None = None,
) -> LabelledFeatures:
    """Match the images under DATA to cached features; warn about images the cache lacks.

    The store's index matches images to rows without reading features; then the features are
    read into memory if they fit `max_memory` bytes (default: a quarter of the available memory),
    else left in the store as chunked `FeatureRows` (chunks big enough for `batch_size` rows).
    `stream` and `chunk_rows` override that choice (see `plan_memory`). `layout` is how DATA is laid
    out (see `bottleneck.features.discover`); `labels` a label file naming the images instead;
    without `need_labels` a plain folder of images (no classes) is taken too.
    """
    discovery = discover_images(data_dir, layout=layout, labels=labels, columns=columns, cache_dir=cache_dir)
    if not discovery.classes and need_labels:
        raise DataError(
            f"{discovery.root} holds images but no labels: a head needs labels, from one sub-folder per "
            "class (DATA/<class>/...), split folders of those, a .cls member beside each image in tar "
            "shards, or --labels FILE"
        )
    if discovery.layout_line():
        log(discovery.layout_line())
    for line in discovery.warnings:
        log(f"warning: {line}")
    data_dir = discovery.root
    source = shlex.quote(str(data_dir)) + (f" --labels {shlex.quote(str(labels))}" if labels is not None else "")
    cache = Path(cache_dir)
    index = HashIndex(cache) if cache.is_dir() else None
    try:
        store = find_store(cache, spec, index)
        assert index is not None  # find_store refuses a cache that is not a folder
        hashes = [_content_hash(index, image.path) for image in discovery.images]
    finally:
        if index:
            index.close()
    contents = store.snapshot()  # matches images to rows, then serves every read of those rows
    rows = contents.rows_by_hash()
    failed_hashes = {f.content_hash for f in contents.failures}
    keep, missing, failed = [], [], []
    for image, content_hash in zip(discovery.images, hashes):
        if content_hash in rows:
            keep.append((image, rows[content_hash], content_hash))
        elif not content_hash or content_hash in failed_hashes:
            failed.append(image.relpath)
        else:
            missing.append(image.relpath)
    if not keep:
        raise DataError(
            f"none of the {len(discovery.images)} images under {discovery.root} has features in {store.path}: "
            f"run `bottleneck features {source} --cache {shlex.quote(str(cache))}` with the same backbone flags"
        )
    if missing:
        log(
            f"warning: {len(missing)} images under {discovery.root} have no features in {store.path.name} "
            f"(added since extraction?) and are left out; run `bottleneck features {source} "
            f"--cache {shlex.quote(str(cache))}` with the same backbone flags to add them"
        )
    order = np.array([row for _, row, _ in keep], dtype=np.int64)
    attrs = contents.attrs
    del rows  # the index of a large store is large too
    dim = store.feature_dim
    memory = plan_memory(len(order), dim, max_memory, batch_size, stream, chunk_rows)
    features = FeatureRows(store=contents, rows=order, dim=dim, chunk_rows=memory.chunk_rows)
    non_finite: list[str] = []
    if not memory.streamed:
        features.check_finite = False  # checked here, once, to leave the damaged rows out
        array = features.materialise()
        finite = np.isfinite(array).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            non_finite = [keep[i][0].relpath for i in bad]
            if not finite.any():
                raise CacheError(
                    non_finite_message(
                        contents, order[bad], f"and no image under {discovery.root} is left to use", images=len(bad)
                    )
                )
            log(
                "warning: "
                + non_finite_message(
                    contents, order[bad], "and are left out" if len(bad) > 1 else "and is left out", images=len(bad)
                )
            )
            keep = [item for item, ok in zip(keep, finite) if ok]
            array = array[finite]
        features = FeatureRows(array, chunk_rows=memory.chunk_rows)
    return LabelledFeatures(
        relpaths=[image.relpath for image, _, _ in keep],
        labels=[image.label for image, _, _ in keep],
        content_hashes=[content_hash for _, _, content_hash in keep],
        rows=features,
        memory=memory,
        store_path=store.path,
        attrs=attrs,
        missing=missing,
        failed=failed,
        non_finite=non_finite,
        root=discovery.root,
        folder_splits=discovery.folder_splits,
        groups=discovery.groups,
        split_source="the label file's {} rows" if discovery.layout == "label-file" else "the {} folder",
        layout=discovery.layout,
        columns=columns,
        multi_label=discovery.multi_label,
        label_sets=[image.labels for image, _, _ in keep] if discovery.multi_label else [],
    )


# ---------------------------------------------------------------------------------------------
# --exclude FILE: images left out of training (an audit's exclude.txt, or a list of one's own)

#: How a name is written on one line of an exclude list: a backslash escapes what would break the line.
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t", "s": " ", "#": "#"}


def escape_listed_name(name: str) -> str:
    """`name` on one line: backslash, newline, CR and tab escaped, a leading '#' and edge spaces too."""
    text = "".join(_ESCAPES.get(c, c) for c in name)
    if text.startswith("#"):
        text = "\\" + text
    stripped = text.strip(" ")
    lead, trail = len(text) - len(text.lstrip(" ")), len(text) - len(text.rstrip(" "))
    return "\\s" * lead + stripped + "\\s" * trail if stripped else "\\s" * len(text)


def unescape_listed_name(line: str) -> str:
    """The name `escape_listed_name` wrote (a line without backslashes is the name itself)."""
    import re

    return re.sub(r"\\(.)", lambda m: _UNESCAPES.get(m.group(1), m.group(1)), line)


def read_exclude_file(path: str | os.PathLike, data_dir: str | os.PathLike) -> list[str]:
    """The images a file lists, one per line, as paths relative to DATA (the form split.csv uses).

    Lines may be relative to DATA or absolute; blank lines and lines starting with '#' are skipped; a
    backslash escapes a character a name cannot hold on its own line (\\n newline, \\\\ backslash,
    \\# a leading '#', \\s a space at either end), as the audit writes them.
    """
    root = Path(data_dir).absolute()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"cannot read --exclude {path}: {exc.strerror or exc}") from None
    listed = []
    for line in text.split("\n"):  # not splitlines(): a name may hold a form feed or a line separator
        line = line.rstrip("\r").strip(" \t")
        if not line or line.startswith("#"):
            continue
        line = unescape_listed_name(line)
        candidate = Path(line)
        if candidate.is_absolute():
            try:
                line = str(candidate.relative_to(root))
            except ValueError:
                pass  # outside DATA: reported as not found below
        listed.append(line)
    return listed


def without_excluded(
    data: LabelledFeatures, listed: list[str], source: str, kept: frozenset[str] = frozenset()
) -> tuple[LabelledFeatures, int]:
    """`data` less the images `listed` (relative to DATA) but those in `kept` (train-head keeps the test split's);
    one line if any listed image is not under DATA."""
    from bottleneck.text import printable

    known = set(data.relpaths) | set(data.failed) | set(data.missing) | set(data.non_finite)
    unknown = [p for p in listed if p not in known]
    if unknown:
        raise DataError(
            f"--exclude {source} names {len(unknown)} images that are not under DATA, first "
            f"{printable(unknown[0])}: is it the list for this folder? (paths are relative to DATA, "
            "or absolute)"
        )
    drop = set(listed) - kept
    keep = np.array([p not in drop for p in data.relpaths])
    if keep.all():
        return data, 0
    if not keep.any():
        raise DataError(f"--exclude {source} leaves no image with features to train on")
    remaining = replace(  # every other field (where the data came from, how it was split) carries over
        data,
        relpaths=[p for p, k in zip(data.relpaths, keep) if k],
        labels=[label for label, k in zip(data.labels, keep) if k],
        rows=data.rows.subset(keep),
        content_hashes=[h for h, k in zip(data.content_hashes, keep) if k],
        label_sets=[labels for labels, k in zip(data.label_sets, keep) if k],
    )
    return remaining, int((~keep).sum())
