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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bottleneck.errors import DataError
from bottleneck.features.shards import Columns

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

#: Folders that tools create beside real data and that never hold a class.
JUNK_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"})

# Pillow plugins that only identify a format and cannot decode it.
_STUB_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "FITSSTUB", "MPEG", "WMF"})


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _is_stub(fmt: str, image_class: object) -> bool:
    from PIL import ImageFile

    # Pillow marks identify-only plugins by their base class; the list covers the others (MPEG).
    stub_class = isinstance(image_class, type) and issubclass(image_class, ImageFile.StubImageFile)
    return fmt in _STUB_FORMATS or stub_class


def _readable_formats() -> set[str]:
    """Formats Pillow can decode, including those opened through another format's opener."""
    from PIL import Image, ImageFile

    readable = {fmt for fmt, (opener, _accept) in Image.OPEN.items() if not _is_stub(fmt, opener)}
    # Some formats register extensions but no opener of their own: Pillow's JPEG opener turns a
    # JPEG holding several pictures into an MpoImageFile, so MPO is never in Image.OPEN and
    # `.mpo` files were skipped. Such an image class derives from the class of the format whose
    # opener makes it.
    for cls in _subclasses(ImageFile.ImageFile):
        fmt = getattr(cls, "format", None)
        if not fmt or fmt in readable or _is_stub(fmt, cls):
            continue
        if any(getattr(base, "format", None) in readable for base in cls.__mro__[1:]):
            readable.add(fmt)
    return readable


def _pillow_extensions() -> frozenset[str]:
    from PIL import Image

    Image.init()  # imports every plugin, so their extensions and classes are all registered
    readable = _readable_formats()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in readable)


#: Lower-case extensions of every format Pillow can decode (.jpg, .png, .gif, .bmp, .webp, .tif, ...).
IMAGE_EXTENSIONS = _pillow_extensions()


@dataclass(frozen=True)
class ImageFile:
    """One image found under the data folder."""

    path: Path  # absolute
    relpath: str  # relative to the data folder, with '/' separators
    label: str  # the class folder's name, unchanged
    size: int
    mtime_ns: int
    inode: int
    dev: int = 0
    container: str = ""  # the tar or Parquet shard holding this image (`path` is inside it), "" for a file
    labels: tuple[str, ...] = ()  # a label file's labels of this image (several: multi-label); () from folders


@dataclass
class Discovery:
    """What `discover_images` found: the images, their classes, and what it skipped and why."""

    root: Path
    images: list[ImageFile]
    classes: list[str]
    skipped: Counter = field(default_factory=Counter)
    conflicts: list[str] = field(default_factory=list)  # one line per file reachable from two classes
    layout: str = "classes"  # or "split-folders", "label-file", "plain", "shards"
    folder_splits: dict[str, str] = field(default_factory=dict)  # relpath -> train/validation/test, when given
    groups: dict[str, str] = field(default_factory=dict)  # label files: relpath -> the group it shares a split with
    warnings: list[str] = field(default_factory=list)  # what a label file named but cannot be used, and the like
    label_file: Path | None = None
    shards: int = 0  # shards (tar or Parquet files) read

    @property
    def multi_label(self) -> bool:
        """Whether some image carries more than one label (a label file's `a;b`, or one row per pair)."""
        return any(len(image.labels) > 1 for image in self.images)

    def layout_line(self) -> str:
        """One line on how DATA was read, for split folders and label files ("" for class folders)."""
        if self.layout == "shards":
            parquet = sum(image.container.lower().endswith(".parquet") for image in self.images)
            kind, unit, where = (
                ("Parquet files", "file", "the label column")
                if parquet == len(self.images)
                else ("tar shards", "shard", "the samples' .cls, .txt or .json members")
                if not parquet
                else ("tar and Parquet shards", "shard", "label members and columns")
            )
            labels = f"in {len(self.classes)} classes (labels from {where})" if self.classes else "without labels"
            return f"{kind}: {self.shards} {unit}{'s' if self.shards != 1 else ''}, {len(self.images)} images {labels}"
        if self.layout == "label-file":
            per_image = sum(len(image.labels) for image in self.images) / len(self.images)
            counted = (
                f"{len(self.images)} images, {len(self.classes)} labels, multi-label ({per_image:.1f} labels per image)"
                if self.multi_label
                else f"{len(self.images)} images in {len(self.classes)} classes"
            )
            return (
                f"label file {self.label_file.name}: {counted}"
                + ("; splits from its split column" if self.folder_splits else "")
                + ("; groups from its group column" if self.groups else "")
            )
        if self.layout == "plain":
            return f"a plain folder: {len(self.images)} images, no labels (one sub-folder per class gives them)"
        if self.layout != "split-folders":
            return ""
        counts = Counter(image.relpath.split("/", 1)[0] for image in self.images)
        return (
            "split folders: "
            + ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
            + "; the sub-folders are the classes"
        )


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


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in JUNK_FOLDERS


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
    warnings, images = [], []
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
        st = listing.shard.stat() if listing.members else None
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


def relpath_or_absolute(path: Path, root: Path) -> str:
    """`path` relative to `root` with '/' separators when inside it, else absolute."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


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
