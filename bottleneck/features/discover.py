"""Find the labelled images of DATA: one sub-folder per class, split folders of those, shards, or a label file.

DATA is laid out one of two ways: `classes` (`DATA/<class>/...`) or `split-folders`
(`DATA/{train, val|valid|validation, test}/<class>/...`, any case, as most image sets are
downloaded); `auto` tells them apart and asks for `--layout` when it cannot. A `plain` folder
(images and folders of them, no labels: what `features`, `predict` and `compare` can use) is
what `auto` takes DATA with images at its top and no sub-folders for. In split folders the
sub-folders are the classes and the top folders the splits (`Discovery.folder_splits`). DATA
may also be `shards`: a folder of webdataset tar shards or Parquet files of image bytes, one such
file, or a brace pattern of them (`train-{000..099}.tar`), their images read in place (see
`bottleneck.features.shards`); `auto` takes a folder holding only such files for them.
Nested folders inside a class folder belong to that class. Hidden files and folders are
skipped, so are files whose extension no image reader claims. Each file is listed once even
when it is reachable twice (symbolic or hard links, `a.jpg` and `A.JPG` on a case-insensitive
disk): files are identified by device and inode.

A file reachable from two class folders never gets its label from the order of the walk: where
exactly one of its paths involves no symbolic link, that path's class wins and the links are left
out and reported; otherwise (hard links, two links) the file is a conflict, left out of every
class and reported.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from bottleneck.errors import DataError
from bottleneck.features.image_files import IMAGE_EXTENSIONS, Discovery, ImageFile, _is_hidden, relpath_or_absolute
from bottleneck.features.shard_discovery import _from_shards, shard_members, shard_source_of, shards_in
from bottleneck.features.shards import Columns

#: What other modules import from here, wherever it lives (`image_files`, `shard_discovery`).
__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "SPLIT_FOLDERS",
    "Discovery",
    "ImageFile",
    "choose_layout",
    "discover_images",
    "holds_images",
    "relpath_or_absolute",
    "shard_members",
    "shard_source_of",
    "shards_in",
    "walk_images",
]

#: Folder names (compared in lower case) that hold a split rather than a class, and the split they hold.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
    "testing": "test",
}
LAYOUTS = ("auto", "classes", "split-folders", "plain", "shards")
#: A file in two split folders (a link) is held out: the most held-out split wins.
_HELD_OUT_FIRST = ("test", "validation", "train")

LINKED_FROM_ANOTHER_CLASS = "link into another class (left out)"
IN_TWO_CLASSES = "in two classes (left out)"


def _settle_labels(found: list[tuple[ImageFile, bool]], skipped: Counter) -> tuple[list[ImageFile], list[str]]:
    """One entry per file; a file reachable from two classes is settled by its real path, or left out."""
    by_file: dict[tuple[int, int], list[tuple[ImageFile, bool]]] = {}
    for image, real in found:
        by_file.setdefault((image.dev, image.inode), []).append((image, real))
    images, conflicts = [], []
    for copies in by_file.values():
        copies.sort(key=lambda c: c[0].relpath)
        labels = {image.label for image, _ in copies}
        if len(labels) == 1:
            images.append(next((image for image, real in copies if real), copies[0][0]))
            if len(copies) > 1:
                skipped["same file listed twice"] += len(copies) - 1
            continue
        real_files = [image for image, is_real in copies if is_real]
        if len(real_files) == 1 or len({image.label for image in real_files}) == 1:
            winner = real_files[0]
            images.append(winner)
            links = [image for image, _ in copies if image.label != winner.label]
            skipped[LINKED_FROM_ANOTHER_CLASS] += len(links)
            if len(copies) - 1 > len(links):
                skipped["same file listed twice"] += len(copies) - 1 - len(links)
            conflicts.append(
                f"{links[0].relpath} links to {winner.relpath} (class {winner.label!r}): "
                f"the link is left out" + (f" (and {len(links) - 1} more links)" if len(links) > 1 else "")
            )
        else:
            skipped[IN_TWO_CLASSES] += len(copies)
            conflicts.append(
                f"{' and '.join(image.relpath for image, _ in copies[:3])} are one file in classes "
                f"{', '.join(repr(label) for label in sorted(labels))}: left out of every class"
            )
    return images, conflicts


def _walk_class(
    class_dir: Path, root: Path, label: str, seen: set | None, skipped: Counter, real_root: str | None = None
) -> list[tuple[ImageFile, bool]]:
    """Every image file under `class_dir`, with whether its path involves no symbolic link.

    With `seen`, a file already in it is skipped (and added to it otherwise); without, every path is kept.
    """
    found: list[tuple[ImageFile, bool]] = []
    pending = [class_dir]
    visited_dirs: set[tuple[int, int]] = set()
    while pending:
        folder = pending.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in visited_dirs:  # a symlink loop
                continue
            visited_dirs.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            skipped["unreadable folder"] += 1
            continue
        for entry in entries:
            if _is_hidden(entry.name):
                skipped["hidden"] += 1
                continue
            try:
                if entry.is_dir():
                    pending.append(Path(entry.path))
                    continue
                if not entry.is_file():
                    skipped["not a regular file"] += 1
                    continue
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                    skipped["not an image extension"] += 1
                    continue
                st = entry.stat()
            except OSError:
                skipped["unreadable entry"] += 1
                continue
            key = (st.st_dev, st.st_ino)
            if seen is not None:
                if key in seen:
                    skipped["same file listed twice"] += 1
                    continue
                seen.add(key)
            path = Path(entry.path)
            relpath = path.relative_to(root).as_posix()
            real = real_root is not None and os.path.realpath(path) == os.path.join(real_root, *relpath.split("/"))
            image = ImageFile(
                path=path.absolute(),
                relpath=relpath,
                label=label,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                inode=st.st_ino,
                dev=st.st_dev,
            )
            found.append((image, real))
    return found


def holds_images(folder: Path) -> bool:
    try:
        return any(
            entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            for entry in os.scandir(folder)
            if not _is_hidden(entry.name)
        )
    except OSError:
        return False


def _holds_folders(folder: str) -> bool:
    try:
        return any(entry.is_dir() and not _is_hidden(entry.name) for entry in os.scandir(folder))
    except OSError:
        return False


def choose_layout(root: Path, top_dirs: list[os.DirEntry], layout: str = "auto") -> str:
    """`classes`, `split-folders`, `plain` or `shards` for DATA's top folders; `auto` decides, or asks for `--layout`."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown --layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if layout in ("classes", "plain", "shards"):
        return layout
    named = [entry.name for entry in top_dirs if entry.name.lower() in SPLIT_FOLDERS]
    others = [entry.name for entry in top_dirs if entry.name.lower() not in SPLIT_FOLDERS]
    has_train = any(SPLIT_FOLDERS[name.lower()] == "train" for name in named)
    if layout == "split-folders":
        if others or not has_train:
            found = f"it also holds {', '.join(others[:3])}" if others else "it has no train folder"
            raise DataError(
                f"--layout split-folders: the top folders of {root} must be train and optionally val "
                f"(or valid, validation) and test, each holding one sub-folder per class; {found}"
            )
        return layout
    if not named:
        if top_dirs or not (holds_images(root) or shards_in(root)):
            return "classes"
        return "plain" if holds_images(root) else "shards"
    flat = [name for name in named if not _holds_folders(str(root / name))]
    if not others and has_train and not flat:
        return "split-folders"
    why = (
        f"beside {', '.join(others[:3])}"
        if others
        else "without a train folder"
        if not has_train
        else f"but {flat[0]} holds images, not class folders"
    )
    raise DataError(
        f"cannot tell how {root} is laid out: {', '.join(named)} look like split folders, {why}; pass "
        "--layout split-folders (DATA/train/<class>/...) or --layout classes (DATA/<class>/...)"
    )


