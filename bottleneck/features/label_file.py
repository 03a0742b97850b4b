"""`--labels FILE`: images and their labels from a CSV, TSV or Parquet file instead of class folders.

Columns `path` and `label` (any case), optionally `split` (train, val/valid/validation, test) and
`group` (images of one group always share a split). Paths are relative to the file's folder or
absolute; the images may sit anywhere. What cannot be used (a missing file, an empty label, a
file listed twice with two splits or groups, a row repeated) is counted and its first few named,
never dropped silently; images under DATA that the file does not name are counted too.

Multi-label: an image carries several labels when its label cell lists them separated by `;`
(`cat;dog`), or when it is listed on several rows with different labels (one row per pair); its
labels are the union. A file where some image has more than one label is a multi-label file.
"""

from __future__ import annotations

import csv
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bottleneck.errors import DataError
from bottleneck.features.discover import SPLIT_FOLDERS, relpath_or_absolute
from bottleneck.text import first_line

if TYPE_CHECKING:
    from bottleneck.features.shards import Member

COLUMNS = ("path", "label", "split", "group")
_NAMED = 3  # the first few problem paths named per kind
#: Separates the labels of one image in a label cell (`cat;dog`).
LABEL_SEPARATOR = ";"


@dataclass
class LabelRow:
    line: int  # in the file (1 is the header; Parquet: the row number + 1)
    path: str
    label: str
    split: str = ""
    group: str = ""


@dataclass
class LabelFileProblems:
    """What could not be used, by kind: a count and the first few paths."""

    counts: Counter = field(default_factory=Counter)
    named: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, path: str) -> None:
        from bottleneck.text import printable

        self.counts[kind] += 1
        self.named.setdefault(kind, [])
        if len(self.named[kind]) < _NAMED:
            self.named[kind].append("".join(c if c.isprintable() else repr(c)[1:-1] for c in printable(path)))

    def lines(self, source: str) -> list[str]:
        """One warning line per kind."""
        return [
            f"{count} row{'s' if count != 1 else ''} of {source} left out: {kind} (first: "
            f"{', '.join(self.named[kind])})"
            for kind, count in sorted(self.counts.items())
        ]


def _columns(header: list[str], source: Path) -> dict[str, int]:
    lowered = [str(name).strip().lower() for name in header]
    found = {name: lowered.index(name) for name in COLUMNS if name in lowered}
    absent = [name for name in ("path", "label") if name not in found]
    if absent:
        raise DataError(
            f"label file {source} needs the columns path and label (and may have split, group); its "
            f"header is {', '.join(map(str, header[:6])) or 'empty'}"
        )
    return found


