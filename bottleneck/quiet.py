"""Native libraries' start-up lines off the terminal: `native_startup_quiet()` points file descriptor 2 at
`native_log_path()` while TensorFlow, Keras or another backend is imported, or a TFLite interpreter made
(their C++ prints before any log level applies). The bottom of the package: `features.noise` builds the
decoders' log on the same fd-2 plumbing."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO

STDERR_FD = 2
temporary_streams: weakref.WeakSet[io.TextIOWrapper] = weakref.WeakSet()  # terminal streams closed on exit


def flush_quietly(stream: IO | None) -> None:
    """Flush `stream` if it can be (it may be None, closed or not a stream)."""
    if stream is None:
        return
    with contextlib.suppress(AttributeError, OSError, ValueError):
        stream.flush()


# ---------------------------------------------------------------------------------------------
# Native libraries' start-up lines

#: The native log is started afresh once it grows past this many bytes.
NATIVE_LOG_LIMIT = 1 << 20
_quiet_depth = 0
_native_log_stamped = False


def native_log_path() -> Path:
    """Where native start-up lines go: one log per user in the temporary folder (no cache is known at import)."""
    uid = getattr(os, "getuid", None)
    return Path(tempfile.gettempdir()) / (f"bottleneck-native-{uid()}.log" if uid else "bottleneck-native.log")


def _open_native_log() -> int:
    path = native_log_path()
    try:
        too_big = path.stat().st_size > NATIVE_LOG_LIMIT
    except OSError:
        too_big = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if too_big else 0), 0o600)
    except OSError:  # another user's file, a read-only temporary folder: the lines are dropped, never shown
        return os.open(os.devnull, os.O_WRONLY)
    global _native_log_stamped
    if not _native_log_stamped:  # once per process: which run the lines below came from
        _native_log_stamped = True
        stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n"
        with contextlib.suppress(OSError):
            os.write(fd, stamp.encode("utf-8", "backslashreplace"))
    return fd


@contextlib.contextmanager
def native_startup_quiet() -> Iterator[None]:
    """While active, what C and C++ code writes to fd 2 goes to `native_log_path()`, not to the terminal.

    For importing TensorFlow, Keras and the other backends, and creating a TFLite interpreter: their
    native start-up lines are printed before any log level applies. Unlike `decoder_noise_to`,
    `sys.stderr` is not replaced by a temporary terminal stream: logging handlers created during an
    import keep the `sys.stderr` they found, so it must be one that outlives the context (the
    process's own; a temporary one of `decoder_noise_to` is swapped for it meanwhile). Python lines
    the import itself prints go to the log too. Nested or off the main thread: no redirection.
    """
    global _quiet_depth
    if _quiet_depth or threading.current_thread() is not threading.main_thread():
        yield
        return
    flush_quietly(sys.stderr)  # what was written before belongs on the terminal
    flush_quietly(sys.__stderr__)
    try:
        saved = os.dup(STDERR_FD)
    except OSError:  # no fd 2 at all: nothing to keep quiet
        yield
        return
    previous = sys.stderr
    if previous in temporary_streams and sys.__stderr__ is not None:
        sys.stderr = sys.__stderr__
    log = _open_native_log()
    os.dup2(log, STDERR_FD)
    os.close(log)
    _quiet_depth += 1
    try:
        yield
    finally:
        _quiet_depth -= 1
        flush_quietly(sys.__stderr__)
        flush_quietly(sys.stderr)
        os.dup2(saved, STDERR_FD)
        os.close(saved)
        if sys.stderr is sys.__stderr__ and previous is not sys.__stderr__:
            sys.stderr = previous
