"""The synthetic store `make bench-scale` measures: seeded float32 rows around one centre per class, content
hashes of the row numbers, in a `FeatureStore` of its own fingerprint (nothing is computed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

FINGERPRINT = "synthetic-bench-scale"
CLASSES = 10
SEED = 0


def centres(dim: int) -> np.ndarray:
    return (np.random.default_rng(SEED).standard_normal((CLASSES, dim)) * 0.1).astype(np.float32)


def synthetic_rows(start: int, stop: int, dim: int, centre: np.ndarray):
    """Hashes, features and paths of rows start..stop-1 (the same for every run: seeded by `start`)."""
    rng = np.random.default_rng([SEED, start])
    numbers = np.arange(start, stop)
    features = rng.standard_normal((stop - start, dim), dtype=np.float32)
    features += centre[numbers % CLASSES]
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in numbers]
    paths = [f"synthetic/c{i % CLASSES}/{i:08d}.png" for i in numbers]
    return hashes, features, paths


def open_store(cache: Path, dim: int):
    from bottleneck.features.store import FeatureStore

    attrs = {
        "architecture": "synthetic",
        "feature_dim": dim,
        "pretrained": True,
        "warning": "",
        "input_size": 0,
        "pooling": "avg",
        "layer": "",
        "preprocessing": "none",
    }
    return FeatureStore(cache, FINGERPRINT, dim, attrs, dtype="float32")
