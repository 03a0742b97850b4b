"""Every numeric bound a command's flag or a library function takes, declared once (scikit-learn's `Interval` style).

The CLI builds its argparse types from these (`cli/common.Bounded`), the library checks its arguments with
`Interval.check` (one `BottleneckError` line naming the flag), and `tests/test_hostile_values.py` reads them: a bound
changed here changes all three.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """Numbers from `low` to `high` (None: unbounded on that side; `*_open`: the bound itself left out).

    `kind` is int (whole numbers) or float; `note` is a hint said after a refusal ("seconds; leave the flag out ...").
    """

    kind: type
    low: float | None
    high: float | None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    @property
    def words(self) -> str:
        """The range in words: '1 to 2048' (whole numbers), 'more than 0 and at most 10', 'at least 0'."""
        if self.kind is int and self.low is not None and self.high is not None:
            return f"{self.low} to {self.high}"
        parts = []
        if self.low is not None:
            parts.append(f"{'more than' if self.low_open else 'at least'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'less than' if self.high_open else 'at most'} {self.high:g}")
        return " and ".join(parts) or "any finite number"

    @property
    def must(self) -> str:
        """What a value must be, as a library error says it: 'from 1 to 2048', 'at least 0 and at most 1'."""
        both = self.kind is int and self.low is not None and self.high is not None
        return f"from {self.words}" if both else self.words

    @property
    def top(self) -> float:
        """The high bound, of a declaration that has one."""
        if self.high is None:
            raise ValueError("this interval has no high bound")
        return self.high

    def __contains__(self, value: object) -> bool:
        """A finite real number within the bounds (words, nan and infinities are not)."""
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        value = float(value)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def check(self, value: object, flag: str, error: type[Exception], says: str | None = None) -> None:
        """Raise `error('<flag> must be <says>; got <value>')` (says: `must` by default) unless `value` is inside."""
        if value not in self:
            raise error(f"{flag} must be {says or self.must}; got {value}")


def whole(low: int, high: int, note: str = "") -> Interval:
    """Whole numbers from `low` to `high`, both included."""
    return Interval(int, low, high, note=note)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    note: str = "",
) -> Interval:
    """Finite numbers within the bounds."""
    return Interval(float, low, high, low_open=low_open, high_open=high_open, note=note)


# Shared by several commands, so a flag means the same range everywhere.
BATCH_SIZE = whole(1, 4096)
WORKERS = whole(1, 1024)
EPOCHS = whole(1, 100_000)
PATIENCE = whole(1, 100_000)
SEED = whole(0, 2**32 - 1)
LEARNING_RATE = number(0, 10, low_open=True)
LOCK_TIMEOUT = number(0, 10_000_000, note="seconds; leave the flag out to wait as long as it takes")
#: --val-pct and --test-pct.
PERCENT = number(0, 100, high_open=True)
#: Augmented views per image: features/train-head --augment, predict --tta.
VIEWS = whole(1, 64)
PROBABILITY = number(0, 1)
#: The most `--max-memory` may say: more is no budget at all (and '1e400' must not reach int()).
MAX_MEMORY_BYTES = 2**50

# Backbones. Applications refuse more than 2048 (backbones/spec.py); a model file with a free input size would take
# any size and be killed by the kernel (100000 px asked for 24 GB): the same cap, checked before anything is built.
IMAGE_SIZE = whole(
    1, 2048, note="larger inputs do not fit in memory; `bottleneck backbones` lists each backbone's default and minimum"
)
PIXELS_IMAGE_SIZE = whole(1, 256)
FOUNDATION_IMAGE_SIZE = whole(1, 1024)  # and a multiple of the model's patch size

# features
MAX_PIXELS = whole(1, 10**12)
SHARD_SIZE = whole(1, 1_000_000)
GPUS_PER_WORKER = number(0, 1024)
CALIBRATION_IMAGES = whole(1, 100_000)

# train-head
FOLDS = whole(2, 1000)
C = number(0, 1e6, low_open=True)
K = whole(1, 10_000)
L2 = number(0, 10)
DROPOUT = number(0, 1, high_open=True)

# fine-tune
UNFREEZE = whole(1, 100_000)
HEAD_EPOCHS = whole(0, 100_000)
LOWER_RATE_FACTOR = number(1, 1e6)
WARMUP = number(0, 0.9)
WEIGHT_DECAY = number(0, 1)
LABEL_SMOOTHING = number(0, 0.5)

# pretrain
PRETRAIN_IMAGE_SIZE = whole(8, 512)
BLOCKS = whole(1, 6)
FILTERS = whole(1, 1024)
PRETRAIN_EPOCHS = whole(0, 100_000)

# predict, export, compare, audit, demo
TOP = whole(1, 1000)
CHECK_IMAGES = whole(1, 10_000)
PERMUTATIONS = whole(1, 100_000)
DUPLICATE_THRESHOLD = number(0, 1, low_open=True)
NEIGHBOURS = whole(1, 100)
AUDIT_FOLDS = whole(2, 20)
LABELLED = whole(1, 150, note="each digit has about 175 images: 5 go to validation, the rest to test")
