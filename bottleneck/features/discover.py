"""Find the labelled images under a data folder: one sub-folder per class.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bottleneck.errors import DataError

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


@dataclass
class Discovery:
    """What `discover_images` found: the images, their classes, and what it skipped and why."""

    root: Path
    images: list[ImageFile]
    classes: list[str]
    skipped: Counter = field(default_factory=Counter)
    conflicts: list[str] = field(default_factory=list)  # one line per file reachable from two classes


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
        real = [image for image, is_real in copies if is_real]
        if len(real) == 1 or len({image.label for image in real}) == 1:
            winner = real[0]
            images.append(winner)
            links = [image for image, _ in copies if image.label != winner.label]
            skipped[LINKED_FROM_ANOTHER_CLASS] += len(links)
            if len(copies) - 1 > len(links):
                skipped["same file listed twice"] += len(copies) - 1 - len(links)
            conflicts.append(f"{links[0].relpath} links to {winner.relpath} (class {winner.label!r}): "
                             f"the link is left out" + (f" (and {len(links) - 1} more links)" if len(links) > 1 else ""))
        else:
            skipped[IN_TWO_CLASSES] += len(copies)
            conflicts.append(f"{' and '.join(image.relpath for image, _ in copies[:3])} are one file in classes "
                             f"{', '.join(repr(label) for label in sorted(labels))}: left out of every class")
    return images, conflicts


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in JUNK_FOLDERS


def _walk_class(class_dir: Path, root: Path, label: str, seen: set | None, skipped: Counter,
                real_root: str | None = None) -> list[tuple[ImageFile, bool]]:
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
            image = ImageFile(path=path.absolute(), relpath=relpath, label=label, size=st.st_size,
                              mtime_ns=st.st_mtime_ns, inode=st.st_ino, dev=st.st_dev)
            found.append((image, real))
    return found


def discover_images(data_dir: str | os.PathLike, min_classes: int = 2) -> Discovery:
    """List the images under `data_dir`, one sub-folder per class; raise `DataError` if unusable."""
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
    for entry in top:
        if _is_hidden(entry.name):
            skipped["hidden"] += 1
        elif entry.is_dir():
            found.extend(_walk_class(Path(entry.path), root, entry.name, None, skipped, real_root))
        else:
            skipped["outside a class folder"] += 1
    images, conflicts = _settle_labels(found, skipped)
    images.sort(key=lambda im: im.relpath)
    classes = sorted({im.label for im in images})
    if not images:
        raise DataError(
            f"no images found in {root} (expected one sub-folder per class holding image files)"
        )
    if len(classes) < min_classes:
        raise DataError(
            f"found {len(classes)} class folder with images in {root} ({', '.join(classes)}); "
            f"need at least {min_classes}, one sub-folder per class"
        )
    return Discovery(root=root, images=images, classes=classes, skipped=skipped, conflicts=conflicts)


def walk_images(folder: Path, root: Path, label: str, seen: set, skipped: Counter) -> list[ImageFile]:
    """The image files under `folder` (recursively), each once across calls sharing `seen`; skips are counted."""
    return [image for image, _ in _walk_class(folder, root, label, seen, skipped)]
