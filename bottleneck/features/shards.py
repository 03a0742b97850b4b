"""Webdataset tar shards: images kept as members of plain `.tar` files, a sample per key.

A shard holds samples; the members of one sample share a key (the member's name up to the first
dot of its base name: `dir/0001.jpg`, `dir/0001.cls`). The image is the member whose extension
Pillow reads; the label comes from the sample's `.cls`, `.txt` or `.json` member (`"label"`,
`"class"` or `"cls"`), in that order. An image member is addressed as a path inside its shard,
`/data/shard-000.tar/dir/0001.jpg`, so every consumer (the hash index, the engines, predict,
the report's thumbnails, export's parity check) reads it through the same guarded reader as a
file: `member_of` finds it, `read_member` reads its bytes at their offset in the shard, never
more than the size limit. A member's stamp is its own size with the shard's mtime and inode: an
unchanged shard is settled from the hash index without reading an image.

Parquet files with a column of image bytes are shards too (`.../part-0.parquet/image/123`: the
column and the row): the image column is `--image-column`, else the one column of bytes (or of
Hugging Face's `{bytes, path}` structs); the label column is `--label-column`, else `label` when
there is one (a Hugging Face ClassLabel's integers become its names). A row group is read once
for the images it holds, not once per image.

A shard is listed once (its headers only: the data is skipped) while its size and mtime are
unchanged: the cache's hash index remembers the listing, so an unchanged rerun reads neither a
header nor an image of it. A shard cut short keeps the members it holds whole; one that is not a tar,
or is compressed (its members have no offset to read at), is one line and the rest go on.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bottleneck.errors import DataError
from bottleneck.text import first_line

SHARD_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
SUFFIXES = (SHARD_SUFFIX, PARQUET_SUFFIX)
LABEL_EXTENSIONS = (".cls", ".txt", ".json")  # in the order a sample's label is taken from
_JSON_LABEL_KEYS = ("label", "class", "cls")
_LABEL_MEMBER_LIMIT = 1 << 16  # a label member larger than this is not a label
#: Member names that no path inside the shard can hold: a normalised path would leave the shard, or none exists.
UNSAFE_NAME = "member name with an empty, . or .. part, or a NUL"
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class Member:
    """An image inside a shard: where its bytes are, and the label its sample gives."""

    shard: str  # absolute path of the tar or Parquet file
    name: str  # the member's name in the tar; `column/row` in Parquet
    offset: int  # where its data starts in the tar; its row in Parquet
    size: int  # 0 in Parquet: a cell's size is known once its row group is read
    label: str  # "" when its sample has no label member
    stamp: tuple[int, int, int]  # (member size, shard mtime_ns, shard inode): the hash index's key

    @property
    def path(self) -> str:
        return f"{self.shard}/{self.name}"


@dataclass
class ShardListing:
    """A shard's image members and what was left out of it, and why."""

    shard: Path
    members: list[Member] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    problem: str = ""  # the shard as a whole: not a tar, compressed, cut short

    @functools.cached_property
    def by_name(self) -> dict[str, Member]:
        return {member.name: member for member in self.members}


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name as webdataset groups them: `a/b.seg.jpg` -> (`a/b`, `.seg.jpg`)."""
    folder, _, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + rest).lower()


def _label_of(extension: str, data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    if extension != ".json":
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return ""
    if isinstance(value, dict):
        value = next((value[key] for key in _JSON_LABEL_KEYS if key in value), None)
    return "" if value is None or isinstance(value, (dict, list)) else str(value).strip()


def _image_extensions() -> frozenset[str]:
    from bottleneck.features.image_files import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def _scan(handle, size: int) -> tuple[list[tarfile.TarInfo], str]:
    """The shard's regular members whose data lies whole within the file, and why the scan stopped early."""
    members: list[tarfile.TarInfo] = []
    problem = ""
    try:
        with tarfile.open(fileobj=handle, mode="r:") as archive:
            while True:
                info = archive.next()
                if info is None:
                    break
                if info.offset_data + info.size > size:
                    problem = f"cut short at {info.name!r}: the members before it are kept"
                    break
                members.append(info)
    except tarfile.ReadError as exc:
        if not members:
            raise DataError(f"not a plain tar file ({exc}): webdataset shards are uncompressed .tar") from None
        problem = f"cut short after {len(members)} members ({exc}): those are kept"
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as exc:  # a hostile header raises any of these
        problem = f"cannot be read past member {len(members)} ({exc}): those before are kept"
    return members, problem


