"""What every engine shares: the `Engine` seam, the run's `Tally`, the batch size, non-finite rows and what a
model computed with (see `bottleneck.features.engines`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.features.discover import ImageFile
from bottleneck.features.store import Failure, FeatureWriter

if TYPE_CHECKING:
    from bottleneck.features.engines.sharded import ViewPlan

#: Images per backbone call unless `--batch-size` says otherwise (`auto` keeps it on a CPU).
DEFAULT_BATCH_SIZE = 16


NON_FINITE = (
    "the backbone gave non-finite features (NaN or infinity) for this image: its weights or model file may be damaged"
)


def non_finite_rows(features: np.ndarray) -> np.ndarray:
    """Which rows hold a NaN or an infinity: never stored, they would poison every head trained on them."""
    return ~np.isfinite(features).all(axis=1) if len(features) else np.zeros(0, dtype=bool)


@dataclass
class Tally:
    """What a run knows about its images so far."""

    reused: int = 0
    failures: list[Failure] = field(default_factory=list)
    todo: list[tuple[ImageFile, str | None]] = field(default_factory=list)  # (image, hash remembered or None)
    hash_of: dict[str, str] = field(default_factory=dict)  # path -> content hash, for images with features
    computed: int = 0
    versions: dict = field(default_factory=dict)  # of the runtime that computed (tensorflow, keras)
    shards: int = 0
    failed_shards: list[str] = field(default_factory=list)  # one line per shard that failed every try


class Engine(Protocol):
    """Computes `tally.todo` into the store held by `writer`, updating `tally` and the hash index."""

    name: str

    def check(self) -> None:
        """Refuse bad settings (one-line `BottleneckError`) before any work starts."""

    def start(self, spec: BackboneSpec, cache_dir: Path, log: Callable[[str], None]) -> None:
        """Get ready to compute (load the model, connect to a cluster); called only when there is work."""

    def run(
        self,
        tally: Tally,
        writer: FeatureWriter,
        index,
        spec: BackboneSpec,
        log: Callable[[str], None],
        views: ViewPlan | None = None,
    ) -> None:
        """Compute `tally.todo`; the caller's `writer.finish` then brings everything into the store. With `views`
        (the sharded engines only), the augmented views of each image instead."""

    def stop(self) -> None:
        """Release what `start` took (always called)."""


def computed_by(model) -> str:
    """What a feature model runs on, as segments record it: 'jax 0.10.2, keras 3.15.1', 'openvino 2026.1', 'numpy'."""
    versions = dict(getattr(model, "versions", {}) or {})
    return ", ".join(f"{name} {version}" for name, version in sorted(versions.items())) or "numpy"
