"""DATA as shards: the tar and Parquet files of a folder, of a brace pattern or one such file, and their image
members listed (read in place by `bottleneck.features.shards`) with the labels of their samples."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from bottleneck.errors import DataError
from bottleneck.features.image_files import Discovery, ImageFile, _is_hidden, relpath_or_absolute
from bottleneck.features.shards import Columns


def shards_in(folder: Path) -> list[Path]:
    """The shards (tar or Parquet files) directly in `folder`, by name."""
    from bottleneck.features.shards import SUFFIXES

    try:
        return sorted(
            Path(entry.path)
            for entry in os.scandir(folder)
            if not _is_hidden(entry.name) and entry.name.lower().endswith(SUFFIXES) and entry.is_file()
        )
    except OSError:
        return []


def shard_members(
    root: Path, shards: list[Path], columns: Columns | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[list[ImageFile], Counter, list[str]]:
    """The image members of shards (see `bottleneck.features.shards`; `columns` names a Parquet file's image and
    label columns) with their labels ("" for none), relative to `root`; what was skipped; one warning line per
    shard that could not be read whole. Listings are remembered in `cache_dir`'s hash index, where it is a folder."""
    from bottleneck.features.hashing import HashIndex
    from bottleneck.features.shards import list_shard

    skipped: Counter = Counter()
    warnings: list[str] = []
    images: list[ImageFile] = []
    index = HashIndex(cache_dir) if cache_dir is not None and os.path.isdir(cache_dir) else None
    try:
        listings = [list_shard(shard, columns, index) for shard in shards]
    finally:
        if index is not None:
            index.close()
    for shard, listing in zip(shards, listings):
        relshard = relpath_or_absolute(shard.absolute(), root)
        if listing.problem:
            warnings.append(f"shard {relshard}: {listing.problem}")
        skipped.update(listing.skipped)
        if not listing.members:
            continue  # nothing to stat
        st = listing.shard.stat()
        images.extend(
            ImageFile(
                path=Path(member.path),
                relpath=f"{relshard}/{member.name}",
                label=member.label,
                size=member.size,
                mtime_ns=st.st_mtime_ns,
                inode=st.st_ino,
                dev=st.st_dev,
                container=member.shard,
            )
            for member in listing.members
        )
    return images, skipped, warnings


def _from_shards(
    root: Path,
    shards: list[Path],
    min_classes: int,
    columns: Columns | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Discovery:
    """The image members of shards, labelled by their samples (all of them, when no sample has a label)."""
    images, skipped, warnings = shard_members(root, shards, columns, cache_dir)
    if not images:
        raise DataError(
            f"no images found in the {len(shards)} shards of {root}" + (f" ({warnings[0]})" if warnings else "")
        )
    if any(image.label for image in images):
        unlabelled = [image for image in images if not image.label]
        if unlabelled:
            skipped["image without a label member in its sample"] += len(unlabelled)
            warnings.append(
                f"{len(unlabelled)} images have no label (no .cls, .txt or .json member in their sample, "
                f"or an empty label cell) and are left out (first: {unlabelled[0].relpath})"
            )
            images = [image for image in images if image.label]
    classes = sorted({image.label for image in images if image.label})
    if classes and len(classes) < min_classes:
        raise DataError(
            f"the shards of {root} give {len(classes)} label ({', '.join(classes)}); need at least {min_classes}"
        )
    return Discovery(
        root=root,
        images=images,
        classes=classes,
        skipped=skipped,
        layout="shards",
        warnings=warnings,
        shards=len(shards),
    )


def shard_source_of(data: str) -> tuple[Path, list[Path]] | None:
    """(root, shards) when DATA names shards by a brace pattern or is one .tar or .parquet file; None otherwise."""
    from bottleneck.features.shards import SUFFIXES, expand_pattern, is_pattern

    if is_pattern(data):
        shards = expand_pattern(data)
        missing = [path for path in shards if not path.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of the {len(shards)} shards {data} names are not files (first: {missing[0]})"
            )
        return Path(os.path.commonpath([str(path.absolute().parent) for path in shards])), shards
    if data.lower().endswith(SUFFIXES) and os.path.isfile(data):
        return Path(data).absolute().parent, [Path(data)]
    return None