def _read_small(handle, info: tarfile.TarInfo) -> bytes:
    handle.seek(info.offset_data)
    return handle.read(min(info.size, _LABEL_MEMBER_LIMIT))


def _listing(path: str, size: int, mtime_ns: int, inode: int) -> ShardListing:
    listing = ShardListing(Path(path))
    images = _image_extensions()
    stamp_of = (mtime_ns, inode)
    try:
        with open(path, "rb") as handle:
            infos, listing.problem = _scan(handle, size)
            labels: dict[str, tuple[int, str]] = {}
            found: list[tarfile.TarInfo] = []
            for info in infos:
                if not info.isreg():  # folders are names only; links and devices are never followed
                    if not info.isdir():
                        listing.skipped["not a regular member (a link or device)"] += 1
                    continue
                key, extension = sample_key(info.name)
                last = "." + extension.rsplit(".", 1)[-1] if extension else ""
                parts = info.name.split("/")
                if "\0" in info.name or any(part in ("", ".", "..") for part in parts):  # no path to it stays inside
                    listing.skipped[UNSAFE_NAME] += 1
                elif any(part.startswith(".") for part in parts):
                    listing.skipped["hidden"] += 1
                elif last in images:
                    found.append(info)
                elif extension in LABEL_EXTENSIONS and info.size <= _LABEL_MEMBER_LIMIT:
                    rank = LABEL_EXTENSIONS.index(extension)
                    if key not in labels or rank < labels[key][0]:
                        labels[key] = (rank, _label_of(extension, _read_small(handle, info)))
                else:
                    listing.skipped["not an image member"] += 1
    except DataError as exc:
        listing.problem = str(exc)
        return listing
    except OSError as exc:
        listing.problem = f"cannot read: {exc.strerror or exc}"
        return listing
    latest = {info.name: info for info in found}  # a name held twice: the later copy is what extraction leaves
    if len(found) > len(latest):
        listing.skipped["member listed twice"] += len(found) - len(latest)
    listing.members = [
        Member(
            path,
            info.name,
            info.offset_data,
            info.size,
            labels.get(sample_key(info.name)[0], (0, ""))[1],
            (info.size, *stamp_of),
        )
        for info in latest.values()
    ]
    return listing


