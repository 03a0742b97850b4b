"""`bottleneck dump`: the cached features of DATA joined to their labels and splits, as one Parquet or npz file.

Other tools (pandas, DuckDB, Spark, R) read the file without this package: one row per image with
`path` (relative to DATA, as in split.csv), `label` (multi-label: `labels`), `split` (the split
`train-head` draws with the same flags), `content_hash` and `features`. The backbone that made the
features is recorded beside them (Parquet schema metadata; small arrays in npz).

Parquet is written a row group at a time, each group's features read from the store on their own,
so a store larger than the memory budget never sits in memory whole. npz holds one array, so it
needs the features to fit the budget. Either file is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bottleneck import __version__, naming
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import BottleneckError, disk_full, is_disk_full
from bottleneck.features.shards import Columns
from bottleneck.learn.dataset import LabelledFeatures, load_labelled_features
from bottleneck.learn.splits import SplitConfig, splits_for
from bottleneck.text import format_bytes

#: The file formats `--out` may name, by suffix.
FORMATS = (".parquet", ".npz")
#: A row group holds at most this many bytes of features: what Parquet readers handle best, even in memory.
ROW_GROUP_BYTES = 128 * 2**20


class DumpError(BottleneckError):
    """`--out` cannot be written: an unknown suffix, a folder, or features too large for npz."""


@dataclass
class DumpResult:
    """What was written: the file, its rows and columns, how many row groups (Parquet), and how long it took."""

    out: Path
    rows: int
    columns: list[str]
    feature_dim: int
    row_groups: int
    streamed: bool
    seconds: float

    def summary(self) -> dict:
        return {
            "out": str(self.out),
            "rows": self.rows,
            "columns": self.columns,
            "feature_dim": self.feature_dim,
            "row_groups": self.row_groups,
            "streamed": self.streamed,
            "seconds": round(self.seconds, 3),
        }


def checked_out(out: str | os.PathLike) -> Path:
    """`--out` as a path, refused in one line when its suffix is not .parquet or .npz or it is not a regular file."""
    target = Path(out)
    if target.suffix.lower() not in FORMATS:
        raise DumpError(f"--out {out} must end in .parquet or .npz (the format is chosen by the suffix)")
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise DumpError(f"cannot use --out {out}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        example = target / f"features{target.suffix}"
        raise DumpError(f"--out {out} is a folder: name the file to write, as --out {example}")
    if not stat.S_ISREG(mode):
        raise DumpError(
            f"--out {out} exists and is not a regular file (a link, a pipe, a device): it is never "
            "replaced; name another file"
        )
    return target


def _pyarrow():
    """pyarrow and pyarrow.parquet, or one line asking for them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DumpError(
            "writing Parquet needs pyarrow: pip install 'bottleneck-transfer[parquet]' (or pyarrow), or write .npz"
        ) from None
    return pa, pq


def splits_of(
    data: LabelledFeatures, split: SplitConfig, split_file: str | None, log: Callable[[str], None]
) -> list[str] | None:
    """Each image's split, exactly as `train-head` draws it with the same flags; None for unlabelled images."""
    if not any(data.labels):
        return None
    return splits_for(data, split, split_file, log)


def backbone_metadata(data: LabelledFeatures) -> dict[str, str | int | bool]:
    """What made the features: store fingerprint, architecture, weights, input size, pretrained or not."""
    attrs = data.attrs
    return {
        "fingerprint": str(attrs.get("fingerprint", data.store_path.stem)),
        "architecture": str(attrs.get("architecture", "")),
        "weights": str(attrs.get("weights", "")),
        "image_size": int(attrs.get("input_size", 0)),
        "pretrained": bool(attrs.get("pretrained", True)),
        "feature_dim": int(data.rows.dim),
        "bottleneck_version": __version__,
    }


def _parquet_metadata(metadata: dict) -> dict[str, str]:
    """Schema metadata is text: keys under `bottleneck.`, true/false for flags."""
    return {
        f"bottleneck.{key}": str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in metadata.items()
    }


