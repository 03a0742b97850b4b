"""What discovery finds: which files are images (the extensions of every format Pillow can decode), hidden and
junk names, `ImageFile` (one image found) and `Discovery` (all of them, what was skipped, how DATA was read)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Folders that tools create beside real data and that never hold a class.
JUNK_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"})


# Pillow plugins that only identify a format and cannot decode it.
_STUB_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "FITSSTUB", "MPEG", "WMF"})


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
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
            assert self.label_file is not None  # discover's label-file layout always names its file
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


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in JUNK_FOLDERS


def relpath_or_absolute(path: Path, root: Path) -> str:
    """`path` relative to `root` with '/' separators when inside it, else absolute."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
