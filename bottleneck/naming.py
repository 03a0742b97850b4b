"""The names of what the package writes in a cache (and beside runs): built and parsed here only.

For a store of backbone fingerprint FP in a cache folder (`bottleneck.features.store` owns what is inside):

    FP.h5                           the index
    FP.segments/seg-<name>.h5       segments (`<name>`: a shard's digest, or `<time_ns>-<pid>-<seq>`)
    FP.segments/.seg-<name>.tries   a shard's tries, one byte each
    FP.parts/part-<time_ns>-<pid>-<seq>.h5   a run's committed batches
    FP.lock                         held by the one run writing the store
    FP-aug-<recipe digest>.h5 ...   the store of augmented views of FP's images
    FP.openvino/                    the OpenVINO conversion (float32); FP.int8-<calibration>.openvino/ quantized
    .<name>.<pid>.tmp               a file or folder being written by process <pid>, renamed when whole

and beside runs, `.fine-tune-<run id>-<settings key>/` (with its `.lock`): a fine-tune's resumable epochs.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

STORE_SUFFIX = ".h5"
SEGMENTS_SUFFIX = ".segments"
PARTS_SUFFIX = ".parts"
LOCK_SUFFIX = ".lock"
TEMPORARY_SUFFIX = ".tmp"
TRIES_SUFFIX = ".tries"
OPENVINO_SUFFIX = ".openvino"
#: Between a backbone's fingerprint and a recipe's digest: the store of augmented views of that backbone's store.
VIEWS_MARK = "-aug-"
#: A store written before segments existed (format 1) becomes this segment.
LEGACY_SEGMENT = "seg-00000000000000000000-format1.h5"
SEGMENT_GLOB = "seg-*.h5"
PART_GLOB = "part-*.h5"
FINE_TUNE_PREFIX = ".fine-tune-"


# ---- a store's files ------------------------------------------------------------------------


def store_index(cache: Path, fingerprint: str) -> Path:
    return cache / f"{fingerprint}{STORE_SUFFIX}"


def store_segments(cache: Path, fingerprint: str) -> Path:
    return cache / f"{fingerprint}{SEGMENTS_SUFFIX}"


def store_parts(cache: Path, fingerprint: str) -> Path:
    return cache / f"{fingerprint}{PARTS_SUFFIX}"


def store_lock(cache: Path, fingerprint: str) -> Path:
    return cache / f"{fingerprint}{LOCK_SUFFIX}"


def fingerprint_of(store_file: Path) -> str:
    """The fingerprint a store's index file is named after."""
    return store_file.name.removesuffix(STORE_SUFFIX)


def store_fingerprints(cache: Path) -> set[str]:
    """The fingerprints the names in `cache` speak of: index files, and segment or part folders."""
    names = {p.stem for p in cache.glob(f"*{STORE_SUFFIX}") if not p.name.startswith(".")}
    names |= {
        p.name[: -len(suffix)]
        for suffix in (SEGMENTS_SUFFIX, PARTS_SUFFIX)
        for p in cache.glob("*" + suffix)
        if p.is_dir()
    }
    return names


def segment_file(name: str) -> str:
    return f"seg-{name}{STORE_SUFFIX}"


def new_file_name(kind: str, seq: int) -> str:
    """A part's or a writer's new segment's name ('part' or 'seg'), unique per process and in time order."""
    return f"{kind}-{time.time_ns():020d}-{os.getpid()}-{seq:06d}{STORE_SUFFIX}"


def shard_tries_file(name: str) -> str:
    return f".seg-{name}{TRIES_SUFFIX}"


#: A shard's leftovers in its store's segments folder: a segment being written, its try counter.
SHARD_LEFTOVER_GLOBS = (f".seg-*{TEMPORARY_SUFFIX}", f".seg-*{TRIES_SUFFIX}")


def store_temporary_prefixes(fingerprint: str) -> tuple[str, ...]:
    """How the temporary files of a store's writers begin (its index, its parts and segments)."""
    return f".{fingerprint}", ".part-", ".seg-"


# ---- augmented views, OpenVINO conversions ---------------------------------------------------


def views_fingerprint(fingerprint: str, recipe_digest: str) -> str:
    return f"{fingerprint}{VIEWS_MARK}{recipe_digest}"


def views_glob(fingerprint: str) -> str:
    """Every views store of `fingerprint`'s store (their index files)."""
    return f"{fingerprint}{VIEWS_MARK}*{STORE_SUFFIX}"


def is_views_store(fingerprint: str) -> bool:
    return VIEWS_MARK in fingerprint


def openvino_folder(cache: Path, fingerprint: str) -> Path:
    return cache / f"{fingerprint}{OPENVINO_SUFFIX}"


def _openvino_stem(folder: Path) -> str:
    return folder.name.removesuffix(OPENVINO_SUFFIX)


def int8_folder_name(float_model: Path, calibration: str) -> str:
    """The folder of the int8 model quantized from the float32 conversion `float_model` on `calibration`."""
    return f"{_openvino_stem(float_model)}.int8-{calibration}{OPENVINO_SUFFIX}"


def int8_folders_glob(float_model: Path) -> str:
    return f"{_openvino_stem(float_model)}.int8-*{OPENVINO_SUFFIX}"


# ---- temporary names -------------------------------------------------------------------------

#: Every temporary name (a writer's own prefix tells whose it is).
TEMPORARY_GLOB = f".*{TEMPORARY_SUFFIX}"


def temporary_path(target: Path) -> Path:
    """Where this process writes `target` before renaming it: `.NAME.<pid>.tmp` beside it."""
    return target.with_name(f".{target.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


def temporary_pid(name: str) -> int | None:
    """The pid in a `.NAME.<pid>.tmp` name, or None when it has none."""
    pid = name.removesuffix(TEMPORARY_SUFFIX).rsplit(".", 1)[-1] if name.endswith(TEMPORARY_SUFFIX) else ""
    return int(pid) if pid.isdigit() else None


def pid_after(prefix: str, name: str) -> int | None:
    """The pid that follows `prefix` in `name` (`.NAME.<pid>.`...), or None."""
    match = re.match(r"(\d+)\.", name[len(prefix) :])
    return int(match.group(1)) if match else None


# ---- beside runs ------------------------------------------------------------------------------


def fine_tune_folder(runs: Path, run_id: str, key: str) -> Path:
    return runs / f"{FINE_TUNE_PREFIX}{run_id}-{key}"


def lock_beside(folder: Path) -> Path:
    return folder.parent / (folder.name + LOCK_SUFFIX)