def _walk_split_folder(split_dir: Path, root: Path, skipped: Counter, real_root: str) -> list[tuple[ImageFile, bool]]:
    """The images of one split folder: each sub-folder is a class."""
    found: list[tuple[ImageFile, bool]] = []
    try:
        entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    except OSError:
        skipped["unreadable folder"] += 1
        return found
    for entry in entries:
        if _is_hidden(entry.name):
            skipped["hidden"] += 1
        elif entry.is_dir():
            found.extend(_walk_class(Path(entry.path), root, entry.name, None, skipped, real_root))
        else:
            skipped["outside a class folder"] += 1
    return found


def _folder_splits(found: list[tuple[ImageFile, bool]], images: list[ImageFile]) -> dict[str, str]:
    """Each image's split from its top folder; a file in two split folders gets the most held-out one."""
    splits_of_file: dict[tuple[int, int], set[str]] = {}
    for image, _ in found:
        split = SPLIT_FOLDERS[image.relpath.split("/", 1)[0].lower()]
        splits_of_file.setdefault((image.dev, image.inode), set()).add(split)
    return {
        image.relpath: next(s for s in _HELD_OUT_FIRST if s in splits_of_file[(image.dev, image.inode)])
        for image in images
    }


def _from_label_file(data_dir: str | os.PathLike | None, labels: str | os.PathLike, min_classes: int) -> Discovery:
    """The images a label file names (see `bottleneck.features.label_file`), relative to DATA or to the file's folder."""
    from bottleneck.features.label_file import listed_images

    root = Path(data_dir if data_dir is not None else Path(labels).parent).absolute()
    if data_dir is not None and not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    listed, problems = listed_images(labels, root)
    images = sorted(
        (
            ImageFile(
                item.path,
                item.relpath,
                item.label,
                item.stat.st_size,
                item.stat.st_mtime_ns,
                item.stat.st_ino,
                item.stat.st_dev,
                container=item.container,
                labels=item.labels,
            )
            for item in listed
        ),
        key=lambda im: im.relpath,
    )
    classes = sorted({label for image in images for label in image.labels})
    if not images:
        raise DataError(
            f"label file {labels} names no usable image"
            + (f" ({'; '.join(problems.lines(Path(labels).name))})" if problems.counts else "")
        )
    if len(classes) < min_classes:
        raise DataError(
            f"label file {labels} gives {len(classes)} label ({', '.join(classes)}); need at least {min_classes}"
        )
    warnings = problems.lines(Path(labels).name)
    if data_dir is not None:  # images under DATA the file does not name are counted, never dropped silently
        named = {(image.dev, image.inode) for image in images}
        under = sorted(
            (image for image in walk_images(root, root, "", set(), Counter()) if (image.dev, image.inode) not in named),
            key=lambda image: image.relpath,
        )
        if under:
            warnings.append(
                f"{len(under)} images under {root} are not in {Path(labels).name} and are left out (first: "
                + ", ".join(image.relpath for image in under[:3])
                + ")"
            )
    splits = {item.relpath: item.split for item in listed}
    folder_splits = {path: split or "train" for path, split in splits.items()} if any(splits.values()) else {}
    return Discovery(
        root=root,
        images=images,
        classes=classes,
        skipped=problems.counts,
        layout="label-file",
        folder_splits=folder_splits,
        groups={item.relpath: item.group for item in listed if item.group},
        warnings=warnings,
        label_file=Path(labels).absolute(),
    )


