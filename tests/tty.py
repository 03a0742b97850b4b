"""Run a command under a pseudo-terminal, as a user at a terminal would, and return what it showed.

Progress bars are drawn only when stderr is a terminal (`sys.stderr.isatty()`), so a test that
checks for one runs the command here: stdin, stdout and stderr are the pty's slave end.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bottleneck_argv(*args: str) -> list[str]:
    """`python -m bottleneck ARGS` with this interpreter."""
    return [sys.executable, "-m", "bottleneck", *map(str, args)]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: this checkout first on the path, TensorFlow's level left as the user has it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user runs it: the start-up lines show unless we keep them off
    env.update(extra)
    return env


def run_in_pty(
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: str | os.PathLike | None = None,
    columns: int = 120,
) -> tuple[int, str]:
    """(exit code, everything written to the terminal: stdout and stderr, '\\r' kept) of `argv` under a pty."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    try:
        child = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True, start_new_session=True
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                child.kill()
                raise TimeoutError(
                    f"{argv} ran past {timeout} s; it showed:\n" + b"".join(chunks).decode(errors="replace")
                )
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: every slave end is closed, the child has exited
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return child.wait(timeout=30), b"".join(chunks).decode("utf-8", errors="replace")
