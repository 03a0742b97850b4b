"""Text shown to users or stored for them: names that may not be UTF-8, the first line of an error, and byte sizes.

One unit system for sizes: binary units (KiB, MiB, GiB, TiB) with one decimal, as `--max-memory` reads them.
"""

from __future__ import annotations

import re

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """UTF-8-safe text: file names that are not valid UTF-8 keep their bytes as U+FFFD (what the store keeps)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def one_line(text: str) -> str:
    """`text` with its control characters escaped as Python writes them (a newline as \\n, ESC as \\x1b): a file
    name can then neither break a printed line nor send the terminal an escape sequence."""
    return _CONTROL_CHARACTERS.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)


def shown(value) -> str:
    """`value` as text that any UTF-8 page or terminal takes: bytes of a name that are not UTF-8 become \\xNN."""
    text = str(value)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:  # a lone surrogate that is no escaped byte (hand-written JSON)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _message_lines(error: BaseException | str) -> list[str]:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error  # str() would quote the key
    return str(message).strip().splitlines()


def first_line(error: BaseException | str, limit: int | None = None) -> str:
    """The first line of an error's message (or of a text), at most `limit` characters (a cut one ends in '...');
    its type's name if empty."""
    lines = _message_lines(error)
    if not lines:
        return type(error).__name__
    if limit is not None and len(lines[0]) > limit:
        return lines[0][: max(0, limit - 3)] + "..."
    return lines[0]


def error_line(error: BaseException) -> str:
    """'TypeName: first line of the message', or the type's name alone when there is no message."""
    lines = _message_lines(error)
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def format_bytes(size: float) -> str:
    """'900 B', '12.0 KiB', '62.5 MiB', '1.6 GiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"
