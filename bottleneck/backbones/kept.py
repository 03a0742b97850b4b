"""A backbone file kept by content: `CACHE/backbones/<sha256>.keras` (or the `--weights` file of an
application, `<sha256>.weights.h5`), so a run outlives its model file.

A run names its backbone by the SHA-256 of the file it was trained on. The file is copied, not
hard-linked: `model.save("base.keras")` rewrites the same inode in place (Keras opens it with
"wb"), so a hard link would change with the retrained model and the old run would lose its base.
A copy is made once per content and appears whole or not at all (written under a temporary name
and renamed to the hash of what was actually copied).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bottleneck.errors import CacheError, disk_full, is_disk_full
from bottleneck.fs import sha256_file

#: The folder of a cache that keeps model files by content.
BACKBONES_FOLDER = "backbones"
#: What `pretrain` writes beside a model (its epochs say whether the weights are random): kept with it.
SIDECAR_SUFFIX = ".info.json"


@dataclass(frozen=True)
class KeptBackbone:
    """A model file kept in a cache: where, and the SHA-256 of its content."""

    path: Path
    sha256: str


def kept_path(cache_dir: str | os.PathLike, sha256: str, suffix: str = ".keras") -> Path:
    """Where the cache keeps the model (or weights) file whose content hashes to `sha256`."""
    return Path(cache_dir) / BACKBONES_FOLDER / f"{sha256}{suffix}"


def file_suffix(path: str | os.PathLike) -> str:
    """The suffix Keras reads a file by: `.keras`, `.weights.h5` (its own weights files), `.h5`."""
    name = Path(path).name.lower()
    return ".weights.h5" if name.endswith(".weights.h5") else Path(path).suffix


def holds_content(path: Path, sha256: str) -> bool:
    """Whether `path` is a file whose content hashes to `sha256`."""
    try:
        return path.is_file() and sha256_file(path) == sha256
    except OSError:
        return False


def keep_backbone_file(model_file: str | os.PathLike, cache_dir: str | os.PathLike) -> KeptBackbone:
    """Keep `model_file` in `cache_dir/backbones/` by content (once per content) and return the kept copy."""
    source = Path(model_file)
    suffix = file_suffix(source)
    folder = Path(cache_dir) / BACKBONES_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        sha256 = sha256_file(source)
        if not holds_content(kept_path(cache_dir, sha256, suffix), sha256):
            sha256 = _copy_by_content(source, folder, suffix)
        _copy_if_absent(
            Path(str(source) + SIDECAR_SUFFIX), Path(str(kept_path(cache_dir, sha256, suffix)) + SIDECAR_SUFFIX)
        )
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(folder) from None
        raise CacheError(f"cannot keep the backbone {source} in {folder}: {exc.strerror or exc}") from None
    return KeptBackbone(kept_path(cache_dir, sha256, suffix), sha256)


def _copy_by_content(source: Path, folder: Path, suffix: str) -> str:
    """Copy `source` into `folder` under the hash of what was copied (the file may be rewritten meanwhile)."""
    staging = _staging_name(folder)
    try:
        shutil.copyfile(source, staging)
        sha256 = sha256_file(staging)
        os.replace(staging, folder / f"{sha256}{suffix}")
    finally:
        staging.unlink(missing_ok=True)
    return sha256


def _copy_if_absent(source: Path, target: Path) -> None:
    if not source.is_file() or target.exists():
        return
    staging = _staging_name(target.parent)
    try:
        shutil.copyfile(source, staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def _staging_name(folder: Path) -> Path:
    return folder / f".{os.getpid()}.{secrets.token_hex(4)}.tmp"


def first_with_content(candidates: Iterable[Path], sha256: str) -> Path | None:
    """The first of `candidates` whose content hashes to `sha256` (a file of the same name but other content is passed over)."""
    return next((path for path in candidates if holds_content(path, sha256)), None)