def list_shard(path: str | os.PathLike, columns: Columns | None = None, index=None) -> ShardListing:
    """The image members of one shard, a tar or a Parquet file; `columns` names a Parquet file's image and label
    columns. Listed once per process while its size and mtime are unchanged, and once for good where `index`
    (the cache's `HashIndex`) remembers the listing."""
    absolute = os.path.abspath(path)
    try:
        st = os.stat(absolute)
    except OSError as exc:
        return ShardListing(Path(absolute), problem=f"cannot read: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return ShardListing(Path(absolute), problem="not a regular file: not read")
    parquet = absolute.lower().endswith(PARQUET_SUFFIX)
    columns = columns or Columns()
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    key = f"{absolute}\0{columns.image or ''}\0{columns.label or ''}" if parquet else absolute
    listing = _LISTED.get((key, stamp))
    if listing is None:
        remembered = index.shard_listing(key, stamp) if index is not None else None
        if remembered is not None:
            listing = _listing_from_text(absolute, remembered, st)
        else:
            listing = _parquet_listing(absolute, *stamp, columns) if parquet else _listing(absolute, *stamp)
            if index is not None:
                index.remember_shard_listing(key, stamp, _listing_as_text(listing))
        _keep_listed((key, stamp), listing)
    elif index is not None and index.shard_listing(key, stamp) is None:
        index.remember_shard_listing(key, stamp, _listing_as_text(listing))
    return listing


#: Listings made or read in this process, by shard (and Parquet columns) and stamp: the readers of members
#: (engines, hashing, predict) find them here. Bounded: the oldest go first.
_LISTED: dict[tuple, ShardListing] = {}
_LISTED_MAX = 256


def _keep_listed(key: tuple, listing: ShardListing) -> None:
    while len(_LISTED) >= _LISTED_MAX:
        del _LISTED[next(iter(_LISTED))]
    _LISTED[key] = listing


def _listing_as_text(listing: ShardListing) -> str:
    return json.dumps(
        {
            "members": [[m.name, m.offset, m.size, m.label] for m in listing.members],
            "skipped": dict(listing.skipped),
            "problem": listing.problem,
        },
        separators=(",", ":"),
    )


def _listing_from_text(path: str, text: str, st: os.stat_result) -> ShardListing:
    saved = json.loads(text)
    parquet = path.lower().endswith(PARQUET_SUFFIX)
    members = [
        Member(path, name, offset, size, label, (0 if parquet else size, st.st_mtime_ns, st.st_ino))
        for name, offset, size, label in saved["members"]
    ]
    return ShardListing(Path(path), members, Counter(saved["skipped"]), saved["problem"])


def member_of(path: str | os.PathLike) -> Member | None:
    """The shard member `path` names (`.../shard.tar/name`, `.../file.parquet/column/row`), or None."""
    text = os.fspath(path)
    for suffix in SUFFIXES:
        marker, start = suffix + "/", 0
        while (at := text.find(marker, start)) >= 0:
            shard, name = text[: at + len(suffix)], text[at + len(marker) :]
            start = at + 1
            try:
                if not stat.S_ISREG(os.stat(shard).st_mode):
                    continue
            except OSError:
                continue
            if suffix == PARQUET_SUFFIX:
                return _parquet_member(shard, name)
            return list_shard(shard).by_name.get(name)
    return None


def is_file_or_member(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file or names an image member of a shard."""
    return os.path.isfile(path) or member_of(path) is not None


def read_member(member: Member, limit: int) -> bytes:
    """At most `limit` + 1 bytes of the member's data (the caller refuses more than `limit`)."""
    if member.shard.endswith(PARQUET_SUFFIX):
        return _parquet_cell(member)[: limit + 1]
    with open(member.shard, "rb") as handle:
        if os.fstat(handle.fileno()).st_mtime_ns != member.stamp[1]:
            raise OSError(f"shard {member.shard} changed while it was read")
        return os.pread(handle.fileno(), min(member.size, limit + 1), member.offset)


# ---------------------------------------------------------------------------------------------
# Parquet files with a column of image bytes


@dataclass(frozen=True)
class Columns:
    """Which Parquet columns hold the images and the labels (None: found as the module's note says)."""

    image: str | None = None
    label: str | None = None


def _image_column_kind(field_type) -> str:
    """'bytes' for a binary column, 'struct' for a struct with a binary `bytes` field, '' otherwise."""
    import pyarrow as pa

    if pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type):
        return "bytes"
    if pa.types.is_struct(field_type):
        names = [field_type.field(i).name for i in range(field_type.num_fields)]
        if "bytes" in names and _image_column_kind(field_type.field(names.index("bytes")).type) == "bytes":
            return "struct"
    return ""


def _choose_image_column(schema, asked: str | None) -> str:
    if asked is not None:
        if asked not in schema.names:
            raise DataError(f"no column {asked!r} (it has {', '.join(schema.names[:8])})")
        if not _image_column_kind(schema.field(asked).type):
            raise DataError(
                f"column {asked!r} holds {schema.field(asked).type}, not image bytes (binary, or a struct "
                "with a binary bytes field)"
            )
        return asked
    found = [name for name in schema.names if _image_column_kind(schema.field(name).type)]
    if len(found) != 1:
        which = f"several ({', '.join(found[:4])})" if found else "none"
        raise DataError(f"needs one column of image bytes and has {which}: name it with --image-column")
    return found[0]


def _class_names(schema, column: str) -> list[str] | None:
    """A Hugging Face ClassLabel's names for `column`, from the file's metadata, or None."""
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
        feature = features[column]
        return [str(name) for name in feature["names"]] if feature.get("_type") == "ClassLabel" else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _label_values(handle, schema, asked: str | None) -> list[str]:
    column = asked if asked is not None else next((name for name in schema.names if name.lower() == "label"), None)
    if column is None:
        return []
    if column not in schema.names:
        raise DataError(f"no column {column!r} (it has {', '.join(schema.names[:8])})")
    values = handle.read(columns=[column]).column(0).to_pylist()
    names = _class_names(schema, column)
    if names is not None:
        return [names[v] if isinstance(v, int) and 0 <= v < len(names) else "" for v in values]
    if any(isinstance(v, (dict, list, bytes)) for v in values if v is not None):
        raise DataError(f"column {column!r} holds {schema.field(column).type}, not labels (text or numbers)")
    return ["" if v is None else str(v).strip() for v in values]


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "reading Parquet needs pyarrow: pip install 'bottleneck-transfer[parquet]' (or pyarrow)"
        ) from None
    return pq


