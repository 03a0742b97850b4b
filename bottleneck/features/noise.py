"""Keep decoder noise off the terminal: C-level stderr output and Pillow's warnings go to a log file.

libtiff and other C decoders print warnings straight to file descriptor 2, below Python, and
Pillow warns about damaged files (invalid APNG chunks, short EXIF or TIFF tags). Over a long
extraction that floods the terminal and hides the progress bar. While `decoder_noise_to(path)`
is active, fd 2 points at the log file, Pillow's warnings and logged errors (from any thread) are
appended there, and Python's `sys.stderr` still reaches the real terminal, so progress bars and one-line
messages are unaffected. `NoiseLog.count` says how many lines of noise were logged.

Enter and leave the context from the main thread: fd 2 and `sys.stderr` belong to the process.

`bottleneck.quiet.native_startup_quiet()` is the same fd-2 redirection for native libraries' start-up
lines (TensorFlow's `absl::InitializeLog` preamble and oneDNN notice, which C++ prints before
`TF_CPP_MIN_LOG_LEVEL` is read; TFLite's XNNPACK delegate line).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from bottleneck.errors import CacheError
from bottleneck.features.decode import set_pillow_warning_action
from bottleneck.quiet import STDERR_FD, flush_quietly, temporary_streams

_SCAN_CHUNK = 1 << 20

_sessions_lock = threading.Lock()
_sessions: dict[str, NoiseLog] = {}  # active logs by absolute path: nested use of one path is shared
_current = threading.local()  # .path: the file this thread is decoding, for warnings raised meanwhile


@dataclass(eq=False)
class NoiseLog:
    """An open decoder-noise log: where it is and how many lines of noise it received."""

    path: Path
    python_warnings: int = 0
    _fd: int = field(default=-1, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _scanned: int = field(default=0, repr=False)  # log offset up to which newlines are counted
    _newlines: int = field(default=0, repr=False)
    _open_line: bool = field(default=False, repr=False)  # the last byte scanned was not a newline
    _own_lines: int = field(default=0, repr=False)  # lines written here, not by C code

    @property
    def c_lines(self) -> int:
        """Lines that C code wrote to fd 2 (an unfinished last line counts)."""
        with self._lock:
            if self._fd >= 0:
                self._scan()
            return max(0, self._newlines + int(self._open_line) - self._own_lines)

    @property
    def count(self) -> int:
        """All noise logged so far: Python warnings plus C-level lines."""
        return self.python_warnings + self.c_lines

    def _scan(self) -> None:
        # Reads only what was appended since the last scan, so a live count stays cheap.
        try:
            with open(self.path, "rb") as log:
                log.seek(self._scanned)
                for chunk in iter(lambda: log.read(_SCAN_CHUNK), b""):
                    self._newlines += chunk.count(b"\n")
                    self._scanned += len(chunk)
                    self._open_line = not chunk.endswith(b"\n")
        except OSError:  # the log was removed meanwhile: keep the count we have
            pass

    def write_warning(self, line: str) -> None:
        """Append one line for one Python warning and count it."""
        data = (" ".join(line.split()) + "\n").encode("utf-8", "backslashreplace")
        with self._lock:
            os.write(self._fd, data)  # one O_APPEND write: never interleaved inside C output
            self._own_lines += 1
            self.python_warnings += 1


def describe(noise: NoiseLog) -> str:
    """One summary line, e.g. '12 decoder warnings (logged to cache/decoder-warnings.log)'."""
    count = noise.count
    if count == 0:
        return "no decoder warnings"
    noun = "warning" if count == 1 else "warnings"
    return f"{count} decoder {noun} (logged to {noise.path})"


#: The log file in a cache folder that decoder warnings go to.
DECODER_LOG = "decoder-warnings.log"


def decoder_log_in(cache: Path, writable: bool = True) -> Path:
    """Where decoder warnings go: the cache's log; beside a cache that cannot be written, a temporary one."""
    return cache / DECODER_LOG if writable else Path(tempfile.gettempdir()) / f"bottleneck-{DECODER_LOG}"


@contextlib.contextmanager
def decoder_noise_beside(folder: str | os.PathLike) -> Iterator[NoiseLog]:
    """`decoder_noise_to` the log in `folder` (a report's or an audit's), else, where it cannot be written, the
    temporary one: pages that show thumbnails decode whatever images the runs name."""
    folder = Path(folder)
    with decoder_noise_to(decoder_log_in(folder, os.access(folder, os.W_OK))) as noise:
        yield noise


@contextlib.contextmanager
def decoding(path: str | os.PathLike) -> Iterator[None]:
    """Name `path` in the log for Python warnings this thread raises meanwhile (cheap: use per image)."""
    previous = getattr(_current, "path", None)
    _current.path = os.fspath(path)
    try:
        yield
    finally:
        _current.path = previous


@contextlib.contextmanager
def decoder_noise_to(log_path: str | os.PathLike) -> Iterator[NoiseLog]:
    """While active: C-level writes to fd 2 and Pillow's warnings go to `log_path` (appended).

    `sys.stderr` keeps reaching the terminal. Everything is restored on exit, also on errors and
    KeyboardInterrupt. A log that received nothing and did not exist before is removed. Nested
    use with the same path shares one `NoiseLog`; another path nests its own redirection.
    """
    key = os.path.abspath(log_path)
    with _sessions_lock:
        shared = _sessions.get(key)
    if shared is not None:
        yield shared
        return
    noise = NoiseLog(Path(log_path))
    with contextlib.ExitStack() as undo:
        _open_log(noise, undo)
        terminal_fd = _redirect_fd2(noise, undo)
        _keep_sys_stderr_on(terminal_fd, undo)
        _route_warnings(noise, undo)
        _route_pillow_logging(noise, undo)
        with _sessions_lock:
            _sessions[key] = noise
        undo.callback(_sessions.pop, key, None)
        yield noise


