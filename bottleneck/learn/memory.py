"""How much memory a head may use for features (`--max-memory`), and how to spend it.

A training set is held in memory when its features, times `IN_MEMORY_FACTOR` (the copies a
split, a scaler and a solver make), fit the budget; otherwise it is streamed from the store in
chunks of `chunk_rows`, each of which, times `STREAM_FACTOR` (the store's read buffers, the
chunk itself and its standardised copy), fits the budget. Sizes use binary units: 1K = 1024.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from bottleneck.errors import BottleneckError
from bottleneck.text import format_bytes

#: The default budget: this fraction of the memory available when training starts.
DEFAULT_FRACTION = 0.25
#: In memory, features take about this many times their own size (split copies, scaler, solver).
IN_MEMORY_FACTOR = 3
#: Streaming, one chunk takes about this many times its own size (the store's read buffers, then the scaler's float64 temporaries).
STREAM_FACTOR = 6
#: A budget must hold a chunk of at least this many rows.
MIN_CHUNK_ROWS = 64
#: Chunks larger than this gain nothing (one read is already long): the cap keeps passes responsive.
MAX_CHUNK_ROWS = 65536
_FALLBACK_AVAILABLE = 4 * 2**30

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class MemoryBudgetError(BottleneckError):
    """`--max-memory` is not a size, or too small to train with."""


def parse_size(text: str | int | float) -> int:
    """Bytes from '512M', '2G', '1.5GB', '64KiB' or a plain number of bytes; refuse anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise MemoryBudgetError(
                f"--max-memory {text!r} is not a size: give bytes or a number with K, M, G or T (e.g. 512M, 2G, 1.5GB)"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise MemoryBudgetError(f"--max-memory must be more than 0 bytes, got {text!r}")
    return size


def available_memory() -> int:
    """Bytes available to a new allocation: MemAvailable of /proc/meminfo, else sysconf, else 4 GiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return _FALLBACK_AVAILABLE


def default_budget() -> int:
    """A quarter of the memory available now, rounded down to a power of two (at least 64 MiB).

    Rounding keeps the budget, hence the mode and chunk size (and so the result), the same from
    one run to the next while available memory drifts a little; `--max-memory` pins it.
    """
    quarter = max(1, int(available_memory() * DEFAULT_FRACTION))
    return max(64 * 2**20, 1 << (quarter.bit_length() - 1))


@dataclass(frozen=True)
class MemoryPlan:
    """How a training set is held: in memory, or streamed in chunks of `chunk_rows` rows; and why."""

    mode: str  # 'in-memory' or 'streamed'
    max_memory_bytes: int
    feature_bytes: int
    chunk_rows: int
    reason: str
    budget_source: str = "--max-memory"

    @property
    def streamed(self) -> bool:
        return self.mode == "streamed"

    def record(self) -> dict:
        return {
            "mode": self.mode,
            "max_memory_bytes": self.max_memory_bytes,
            "feature_bytes": self.feature_bytes,
            "chunk_rows": self.chunk_rows,
            "reason": self.reason,
            "max_memory_from": self.budget_source,
        }


def chunk_rows_for(budget: int, dim: int, min_rows: int = MIN_CHUNK_ROWS) -> int:
    """Rows per chunk that fit `budget` while streaming; refuse a budget that holds fewer than `min_rows`."""
    row_bytes = 4 * max(1, dim)
    rows = budget // (row_bytes * STREAM_FACTOR)
    if rows >= min_rows:
        rows = max(min_rows, 1 << (int(rows).bit_length() - 1))  # a power of two: the same chunks for similar budgets
    if rows < min_rows:
        need = min_rows * row_bytes * STREAM_FACTOR
        raise MemoryBudgetError(
            f"--max-memory {format_bytes(budget)} cannot hold one batch of {min_rows} rows of {dim} features "
            f"(about {format_bytes(need)} while training); give at least {-(-need // 2**20)}M"
        )
    return int(min(rows, MAX_CHUNK_ROWS))


def plan_memory(
    rows: int,
    dim: int,
    budget: int | None,
    batch_size: int = 0,
    stream: bool | None = None,
    chunk_rows: int | None = None,
) -> MemoryPlan:
    """In memory when `rows` x `dim` float32 features fit the budget with room to spare; else streamed.

    Streaming needs chunks of at least MIN_CHUNK_ROWS rows and one batch (`batch_size`): a smaller
    budget is refused, as is one that holds neither the features nor such a chunk. `stream`
    (True/False) overrides the choice and `chunk_rows` the chunk size: knobs for tests and benchmarks.
    """
    source = "--max-memory"
    if budget is None:
        budget, source = default_budget(), "default: a quarter of the available memory, rounded down to a power of two"
    feature_bytes = int(rows) * int(dim) * 4
    fits = feature_bytes * IN_MEMORY_FACTOR <= budget
    if stream is False or (fits and not stream):
        return MemoryPlan("in-memory", budget, feature_bytes, int(rows), "the features fit the memory budget", source)
    chunk = chunk_rows or chunk_rows_for(budget, dim, max(MIN_CHUNK_ROWS, batch_size))
    if fits:
        return MemoryPlan("streamed", budget, feature_bytes, chunk, "streaming was asked for", source)
    return MemoryPlan(
        "streamed",
        budget,
        feature_bytes,
        chunk,
        f"the features ({format_bytes(feature_bytes)}, about {format_bytes(feature_bytes * IN_MEMORY_FACTOR)} to train "
        f"in memory) exceed the memory budget of {format_bytes(budget)}",
        source,
    )