def _text(value: str) -> str:
    """`value` as valid UTF-8 text: a file name's undecodable bytes (held as surrogates) become \\xNN escapes."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _label_column(data: LabelledFeatures) -> str:
    return "labels" if data.multi_label else "label"


def dump_features(
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    out: str | os.PathLike,
    spec: BackboneSpec | None = None,
    split: SplitConfig = SplitConfig(),
    split_file: str | None = None,
    log: Callable[[str], None] = lambda message: None,
    max_memory: int | None = None,
    stream: bool | None = None,
    chunk_rows: int | None = None,
    layout: str = "auto",
    labels: str | os.PathLike | None = None,
    columns: Columns | None = None,
) -> DumpResult:
    """Write the cached features of DATA with path, label(s), split and content hash to `out` (.parquet or .npz).

    Images are matched to the cache as `train-head` matches them (same layout, label file and backbone flags);
    images without labels get an empty label and no split. `max_memory` bounds the features held at once
    (`stream` and `chunk_rows` force streaming and its chunk size, for tests): Parquet then streams row groups
    from the store, npz is refused.
    """
    started = time.perf_counter()
    target = checked_out(out)
    parquet = target.suffix.lower() == ".parquet"
    if parquet:
        _pyarrow()  # a missing pyarrow fails before any work
    data = load_labelled_features(
        data_dir,
        cache_dir,
        spec,
        log=log,
        max_memory=max_memory,
        stream=stream,
        chunk_rows=chunk_rows,
        layout=layout,
        labels=labels,
        columns=columns,
        need_labels=False,
    )
    memory = data.memory
    streamed = bool(memory and memory.streamed)
    if memory is not None and streamed and not parquet:
        raise DumpError(
            f"the features of these {len(data.rows)} images ({format_bytes(data.rows.nbytes)}) exceed the memory "
            f"budget ({format_bytes(memory.max_memory_bytes)}) and npz holds one array: write .parquet, "
            "which is streamed in row groups, or raise --max-memory"
        )
    splits = splits_of(data, split, split_file, log)
    metadata = backbone_metadata(data)
    tmp = naming.temporary_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if parquet:
            row_groups = _write_parquet(tmp, data, splits, metadata)
        else:
            _write_npz(tmp, data, splits, metadata)
            row_groups = 0
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(target.parent) from None
        raise DumpError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:  # an interrupt or a failed read leaves no temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    names = ["path", _label_column(data), "split", "content_hash", "features"]
    return DumpResult(target, len(data.rows), names, data.rows.dim, row_groups, streamed, time.perf_counter() - started)


def _rows_per_group(data: LabelledFeatures) -> int:
    """Rows per Parquet row group: a streaming chunk (or all rows in memory), at most ROW_GROUP_BYTES of features."""
    chunk = data.memory.chunk_rows if data.memory else data.rows.chunk_rows
    return max(1, min(chunk, ROW_GROUP_BYTES // (4 * max(1, data.rows.dim))))


def _write_parquet(path: Path, data: LabelledFeatures, splits: list[str] | None, metadata: dict) -> int:
    """Write the rows in DATA's order, one row group per block, each block's features read on their own."""
    pa, pq = _pyarrow()
    label_type = pa.list_(pa.string()) if data.multi_label else pa.string()
    schema = pa.schema(
        [
            ("path", pa.string()),
            (_label_column(data), label_type),
            ("split", pa.string()),
            ("content_hash", pa.string()),
            ("features", pa.list_(pa.float32(), data.rows.dim)),
        ],
        metadata=_parquet_metadata(metadata),
    )
    step = _rows_per_group(data)
    groups = 0
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(data.rows), step):
            positions = np.arange(start, min(start + step, len(data.rows)))
            block = np.ascontiguousarray(data.rows.take(positions), dtype=np.float32)
            features = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), data.rows.dim)
            label_values = (
                [list(map(_text, data.label_sets[i])) for i in positions]
                if data.multi_label
                else [_text(data.labels[i]) for i in positions]
            )
            table = pa.Table.from_arrays(
                [
                    pa.array([_text(data.relpaths[i]) for i in positions], pa.string()),
                    pa.array(label_values, label_type),
                    pa.nulls(len(positions), pa.string())
                    if splits is None
                    else pa.array([splits[i] for i in positions], pa.string()),
                    pa.array([data.content_hashes[i] for i in positions], pa.string()),
                    features,
                ],
                schema=schema,
            )
            writer.write_table(table, row_group_size=len(positions))
            groups += 1
    return groups


def _write_npz(path: Path, data: LabelledFeatures, splits: list[str] | None, metadata: dict) -> None:
    """One array per column (text as fixed-width unicode, never objects, so `allow_pickle=False` reads it)."""
    arrays: dict[str, Any] = {  # Any: numpy's stub reads **arrays as its allow_pickle flag
        "path": np.array([_text(p) for p in data.relpaths], dtype=str),
        _label_column(data): np.array([_text(label) for label in data.labels], dtype=str),
        "split": np.array(splits if splits is not None else [""] * len(data.rows), dtype=str),
        "content_hash": np.array(data.content_hashes, dtype=str),
        "features": np.ascontiguousarray(data.rows.materialise(), dtype=np.float32),
    }
    arrays.update({key: np.array(value) for key, value in metadata.items()})  # 0-d str, int and bool arrays
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
