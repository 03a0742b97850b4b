"""How far apart two image sets are in a feature space, from cached features only.

- Frechet distance between Gaussian fits (the FID formula): |mu_a - mu_b|^2 + tr(Ca) + tr(Cb)
  - 2 tr((Ca Cb)^1/2). The trace of the square root is the nuclear norm of Xa Xb^T (centred,
  scaled), which is exact and needs no d x d matrix square root.
- Kernel MMD^2 (unbiased, Gaussian kernel with the median-distance bandwidth), with a permutation
  p-value: small p means the two sets are unlikely to come from one distribution.

Each set is subsampled to `max_per_set` rows (seeded) to keep this to a few seconds.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from bottleneck.errors import DataError


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of `a` and of `b`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    scale_a, scale_b = max(len(a) - 1, 1), max(len(b) - 1, 1)
    cross = ca @ cb.T / np.sqrt(scale_a * scale_b)
    trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum()
    mean_term = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    value = mean_term + np.sum(ca**2) / scale_a + np.sum(cb**2) / scale_b - 2 * trace_sqrt
    return float(max(value, 0.0))


def _squared_distances(z: np.ndarray) -> np.ndarray:
    norms = np.sum(z**2, axis=1)
    return np.maximum(norms[:, None] + norms[None, :] - 2 * z @ z.T, 0.0)


def _mmd2(kernel: np.ndarray, in_a: np.ndarray) -> float:
    a, b = in_a, ~in_a
    kaa, kbb, kab = kernel[np.ix_(a, a)], kernel[np.ix_(b, b)], kernel[np.ix_(a, b)]
    na, nb = a.sum(), b.sum()
    return float(
        (kaa.sum() - np.trace(kaa)) / (na * (na - 1)) + (kbb.sum() - np.trace(kbb)) / (nb * (nb - 1)) - 2 * kab.mean()
    )


def mmd_test(
    a: np.ndarray, b: np.ndarray, permutations: int = 200, seed: int = 0, tick: Callable[[], None] = lambda: None
) -> tuple[float, float, float]:
    """(MMD^2, permutation p-value, kernel bandwidth) for the rows of `a` against those of `b`; `tick()` after each
    permutation (a progress bar's)."""
    z = np.concatenate([a, b]).astype(np.float64)
    distances = _squared_distances(z)
    off_diagonal = distances[np.triu_indices(len(z), 1)]
    bandwidth = float(np.sqrt(np.median(off_diagonal))) or 1.0
    kernel = np.exp(-distances / (2 * bandwidth**2))
    in_a = np.zeros(len(z), bool)
    in_a[: len(a)] = True
    observed = _mmd2(kernel, in_a)
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(permutations):
        exceed += _mmd2(kernel, rng.permutation(in_a)) >= observed
        tick()
    return observed, (1 + exceed) / (1 + permutations), bandwidth


def compare_features(
    a: np.ndarray,
    b: np.ndarray,
    max_per_set: int = 1000,
    permutations: int = 200,
    seed: int = 0,
    tick: Callable[[], None] = lambda: None,
) -> dict:
    """Frechet distance and MMD between two feature sets (rows are images); `tick()` after each permutation."""
    if len(a) < 2 or len(b) < 2:
        raise DataError(f"need at least 2 images with features on each side; got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    a = a[rng.choice(len(a), max_per_set, replace=False)] if len(a) > max_per_set else a
    b = b[rng.choice(len(b), max_per_set, replace=False)] if len(b) > max_per_set else b
    mmd2, p_value, bandwidth = mmd_test(a, b, permutations, seed, tick)
    return {
        "images_a": len(a),
        "images_b": len(b),
        "frechet_distance": frechet_distance(a, b),
        "mmd2": mmd2,
        "mmd_p_value": p_value,
        "mmd_bandwidth": bandwidth,
        "permutations": permutations,
    }
