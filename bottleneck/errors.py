"""The one family of user-facing errors. The CLI prints them as one line and exits with code 2."""

import threading

#: Set when the user pressed Ctrl-C (or sent SIGTERM). Python raises KeyboardInterrupt in the main thread,
#: but a library that runs Python code inside C (a finalizer, a callback) can swallow it; long loops check this.
INTERRUPTED = threading.Event()


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if the user interrupted and a library swallowed it: call between long phases."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


class BottleneckError(Exception):
    """An error the user can fix: bad input, a missing file, a locked or unwritable cache."""


class DataError(BottleneckError):
    """The image folder is missing, empty, or not laid out one sub-folder per class."""


class CacheError(BottleneckError):
    """The feature cache cannot be created, locked, read or written."""


class BackboneError(BottleneckError):
    """The backbone cannot be built: unknown weights, unreadable weights file, bad input size."""


class StrictModeError(BottleneckError):
    """Some images failed and `--strict` asked for that to be an error."""


class DiskFullError(CacheError):
    """The disk filled up while writing; what was committed before is kept."""


def is_disk_full(exc: OSError) -> bool:
    """ENOSPC, also as HDF5 and SQLite word it (they do not always set errno)."""
    import errno

    text = str(exc).lower()
    return (
        exc.errno in (errno.ENOSPC, errno.EDQUOT)
        or "no space left on device" in text
        or "errno = 28" in text
        or "disk is full" in text
    )


def disk_full(folder, needed_bytes: int | None = None) -> DiskFullError:
    """'disk full at <folder>: N KiB needed, M GiB free', with what to do."""
    import shutil
    from pathlib import Path

    from bottleneck.text import format_bytes

    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{format_bytes(shutil.disk_usage(where).free)} free"
    except OSError:
        free = "free space unknown"
    needed = ""
    if needed_bytes:
        needed = f"{format_bytes(needed_bytes)} needed, "
    return DiskFullError(
        f"disk full at {where}: {needed}{free}; what was committed is kept: free some space and "
        "run the same command again"
    )
