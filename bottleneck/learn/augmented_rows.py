"""`train-head --augment`: the cached augmented views of the training images, as extra training rows."""

from __future__ import annotations

import shlex
from typing import Callable

import numpy as np

from bottleneck import naming
from bottleneck.errors import DataError
from bottleneck.learn.dataset import LabelledFeatures
from bottleneck.learn.run_checks import _as_array, _targets


def augmented_training_rows(
    data: LabelledFeatures,
    train: np.ndarray,
    views: int,
    data_dir,
    log: Callable[[str], None],
    flip: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features, labels, record) of the cached views of the training images only (`train` is their mask).

    `views` per image, or 0 for every view the view store holds; `flip` picks the recipe as
    `features --augment-flip` did. One line when the cache holds none.
    """
    from bottleneck.features.augment import other_view_recipes, recipe_from, view_key, views_held
    from bottleneck.features.maintenance import store_of

    if not data.rows.in_memory:
        raise DataError(
            "--augment trains in memory, and these features are streamed from the store: raise --max-memory "
            "or train without --augment"
        )
    recipe = recipe_from(flip)
    cache = data.store_path.parent
    fingerprint = naming.views_fingerprint(data.store_path.stem, recipe.digest())
    flip_flag = f" --augment-flip {flip:g}" if flip is not None else ""
    command = (
        f"run `bottleneck features {shlex.quote(str(data_dir))} --cache {shlex.quote(str(cache))} --augment "
        f"{views or 4}{flip_flag}` with the same backbone flags first"
    )
    if not naming.store_index(cache, fingerprint).exists():
        others = other_view_recipes(cache, data.store_path.stem)
        if others:
            held_flips = " or ".join(f"--augment-flip {recipe.flip:g}" for recipe in others)
            raise DataError(
                f"--augment: {cache} holds views of these features for another recipe ({held_flips}), "
                f"not for --augment-flip {recipe.flip:g}: pass {held_flips.split(' or ')[0]}, or {command}"
            )
        raise DataError(f"--augment: {cache} holds no augmented views of these features; {command}")
    store = store_of(cache, fingerprint)
    held = views_held(store)
    count = views or held
    if count > held:
        raise DataError(
            f"--augment {count}: the cache holds {held} views per image; {command.replace(f'--augment {views}', f'--augment {count}')}"
        )
    positions = np.flatnonzero(train)
    targets = _targets(data)
    hashes = [data.content_hashes[i] for i in positions]
    known = set(store.index().content_hash)
    keys, labels = [], []
    missing = 0
    for i, content_hash in zip(positions, hashes):
        for k in range(count):
            key = view_key(content_hash, recipe, k)
            if key in known:
                keys.append(key)
                labels.append(targets[i])
            else:
                missing += 1
    if not keys:
        raise DataError(f"--augment: none of the training images has views in {store.path.name}; {command}")
    if missing:
        log(
            f"warning: {missing} views of training images are not in the cache (images added since?) and are left out; "
            f"{command} to add them"
        )
    record = {
        "recipe": recipe.identity(),
        "digest": recipe.digest(),
        "views_per_image": count,
        "rows_added": len(keys),
        "store": str(store.path.absolute()),
    }
    return store.read_rows(keys), _as_array(labels, targets.dtype), record
