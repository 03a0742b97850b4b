"""The bottom layer of files: content hashes, atomic writes (HDF5 under a temporary name, flushed and renamed),
exclusive locks, and whether the process that left a file behind still runs. Used by every stage."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import io
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import h5py

from bottleneck import naming
from bottleneck.errors import CacheError, disk_full, is_disk_full

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a regular file's content, read in 1 MiB chunks (`features.hashing.sha256_file` also reads
    a tar shard's members)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Flush `folder`'s entries (a rename in it) to disk, where the system allows."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


NO_HDF5_LOCKS = (
    "the file system of {folder} does not support file locking, which HDF5 uses: put the cache on a "
    "local disk, or set HDF5_USE_FILE_LOCKING=FALSE if only one run at a time touches it"
)


def is_lock_failure(exc: OSError) -> bool:
    """Whether HDF5 failed to open a file because the file system refused its lock."""
    return "unable to lock file" in str(exc).lower()


def write_hdf5(path: Path, write: Callable[[h5py.File], None]) -> None:
    """Create `path` and `write` it; a full disk is one OSError(ENOSPC), without h5py's tracebacks.

    When a write fills the disk, every HDF5 object freed afterwards tries to flush again, and h5py
    prints a traceback for each from its deallocators straight to sys.stderr; writing and closing
    run with sys.stderr caught, and what was caught is passed on unless the disk was full.
    """
    try:
        handle = h5py.File(path, "w")
    except OSError as exc:
        if is_lock_failure(exc):
            raise CacheError(NO_HDF5_LOCKS.format(folder=path.parent)) from None
        raise
    error: BaseException | None = None
    real, sys.stderr = sys.stderr, io.StringIO()
    hook, sys.unraisablehook = sys.unraisablehook, sys.__unraisablehook__  # which writes to the caught stderr
    try:
        try:
            write(handle)
        except (OSError, RuntimeError) as exc:
            error = exc
        except BaseException:
            handle.close()
            raise
        try:
            handle.close()
        except (OSError, RuntimeError) as exc:
            error = error or exc
        if error is not None:
            error.__traceback__ = None  # frees the half-written file's objects here, while stderr is caught
            del handle
            gc.collect()
        caught = sys.stderr.getvalue()
    finally:
        sys.stderr, sys.unraisablehook = real, hook
    full = error is not None and (is_disk_full(error) if isinstance(error, OSError) else "errno = 28" in str(error))
    if caught and not full:
        real.write(caught)
    if full:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    if error is not None:
        raise error


#: Files up to this size are built in memory and written with one plain write: HDF5 never meets a full disk.
IN_MEMORY_HDF5_BYTES = 64 << 20
#: Room a file needs beyond its rows (HDF5's metadata, the strings beside them).
_HDF5_OVERHEAD_BYTES = 1 << 20


def hdf5_image(write: Callable[[h5py.File], None]) -> memoryview:
    """The bytes of the HDF5 file that `write` makes, built in memory."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        write(handle)
    return buffer.getbuffer()


def write_bytes_synced(path: Path, data: memoryview | bytes) -> None:
    """Create `path` holding `data`, flushed to disk."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def require_room(folder: Path, needed_bytes: int) -> None:
    """Refuse with one line before writing `needed_bytes` (and HDF5's overhead) into `folder` if they cannot fit."""
    try:
        free = shutil.disk_usage(folder).free  # as disk_full reports it
    except OSError:  # cannot tell: let the write find out
        return
    if free < needed_bytes + _HDF5_OVERHEAD_BYTES:
        raise disk_full(folder, needed_bytes)


def write_hdf5_atomically(target: Path, write: Callable[[h5py.File], None], needed_bytes: int | None = None) -> None:
    """Write the HDF5 file `target` under a temporary name, flush it and rename it; a full disk is one line.

    A file of at most IN_MEMORY_HDF5_BYTES (every part, the index, most segments) is built in memory and
    written with one plain write, so a full disk is an ordinary OSError: HDF5 left with a half-flushed
    file would complain from its deallocators later, wherever the process is. A larger one is checked
    against the free space first and written by HDF5 directly.
    """
    tmp = naming.temporary_path(target)
    try:
        if needed_bytes is None or needed_bytes <= IN_MEMORY_HDF5_BYTES:
            image = hdf5_image(write)
            try:
                write_bytes_synced(tmp, image)
            finally:
                image.release()
        else:
            require_room(target.parent, needed_bytes)
            write_hdf5(tmp, write)
            with open(tmp, "rb+") as raw:
                os.fsync(raw.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(target.parent, needed_bytes) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(target.parent)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs on this machine: a leftover of a dead one may be cleared."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def pid_named_folders(target: Path) -> list[tuple[Path, int | None]]:
    """The temporary folders `.NAME.<pid>.*` that writers of `target` make beside it, each with the pid in its name."""
    prefix = f".{target.name}."
    try:
        entries = [entry for entry in target.parent.iterdir() if entry.name.startswith(prefix) and entry.is_dir()]
    except OSError:
        return []
    named = []
    for entry in entries:
        named.append((entry, naming.pid_after(prefix, entry.name)))
    return named


@contextlib.contextmanager
def exclusive_lock(
    lock_path: Path,
    timeout: float | None,
    on_wait: Callable[[str], None] | None = None,
    busy: Callable[[str], Exception] | None = None,
):
    """Hold an exclusive lock on `lock_path` (waiting up to `timeout` seconds; None: as long as it takes).

    `busy(holder_pid)` makes the error raised when the wait runs out (default: another run writes the store).
    """
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise CacheError(f"cannot write to cache folder {lock_path.parent}: {exc.strerror or exc}") from None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                if deadline is not None and time.monotonic() >= deadline:
                    if busy is not None:
                        raise busy(holder) from None
                    raise CacheError(
                        f"another bottleneck run (pid {holder}) is writing {lock_path.with_suffix(naming.STORE_SUFFIX)}; "
                        "wait for it to finish or pass --lock-timeout SECONDS to wait"
                    ) from None
                if not told and on_wait is not None:
                    on_wait(f"waiting for another bottleneck run (pid {holder}) to release {lock_path}")
                    told = True
                time.sleep(0.2)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise CacheError(
                        f"the file system of {lock_path.parent} does not support file locking, which keeps two runs "
                        "from writing one store at once: put the cache on a local disk (--cache) and copy it over "
                        "when done"
                    ) from None
                raise
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the lock, and the kernel does so if we die