def discover_images(
    data_dir: str | os.PathLike | None,
    min_classes: int = 2,
    layout: str = "auto",
    labels: str | os.PathLike | None = None,
    columns: Columns | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Discovery:
    """List the images under `data_dir` (see the module's note on layouts), or those a label file names;
    raise `DataError` if unusable. `columns` (`shards.Columns`) names a Parquet file's image and label columns;
    `cache_dir`, where given, remembers the listings of shards."""
    if labels is not None:
        return _from_label_file(data_dir, labels, min_classes)
    if data_dir is None:
        raise DataError("give DATA (a folder of images) or --labels FILE")
    shard_source = shard_source_of(os.fspath(data_dir))
    if shard_source is not None:
        return _from_shards(*shard_source, min_classes, columns, cache_dir)
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    root = root.absolute()
    skipped: Counter = Counter()
    found: list[tuple[ImageFile, bool]] = []
    real_root = os.path.realpath(root)
    try:
        top = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot read data folder {root}: {exc.strerror or exc}") from None
    chosen = choose_layout(root, [entry for entry in top if entry.is_dir() and not _is_hidden(entry.name)], layout)
    if chosen == "shards":
        return _from_shards(root, shards_in(root), min_classes, columns, cache_dir)
    if chosen == "plain":  # every image under DATA, without a label
        images = sorted(
            (image for image, _ in _walk_class(root, root, "", set(), skipped, real_root)), key=lambda im: im.relpath
        )
        if not images:
            raise DataError(f"no images found in {root}")
        return Discovery(root=root, images=images, classes=[], skipped=skipped, layout="plain")
    for entry in top:
        if _is_hidden(entry.name):
            skipped["hidden"] += 1
        elif entry.is_dir() and chosen == "split-folders":
            found.extend(_walk_split_folder(Path(entry.path), root, skipped, real_root))
        elif entry.is_dir():
            found.extend(_walk_class(Path(entry.path), root, entry.name, None, skipped, real_root))
        else:
            skipped["outside a class folder"] += 1
    images, conflicts = _settle_labels(found, skipped)
    images.sort(key=lambda im: im.relpath)
    classes = sorted({im.label for im in images})
    where = "one sub-folder per class" + (" in each split folder" if chosen == "split-folders" else "")
    if not images:
        raise DataError(f"no images found in {root} (expected {where} holding image files)")
    if len(classes) < min_classes:
        raise DataError(
            f"found {len(classes)} class folder with images in {root} ({', '.join(classes)}); "
            f"need at least {min_classes}, {where}"
        )
    folder_splits = _folder_splits(found, images) if chosen == "split-folders" else {}
    return Discovery(
        root=root,
        images=images,
        classes=classes,
        skipped=skipped,
        conflicts=conflicts,
        layout=chosen,
        folder_splits=folder_splits,
    )


def walk_images(folder: Path, root: Path, label: str, seen: set, skipped: Counter) -> list[ImageFile]:
    """The image files under `folder` (recursively), each once across calls sharing `seen`; skips are counted."""
    return [image for image, _ in _walk_class(folder, root, label, seen, skipped)]
