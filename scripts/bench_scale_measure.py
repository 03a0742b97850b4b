"""What `make bench-scale` measures a step with, from /proc: wall time and bytes written (`Meter`, on the
counter `pick_write_counter` chose), available and peak memory, and dropping files from the page cache."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path


def io_counters() -> dict[str, int]:
    try:
        with open("/proc/self/io", encoding="ascii") as handle:
            return {k: int(v) for k, v in (line.split(": ") for line in handle.read().splitlines() if line)}
    except OSError:
        return {}


WRITE_COUNTER = "write_bytes"


def pick_write_counter() -> str:
    """write_bytes when this kernel accounts it (it counts what reaches the disk), else wchar."""
    probe = Path(f".bench-scale-io-{os.getpid()}")
    before = io_counters()
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        probe.unlink(missing_ok=True)
    after = io_counters()
    if after.get("write_bytes", 0) - before.get("write_bytes", 0) > 0:
        return "write_bytes"
    return "wchar"


class Meter:
    """Wall time and bytes written by this process inside a `with` block."""

    def __enter__(self) -> Meter:
        self._io = io_counters()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t
        self.written = io_counters().get(WRITE_COUNTER, 0) - self._io.get(WRITE_COUNTER, 0)


def available_memory() -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM): unlike ru_maxrss, not inherited from the parent across exec."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_from_page_cache(paths) -> None:
    """Evict these files' (clean) pages, so the next read comes from the disk; other files are untouched."""
    for path in paths:
        if not Path(path).is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
