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

A shard is listed once per process (its headers only: the data is skipped) while its size and
mtime are unchanged. A shard cut short keeps the members it holds whole; one that is not a tar,
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

SHARD_SUFFIX = ".tar"
LABEL_EXTENSIONS = (".cls", ".txt", ".json")  # in the order a sample's label is taken from
_JSON_LABEL_KEYS = ("label", "class", "cls")
_LABEL_MEMBER_LIMIT = 1 << 16  # a label member larger than this is not a label
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class Member:
    """An image inside a shard: where its bytes are, and the label its sample gives."""

    shard: str  # absolute path of the .tar file
    name: str  # the member's name in the tar
    offset: int  # where its data starts in the shard
    size: int
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
    from bottleneck.features.discover import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def _scan(path: Path, handle, size: int) -> tuple[list[tarfile.TarInfo], str]:
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
    except tarfile.TarError as exc:
        problem = f"cannot be read past member {len(members)} ({exc}): those before are kept"
    return members, problem


def _read_small(handle, info: tarfile.TarInfo) -> bytes:
    handle.seek(info.offset_data)
    return handle.read(min(info.size, _LABEL_MEMBER_LIMIT))


@functools.lru_cache(maxsize=64)
def _listing(path: str, size: int, mtime_ns: int, inode: int) -> ShardListing:
    listing = ShardListing(Path(path))
    images = _image_extensions()
    stamp_of = (mtime_ns, inode)
    try:
        with open(path, "rb") as handle:
            infos, listing.problem = _scan(Path(path), handle, size)
            labels: dict[str, tuple[int, str]] = {}
            found: list[tarfile.TarInfo] = []
            for info in infos:
                if not info.isreg():
                    continue
                key, extension = sample_key(info.name)
                last = "." + extension.rsplit(".", 1)[-1] if extension else ""
                if any(part.startswith(".") for part in info.name.split("/")):
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
    last = {info.name: info for info in found}  # a name held twice: the later copy is what extraction leaves
    if len(found) > len(last):
        listing.skipped["member listed twice"] += len(found) - len(last)
    listing.members = [Member(path, info.name, info.offset_data, info.size,
                              labels.get(sample_key(info.name)[0], (0, ""))[1], (info.size, *stamp_of))
                       for info in last.values()]
    return listing


def list_shard(path: str | os.PathLike) -> ShardListing:
    """The image members of one shard (listed once per process while its size and mtime are unchanged)."""
    absolute = os.path.abspath(path)
    try:
        st = os.stat(absolute)
    except OSError as exc:
        return ShardListing(Path(absolute), problem=f"cannot read: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return ShardListing(Path(absolute), problem="not a regular file: not read")
    return _listing(absolute, st.st_size, st.st_mtime_ns, st.st_ino)


def member_of(path: str | os.PathLike) -> Member | None:
    """The shard member `path` names (`.../shard.tar/name`), or None when it names none."""
    text = os.fspath(path)
    marker = SHARD_SUFFIX + "/"
    start = 0
    while (at := text.find(marker, start)) >= 0:
        shard, name = text[: at + len(SHARD_SUFFIX)], text[at + len(marker):]
        start = at + 1
        try:
            if not stat.S_ISREG(os.stat(shard).st_mode):
                continue
        except OSError:
            continue
        return list_shard(shard).by_name().get(name)
    return None


def is_file_or_member(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file or names an image member of a tar shard."""
    return os.path.isfile(path) or member_of(path) is not None


def read_member(member: Member, limit: int) -> bytes:
    """At most `limit` + 1 bytes of the member's data (the caller refuses more than `limit`)."""
    with open(member.shard, "rb") as handle:
        if os.fstat(handle.fileno()).st_mtime_ns != member.stamp[1]:
            raise OSError(f"shard {member.shard} changed while it was read")
        return os.pread(handle.fileno(), min(member.size, limit + 1), member.offset)


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
        paths.extend(expand_pattern(pattern[: match.start()] + str(number).zfill(width) + pattern[match.end():]))
    return paths


def is_pattern(data: str | os.PathLike) -> bool:
    return _BRACES.search(os.fspath(data)) is not None