def _open_log(noise: NoiseLog, undo: contextlib.ExitStack) -> None:
    existed = noise.path.exists()
    try:
        noise._fd = os.open(noise.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CacheError(f"cannot write decoder warnings log {noise.path}: {exc.strerror or exc}") from None
    noise._scanned = os.fstat(noise._fd).st_size
    undo.callback(_close_log, noise, existed)


def _close_log(noise: NoiseLog, existed: bool) -> None:
    with noise._lock:
        noise._scan()  # the final count: nothing more can arrive once fd 2 is restored
        os.close(noise._fd)
        noise._fd = -1
    if not existed and noise._scanned == 0:
        with contextlib.suppress(OSError):  # do not leave an empty log behind
            noise.path.unlink()


def _redirect_fd2(noise: NoiseLog, undo: contextlib.ExitStack) -> int:
    """Point fd 2 at the log; return a descriptor for where it pointed before (the terminal)."""
    flush_quietly(sys.stderr)  # what Python already wrote belongs on the terminal, not in the log
    saved = os.dup(STDERR_FD)
    undo.callback(os.close, saved)
    os.dup2(noise._fd, STDERR_FD)
    undo.callback(_restore_fd2, saved)
    return saved


def _restore_fd2(saved: int) -> None:
    # Objects still writing to fd 2 (the original sys.stderr) flush into the log they wrote to.
    flush_quietly(sys.__stderr__)
    flush_quietly(sys.stderr)
    os.dup2(saved, STDERR_FD)


def _keep_sys_stderr_on(terminal_fd: int, undo: contextlib.ExitStack) -> None:
    """Make `sys.stderr` write to the terminal if it wrote to fd 2 (a captured one is left alone)."""
    original = sys.stderr
    if not _writes_to_fd2(original):
        return
    raw = io.FileIO(terminal_fd, "w", closefd=False)
    terminal = io.TextIOWrapper(
        io.BufferedWriter(raw),
        encoding=getattr(original, "encoding", None) or "utf-8",
        errors="backslashreplace",
        line_buffering=True,  # like sys.stderr: a progress bar's '\r' updates show at once
        write_through=True,
    )
    sys.stderr = terminal
    temporary_streams.add(terminal)
    undo.callback(_restore_sys_stderr, original, terminal)


def _restore_sys_stderr(original: TextIO | None, terminal: io.TextIOWrapper) -> None:
    flush_quietly(terminal)
    if sys.stderr is terminal:  # someone who replaced it meanwhile keeps their own
        sys.stderr = original
    terminal.close()


def _writes_to_fd2(stream: IO | None) -> bool:
    try:
        return stream is not None and stream.fileno() == STDERR_FD
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def _route_warnings(noise: NoiseLog, undo: contextlib.ExitStack) -> None:
    """Send decoder warnings from every thread to the log; others go where they went before."""
    undo.enter_context(warnings.catch_warnings())  # restores filters and showwarning on exit
    # 'always': the default filter shows a message once per location and would hide repeats.
    set_pillow_warning_action("always")
    passed_on = warnings.showwarning
    pillow_dir = _pillow_dir()

    def show(message, category, filename, lineno, file=None, line=None):
        decoding_path = getattr(_current, "path", None)
        from_pillow = os.path.abspath(filename).startswith(pillow_dir)
        if file is not None or not (from_pillow or decoding_path is not None):
            passed_on(message, category, filename, lineno, file, line)
            return
        try:
            noise.write_warning(_warning_line(message, category, filename, lineno, decoding_path))
        except OSError:  # the log cannot take it: better on the terminal than lost
            passed_on(message, category, filename, lineno, file, line)

    warnings.showwarning = show


class _PillowLogToNoise(logging.Handler):
    """Writes Pillow's logged warnings and errors to the noise log, naming the file being decoded."""

    def __init__(self, noise: NoiseLog) -> None:
        super().__init__(logging.WARNING)
        self.noise = noise

    def emit(self, record: logging.LogRecord) -> None:
        decoding_path = getattr(_current, "path", None)
        where = f" while decoding {decoding_path}" if decoding_path else ""
        try:
            message = record.getMessage()
            self.noise.write_warning(
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} {record.levelname.lower()}{where}: {message} ({record.name})"
            )
        except Exception:  # noqa: BLE001 - the log cannot take it: better on the terminal than lost
            if logging.lastResort is not None:
                logging.lastResort.handle(record)


def _route_pillow_logging(noise: NoiseLog, undo: contextlib.ExitStack) -> None:
    """Send what Pillow logs at WARNING and above to the log (a TIFF it refuses logs 'More samples per pixel...').

    Without a handler, Python's last resort prints such records on `sys.stderr`, the terminal. The `PIL` logger's
    handlers and propagation are set back on exit; a nested session's handler stands in for the outer one's.
    """
    logger = logging.getLogger("PIL")
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers = [_PillowLogToNoise(noise)]
    logger.propagate = False
    undo.callback(_restore_logger, logger, handlers, propagate)


def _restore_logger(logger: logging.Logger, handlers: list[logging.Handler], propagate: bool) -> None:
    logger.handlers = handlers
    logger.propagate = propagate


def _pillow_dir() -> str:
    import PIL

    return os.path.dirname(os.path.abspath(PIL.__file__)) + os.sep


def _warning_line(message, category: type, filename: str, lineno: int, decoding_path: str | None) -> str:
    where = f" while decoding {decoding_path}" if decoding_path else ""
    source = f"{Path(filename).parent.name}/{Path(filename).name}:{lineno}"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning{where}: {category.__name__}: {message} ({source})"
