"""Domain distances: the Frechet formula against scipy's matrix square root, and the MMD test."""

from __future__ import annotations

import numpy as np
from scipy import linalg

from bottleneck.learn.domain import compare_features, frechet_distance, mmd_test


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (60, 12)), rng.normal(0.5, 2, (80, 12))
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert abs(frechet_distance(a, b) - expected) < 1e-6 * max(1, expected)
    assert frechet_distance(a, a) < 1e-8


def test_mmd_tells_same_from_shifted_distributions():
    rng = np.random.default_rng(1)
    same = mmd_test(rng.normal(0, 1, (80, 5)), rng.normal(0, 1, (80, 5)), permutations=100)
    shifted = mmd_test(rng.normal(0, 1, (80, 5)), rng.normal(1, 1, (80, 5)), permutations=100)
    assert same[1] > 0.05 and shifted[1] < 0.02 and shifted[0] > same[0]


def test_compare_subsamples_and_reports_everything():
    rng = np.random.default_rng(2)
    result = compare_features(rng.normal(0, 1, (300, 4)), rng.normal(0, 1, (50, 4)), max_per_set=100, permutations=20)
    assert result["images_a"] == 100 and result["images_b"] == 50
    assert set(result) >= {"frechet_distance", "mmd2", "mmd_p_value", "mmd_bandwidth"}
