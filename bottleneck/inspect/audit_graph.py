"""The audit's geometry, from the cached features alone: standardised and PCA-projected features (read in
chunks), one faiss kNN graph (cosine distance), and what it shows: near-duplicate pairs and outlier scores.
Also what every audit step shares: the optional imports named in one line (`_require`) and progress bars."""

from __future__ import annotations

import numpy as np

from bottleneck.errors import DataError

#: Projected dimensions for the kNN graph and the cross-validated model (features are standardised first).
PROJECTED_DIM = 256
#: Rows the standardisation and the PCA are fitted on.
FIT_SAMPLE = 20_000
#: Rows projected at a time: memory stays bounded whatever the store's size.
CHUNK_ROWS = 8192
#: Datalab's outlier rule: mean kNN distance above Q3 + this x IQR.
OUTLIER_IQR = 1.7
#: Outliers suggested for removal (exclude.txt): Tukey's "far out", above Q3 + 3 IQR; the rest are listed only.
FAR_OUT_IQR = 3.0
#: Rows per kNN query batch (faiss searches a batch at once).
SEARCH_ROWS = 4096


def _projection(rows, sample_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mean, scale, PCA components or None), fitted on a sample of at most `sample_rows` rows."""
    n, dim = rows.shape
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, sample_rows), replace=False))
    X = np.asarray(rows.take(sample), dtype=np.float32)
    mean = X.mean(axis=0, dtype=np.float64)
    scale = X.std(axis=0, dtype=np.float64)
    scale[scale < 1e-12] = 1.0  # constant features carry nothing; do not divide by zero
    if dim <= PROJECTED_DIM or len(sample) <= PROJECTED_DIM:
        return mean, scale, None
    from sklearn.decomposition import PCA

    X -= mean.astype(np.float32)  # in place, in float32: the sample is the audit's largest array
    X /= scale.astype(np.float32)
    pca = PCA(n_components=PROJECTED_DIM, svd_solver="randomized", random_state=seed).fit(X)
    return mean, scale, pca.components_.T.astype(np.float32)


def project(rows, seed: int = 0) -> np.ndarray:
    """(n, <= PROJECTED_DIM) float32: standardised (and PCA-projected) features, read chunk by chunk."""
    mean, scale, components = _projection(rows, FIT_SAMPLE, seed)
    n = len(rows)
    out = np.empty((n, components.shape[1] if components is not None else rows.shape[1]), np.float32)
    for start in range(0, n, CHUNK_ROWS):
        positions = np.arange(start, min(n, start + CHUNK_ROWS))
        chunk = ((np.asarray(rows.take(positions), np.float64) - mean) / scale).astype(np.float32)
        out[positions] = chunk @ components if components is not None else chunk
    return out


def _require(module: str):
    """Import `module` (faiss, cleanlab), or one line naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"the audit needs {module}: pip install 'bottleneck-transfer[audit]' (faiss-cpu and cleanlab)"
        ) from None


def progress_bar(total: int, desc: str, unit: str, progress: bool):
    """A tqdm bar with ETA on stderr (the one `features` draws), or one that draws nothing."""
    from bottleneck.features.engines.local import make_bar

    return make_bar(total, progress, unit=unit, desc=desc)


def knn_graph(Z: np.ndarray, k: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(distances, neighbours), each (n, k): cosine distance to the k nearest other images, nearest first."""
    faiss = _require("faiss")

    unit = np.ascontiguousarray(Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12), dtype=np.float32)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    n = len(unit)
    k = min(k, n - 1)
    distances = np.empty((n, k), np.float32)
    neighbours = np.empty((n, k), np.int64)
    bar = progress_bar(n, "audit: kNN graph", "img", progress)
    for start in range(0, n, SEARCH_ROWS):
        stop = min(n, start + SEARCH_ROWS)
        similarity, found = index.search(unit[start:stop], k + 1)
        for row in range(stop - start):  # drop the image itself (or one exact copy of it: the same vector)
            mine = found[row] != start + row
            keep = found[row][mine][:k], similarity[row][mine][:k]
            neighbours[start + row], distances[start + row] = keep[0], np.clip(1.0 - keep[1], 0.0, 2.0)
        bar.update(stop - start)
    bar.close()
    return distances, neighbours


def near_duplicate_pairs(
    distances: np.ndarray, neighbours: np.ndarray, factor: float
) -> tuple[list[tuple[int, int, float]], float]:
    """Pairs (i < j, distance) closer than `factor` x the median nearest-neighbour distance; and that threshold."""
    median = float(np.median(distances[:, 0])) if len(distances) else 0.0
    threshold = factor * median
    pairs: dict[tuple[int, int], float] = {}
    close_rows, close_cols = np.nonzero(distances < threshold)
    for i, c in zip(close_rows, close_cols):
        j = int(neighbours[i, c])
        key = (min(int(i), j), max(int(i), j))
        pairs[key] = min(pairs.get(key, np.inf), float(distances[i, c]))
    return sorted(((a, b, d) for (a, b), d in pairs.items()), key=lambda p: (p[2], p[0], p[1])), threshold


def outlier_scores(distances: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Mean kNN distance per image; the outlier threshold Q3 + 1.7 IQR, and the far-out one, Q3 + 3 IQR."""
    mean = distances.mean(axis=1) if distances.size else np.zeros(len(distances))
    q1, q3 = np.percentile(mean, [25, 75]) if len(mean) else (0.0, 0.0)
    return mean, float(q3 + OUTLIER_IQR * (q3 - q1)), float(q3 + FAR_OUT_IQR * (q3 - q1))