@functools.lru_cache(maxsize=64)
def _parquet_layout(path: str, mtime_ns: int) -> tuple:
    """(schema, the first row of each row group, the number of rows) of a Parquet file."""
    pq = _pyarrow_parquet()

    handle = pq.ParquetFile(path)
    starts, total = [], 0
    for group in range(handle.metadata.num_row_groups):
        starts.append(total)
        total += handle.metadata.row_group(group).num_rows
    return handle.schema_arrow, tuple(starts), total


def _parquet_listing(path: str, size: int, mtime_ns: int, inode: int, columns: Columns) -> ShardListing:
    listing = ShardListing(Path(path))
    try:
        pq = _pyarrow_parquet()
        schema, _, total = _parquet_layout(path, mtime_ns)
        image = _choose_image_column(schema, columns.image)
        labels = _label_values(pq.ParquetFile(path), schema, columns.label)
    except DataError as exc:
        listing.problem = str(exc)
        return listing
    except (OSError, ValueError, NotImplementedError) as exc:  # what pyarrow raises derives from these
        listing.problem = f"not a readable Parquet file ({first_line(exc)})"
        return listing
    listing.members = [
        Member(path, f"{image}/{row}", row, 0, labels[row] if labels else "", (0, mtime_ns, inode))
        for row in range(total)
    ]
    return listing


def _parquet_member(path: str, name: str) -> Member | None:
    column, _, row = name.rpartition("/")
    try:
        st = os.stat(path)
        schema, _, total = _parquet_layout(path, st.st_mtime_ns)
    except (OSError, ValueError, NotImplementedError, DataError):
        return None
    if (
        not row.isdigit()
        or int(row) >= total
        or column not in schema.names
        or not _image_column_kind(schema.field(column).type)
    ):
        return None
    return Member(path, name, int(row), 0, "", (0, st.st_mtime_ns, st.st_ino))


@functools.lru_cache(maxsize=4)  # a row group at a time, for the threads reading its images in order
def _row_group_cells(path: str, mtime_ns: int, group: int, column: str) -> list:
    values = _pyarrow_parquet().ParquetFile(path).read_row_group(group, columns=[column]).column(0)
    if _image_column_kind(values.type) == "struct":
        values = values.combine_chunks().field("bytes")
    return values.to_pylist()


def _parquet_cell(member: Member) -> bytes:
    import bisect

    column, _, row = member.name.rpartition("/")
    try:
        _, starts, _ = _parquet_layout(member.shard, member.stamp[1])
        group = bisect.bisect_right(starts, member.offset) - 1
        cell = _row_group_cells(member.shard, member.stamp[1], group, column)[member.offset - starts[group]]
    except (ValueError, NotImplementedError) as exc:
        raise OSError(f"cannot read row {row} of {member.shard}: {first_line(exc)}") from None
    if os.stat(member.shard).st_mtime_ns != member.stamp[1]:
        raise OSError(f"{member.shard} changed while it was read")
    if cell is None:
        raise OSError(f"row {row} of column {column!r} is empty")
    return cell


def expand_pattern(pattern: str) -> list[Path]:
    """The shards a brace pattern names (`train-{000..009}.tar`), in order; one without braces is itself."""
    match = _BRACES.search(pattern)
    if match is None:
        return [Path(pattern)]
    low, high = match.group(1), match.group(2)
    width = len(low) if low.startswith("0") or len(low) == len(high) else 0
    if int(high) < int(low):
        raise DataError(f"the pattern {pattern} counts down ({low}..{high}); write the lower number first")
    paths = []
    for number in range(int(low), int(high) + 1):
        paths.extend(expand_pattern(pattern[: match.start()] + str(number).zfill(width) + pattern[match.end() :]))
    return paths


def is_pattern(data: str | os.PathLike) -> bool:
    return _BRACES.search(os.fspath(data)) is not None