def _text_rows(source: Path, delimiter: str) -> Iterator[LabelRow]:
    reader = None
    try:
        with open(source, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DataError(f"label file {source} is empty")
            column = _columns(header, source)
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                cells = {name: (row[i].strip() if i < len(row) else "") for name, i in column.items()}
                yield LabelRow(
                    reader.line_num, cells["path"], cells["label"], cells.get("split", ""), cells.get("group", "")
                )
    except OSError as exc:
        raise DataError(f"cannot read label file {source}: {exc.strerror or exc}") from None
    except csv.Error as exc:
        raise DataError(f"label file {source}, line {reader.line_num if reader else 1}: not CSV ({exc})") from None


def _parquet_rows(source: Path) -> Iterator[LabelRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading a Parquet label file needs pyarrow: pip install pyarrow (or give a CSV)") from None
    try:
        table = pq.read_table(source)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise DataError(f"cannot read label file {source}: {first_line(exc)}") from None
    column = _columns(table.column_names, source)
    values = {name: table.column(i).to_pylist() for name, i in column.items()}
    for number in range(table.num_rows):
        cells = {name: "" if values[name][number] is None else str(values[name][number]).strip() for name in values}
        yield LabelRow(number + 2, cells["path"], cells["label"], cells.get("split", ""), cells.get("group", ""))


def read_rows(source: Path) -> Iterator[LabelRow]:
    """The rows of a label file; its kind comes from its extension (.csv, .tsv or .txt, .parquet)."""
    kind = source.suffix.lower()
    if kind == ".parquet":
        return _parquet_rows(source)
    if kind in (".tsv", ".tab"):
        return _text_rows(source, "\t")
    return _text_rows(source, ",")


def split_labels(cell: str) -> tuple[str, ...]:
    """The labels of one label cell: `a;b` is two, blanks around them dropped, each once, sorted."""
    return tuple(sorted({part.strip() for part in cell.split(LABEL_SEPARATOR)} - {""}))


def joined_labels(labels: tuple[str, ...]) -> str:
    """One text for a set of labels (`a;b`), as split.csv and test_predictions.csv write it."""
    return LABEL_SEPARATOR.join(labels)


@dataclass
class ListedImage:
    path: Path  # absolute
    relpath: str  # relative to the root when inside it, else absolute
    label: str  # its labels joined (`a;b`); the label itself when it has one
    stat: os.stat_result
    split: str  # "" when the file gives none
    group: str
    labels: tuple[str, ...] = ()  # sorted, each once
    container: str = ""  # the shard holding this image (see `bottleneck.features.shards`), "" for a file


def _stat_of(path: Path) -> tuple[os.stat_result, Member | None]:
    """The file's stat, or for an image inside a tar or Parquet shard (`x.tar/0001.jpg`) a stat of it as a file
    (its own size; its shard's mode, inode, device and times) and the member; OSError when it is neither."""
    try:
        return path.stat(), None
    except NotADirectoryError:
        from bottleneck.features.shards import member_of

        member = member_of(path)
        if member is None:
            raise
        shard = os.stat(member.shard)
        fields = list(shard)[:10] + [
            shard.st_atime,
            shard.st_mtime,
            shard.st_ctime,
            shard.st_atime_ns,
            shard.st_mtime_ns,
            shard.st_ctime_ns,
        ]
        fields[6] = member.size  # st_size
        return os.stat_result(fields), member


def listed_images(source: str | os.PathLike, root: Path) -> tuple[list[ListedImage], LabelFileProblems]:
    """The usable images a label file names, and what it named that cannot be used."""
    source = Path(source)
    if not source.is_file():  # a FIFO is never opened: reading it could block for good
        raise DataError(
            f"label file {source} is not a regular file" if source.exists() else f"label file not found: {source}"
        )
    base = source.absolute().parent
    problems = LabelFileProblems()
    by_file: dict[tuple[int, int, str], list[tuple[LabelRow, ListedImage]]] = {}
    for row in read_rows(source):
        shown = row.path or f"line {row.line}"
        if not row.path:
            problems.add("no path", shown)
            continue
        labels = split_labels(row.label)
        if not labels:
            problems.add("empty label", shown)
            continue
        split = SPLIT_FOLDERS.get(row.split.lower(), None) if row.split else ""  # the names split folders take
        if split is None:
            raise DataError(
                f"label file {source}, line {row.line}: unknown split {row.split!r}; use train, val "
                "(or valid, validation) or test, or leave it empty"
            )
        path = Path(os.path.abspath(Path(row.path) if os.path.isabs(row.path) else base / row.path))
        try:
            st, member = _stat_of(path)
        except OSError:
            problems.add("missing file", shown)
            continue
        except ValueError:  # a NUL byte: no file can have that name
            problems.add("not a file name", shown)
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.add("not a regular file", shown)
            continue
        image = ListedImage(
            path,
            relpath_or_absolute(path, root),
            joined_labels(labels),
            st,
            split,
            row.group,
            labels,
            member.shard if member else "",
        )
        by_file.setdefault((st.st_dev, st.st_ino, member.name if member else ""), []).append((row, image))
    images = []
    for rows in by_file.values():
        first = rows[0][1]
        if len({(image.split, image.group) for _, image in rows}) > 1:
            problems.add("one file with two splits or groups", first.relpath)
            continue
        cells = [image.labels for _, image in rows]
        for _ in range(len(cells) - len(set(cells))):  # a row repeated, not a label added
            problems.add("listed again", first.relpath)
        labels = tuple(sorted({label for cell in cells for label in cell}))
        images.append(replace(first, label=joined_labels(labels), labels=labels))
    return images, problems
