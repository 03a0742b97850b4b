"""A run's pictures that need its cached features: the embedding map of its images, and beside each
misclassified test image its nearest training images (cosine similarity of L2-normalised features).

Both read the run's split.csv, its DATA and its feature cache through `run_folder.run_images`; a run
sent alone (no cache, no DATA) gets one line saying why they are unavailable instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bottleneck.errors import BottleneckError, CacheError
from bottleneck.inspect.embedding_map import MAX_POINTS, MISCLASSIFIED, Embedding, choose_points, map_html, project_2d
from bottleneck.learn.run_folder import run_images

#: Nearest training images shown beside each misclassified test image.
NEIGHBOURS = 3
#: Training images searched for them: a seeded sample when there are more (the page says so).
MAX_POOL = 20_000

# Runs of one DATA and backbone share their points: their projection is computed once per report.
_projections: dict[tuple, tuple[np.ndarray, np.ndarray, str]] = {}


@dataclass
class FeaturePictures:
    """The map's HTML, each misclassified path's nearest training images, the folder thumbnails are read from,
    a note on the search; or `unavailable`, the one line saying why there are none."""

    map_html: str = ""
    # the printable path (`report.shown`) of a misclassified image -> (path, label, cosine similarity) of its nearest
    neighbours: dict[str, list[tuple[str, str, float]]] = field(default_factory=dict)
    root: Path | None = None
    note: str = ""
    unavailable: str | None = None


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def nearest(query: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, cosine similarities), each (len(query), k): the k rows of `pool` nearest each query row."""
    similarity = _unit(np.asarray(query, np.float64)) @ _unit(np.asarray(pool, np.float64)).T
    k = min(k, pool.shape[0])
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarity, order, axis=1)


def feature_pictures(folder: Path, config: dict, wrong: list[dict], count: int, seed: int = 0) -> FeaturePictures:
    """The map and the first `count` misclassified rows' (metrics.json's `misclassified`) nearest training images."""
    try:
        images = run_images(folder, config)
        return _pictures(images, config, wrong, count, seed)
    except BottleneckError as exc:
        return FeaturePictures(unavailable=str(exc))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:  # a store damaged since the run, a
        # hand-edited split.csv or config.json: the rest of the report stands
        return FeaturePictures(unavailable=f"{type(exc).__name__}: {exc}")


def _finite(images, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions whose stored features are finite, their features): rows rotted to NaN or infinity are left out."""
    features = images.features(positions)
    finite = np.isfinite(features).all(axis=1)
    return np.asarray(positions)[finite], features[finite]


def _pictures(images, config: dict, wrong: list[dict], count: int, seed: int) -> FeaturePictures:
    position = {relpath: i for i, relpath in enumerate(images.relpaths)}
    wrong = [row for row in wrong if isinstance(row, dict) and row.get("path") in position]
    mistakes = {row["path"]: row for row in wrong}
    kinds = [
        MISCLASSIFIED if relpath in mistakes and split == "test" else ""
        for relpath, split in zip(images.relpaths, images.splits)
    ]
    chosen = choose_points(kinds, MAX_POINTS, seed)
    key = (str(config.get("store")), images.rows[chosen].tobytes(), seed)
    if key not in _projections:
        _projections.clear()  # one at a time: a report over many data sets holds one projection
        kept, features = _finite(images, chosen)
        _projections[key] = (kept, *project_2d(features, seed)) if len(kept) else (kept, np.zeros((0, 2)), "none")
    kept, xy, method = _projections[key]

    def caption(i: int) -> str:
        text = f"{images.relpaths[i]}\n{images.labels[i]} ({images.splits[i]})"
        row = mistakes.get(images.relpaths[i]) if kinds[i] else None
        return text + (f"\npredicted {row.get('predicted')} ({float(row.get('confidence', 0)):.2f})" if row else "")

    rotted = len(chosen) - len(kept)
    if not len(kept):
        raise CacheError(
            f"all {len(chosen)} of its images have non-finite features (NaN or infinity) in {config.get('store')}"
        )
    embedding = Embedding(
        xy,
        [images.relpaths[i] for i in kept],
        [images.labels[i] for i in kept],
        [caption(i) for i in kept],
        [kinds[i] for i in kept],
        method,
        len(images.relpaths) - rotted,
    )
    drawn = map_html(embedding, images.root, {MISCLASSIFIED: "misclassified test image"})
    if rotted:
        drawn += (
            f'<p class="warning">{rotted} images have non-finite features (NaN or infinity) in the feature store '
            "and are left out of the map (bit rot? `bottleneck cache info` lists its segments)</p>"
        )
    neighbours, note = _nearest_training(images, [row["path"] for row in wrong[:count]], position, seed)
    if images.left_out:
        note += f"; {images.left_out} images of its split.csv have no file or features any more"
    return FeaturePictures(drawn, neighbours, images.root, note)


def _nearest_training(images, paths: list[str], position: dict[str, int], seed: int) -> tuple[dict, str]:
    from bottleneck.text import shown

    train = np.array([i for i, split in enumerate(images.splits) if split == "train"], np.int64)
    if len(train) > MAX_POOL:
        train = np.sort(np.random.default_rng(seed).choice(train, MAX_POOL, replace=False))
    sample = len(train) < sum(split == "train" for split in images.splits)
    train, pool = _finite(images, train)
    asked, query = _finite(images, np.array([position[path] for path in paths], np.int64))
    if not len(asked) or not len(train):
        return {}, ""
    found, similarity = nearest(query, pool, NEIGHBOURS)
    note = (
        f"nearest of {'a seeded sample of ' if sample else 'the '}{len(train)} training images by cosine similarity "
        "of cached features"
    )
    neighbours = {
        shown(images.relpaths[i]): [
            (images.relpaths[train[j]], images.labels[train[j]], float(s)) for j, s in zip(row, sims)
        ]
        for i, row, sims in zip(asked, found, similarity)
    }
    return neighbours, note
