"""Augmented views that keep the cache: `features --augment N`, `train-head --augment`, `predict --tta`.

`retrain.py` augmented by pushing every distorted image through the network again on every step,
which made training "exceedingly slow" (tensorflow#1882, #2669). Here view k of an image is a
fixed function of (recipe, content hash, k): a horizontal flip, a random resized crop and a
brightness/contrast change drawn from a NumPy generator seeded by those three, applied to the
decoded image (the one decoder `features` uses). Its features are computed once and cached in a
store of its own, `<backbone fingerprint>-aug-<recipe digest>`, keyed by sha256(content hash,
recipe, k), so every experiment reuses them like any feature.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bottleneck import naming
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.bounds import VIEWS
from bottleneck.errors import DataError
from bottleneck.features.store import FeatureStore, MemoryWriter

#: Attribute of a view store: the largest number of views per image computed so far.
VIEWS_ATTR = "views_per_image"


@dataclass(frozen=True)
class AugmentRecipe:
    """How views are drawn; its digest names the view store, so another recipe never mixes in."""

    seed: int = 0
    flip: float = 0.5  # probability of a horizontal flip
    crop_area: tuple[float, float] = (0.6, 1.0)  # share of the image a crop keeps
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.2  # factor drawn in [1 - b, 1 + b]
    contrast: float = 0.2
    version: int = 1  # of the code below: a change in how views are made must change the digest

    def identity(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]


DEFAULT_RECIPE = AugmentRecipe()


def recipe_from(flip: float | None = None) -> AugmentRecipe:
    """The default recipe, with another flip probability (`--augment-flip`; 0 for digits and text)."""
    return DEFAULT_RECIPE if flip is None else AugmentRecipe(flip=float(flip))


def recipe_from_record(record: dict | None) -> AugmentRecipe:
    """The recipe a run recorded (JSON turns its pairs into lists), or the default one."""
    if not record:
        return DEFAULT_RECIPE
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
    return AugmentRecipe(**fields)


def view_key(content_hash: str, recipe: AugmentRecipe, k: int) -> str:
    """The 64-hex key of view k of an image in the view store."""
    return hashlib.sha256(f"{content_hash}:{recipe.digest()}:{k}".encode()).hexdigest()


def make_view(pixels: np.ndarray, content_hash: str, recipe: AugmentRecipe, k: int) -> np.ndarray:
    """View k of a decoded (size, size, 3) uint8 image: the same for the same (recipe, content, k), anywhere."""
    from PIL import Image

    rng = np.random.default_rng([recipe.seed, int(content_hash[:15], 16), k])
    size = pixels.shape[0]
    area = rng.uniform(*recipe.crop_area) * size * size
    aspect = np.exp(rng.uniform(np.log(recipe.crop_aspect[0]), np.log(recipe.crop_aspect[1])))
    width = int(round(min(size, np.sqrt(area * aspect))))
    height = int(round(min(size, np.sqrt(area / aspect))))
    left = int(rng.integers(0, size - width + 1))
    top = int(rng.integers(0, size - height + 1))
    flip = rng.random() < recipe.flip
    brightness = rng.uniform(1 - recipe.brightness, 1 + recipe.brightness)
    contrast = rng.uniform(1 - recipe.contrast, 1 + recipe.contrast)
    image = (
        Image.fromarray(pixels)
        .crop((left, top, left + width, top + height))
        .resize((size, size), Image.Resampling.BILINEAR)
    )
    out = np.asarray(image, dtype=np.float32)
    if flip:
        out = out[:, ::-1]
    mean = out.mean()
    out = (out - mean) * contrast + mean * brightness
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def view_store(cache_dir: str | os.PathLike, plain: FeatureStore, recipe: AugmentRecipe) -> FeatureStore:
    """The store of `recipe`'s views of the images whose plain features `plain` holds."""
    recorded = plain.attrs if "architecture" in plain.attrs else plain.index().attrs  # opened by name: read its file
    attrs = {
        k: (v.item() if hasattr(v, "item") else v)
        for k, v in recorded.items()
        if k not in ("fingerprint", "format_version", "created", "updated", "dtype")
    }
    attrs.update(augment_recipe=json.dumps(recipe.identity()), augments=plain.fingerprint)
    return FeatureStore(
        cache_dir, naming.views_fingerprint(plain.fingerprint, recipe.digest()), plain.feature_dim, attrs
    )


def views_held(store: FeatureStore) -> int:
    """How many views per image the view store was asked for (0 if it does not exist)."""
    if not store.path.exists():
        return 0
    import h5py

    with h5py.File(store.path, "r") as handle:
        return int(handle.attrs.get(VIEWS_ATTR, 0))


def other_view_recipes(cache_dir: str | os.PathLike, plain_fingerprint: str) -> list[AugmentRecipe]:
    """The recipes of the view stores in `cache_dir` that hold views of `plain_fingerprint`'s features."""
    import h5py

    recipes = []
    for path in sorted(Path(cache_dir).glob(naming.views_glob(plain_fingerprint))):
        try:
            with h5py.File(path, "r") as handle:
                recipes.append(recipe_from_record(json.loads(handle.attrs["augment_recipe"])))
        except (
            OSError,
            KeyError,
            ValueError,
            TypeError,
        ):  # not a view store of ours, or damaged: not a recipe to offer
            continue
    return recipes


@dataclass
class ViewRun:
    computed: int
    reused: int
    store: Path
    in_memory: MemoryWriter | None = None  # a cache that could not be written: the views computed in this process


def _views_on_engine(
    todo: list[tuple[str, str, list[int]]],
    writer,
    spec: BackboneSpec,
    recipe: AugmentRecipe,
    views: int,
    options,
    cache: Path,
    log: Callable[[str], None],
) -> int:
    """The views of `todo` computed by a sharded engine (Ray) into `writer`'s view store; how many were computed."""
    from bottleneck.features.discover import ImageFile
    from bottleneck.features.engines import Tally, ViewPlan, get_engine
    from bottleneck.features.hashing import HashIndex, file_stamp
    from bottleneck.features.shards import member_of

    tally = Tally()
    for path, content_hash, _ in todo:
        try:
            size, mtime_ns, inode = file_stamp(path)
        except OSError as exc:  # gone since `features` read it
            log(f"warning: no views of {path}: cannot read file: {exc.strerror or exc}")
            continue
        member = None if os.path.isfile(path) else member_of(path)
        tally.todo.append(
            (
                ImageFile(Path(path), path, "", size, mtime_ns, inode, container=member.shard if member else ""),
                content_hash,
            )
        )
    engine = get_engine(options)
    engine.check()
    index = HashIndex(cache)
    try:
        engine.start(spec, cache, log)
        try:
            engine.run(tally, writer, index, spec, log, views=ViewPlan(recipe, views))
        finally:
            engine.stop()
    finally:
        index.close()
    return tally.computed


def compute_views(
    images: list[tuple[str, str]],
    cache_dir: str | os.PathLike,
    spec: BackboneSpec,
    plain: FeatureStore,
    views: int,
    recipe: AugmentRecipe = DEFAULT_RECIPE,
    runtime: str = "auto",
    batch_size: int = 16,
    workers: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
    writable: bool = True,
    max_pixels: int | None = None,
    engine_options=None,
) -> ViewRun:
    """Make sure `views` views of each (path, content hash) in `images` are in the view store.

    Each image is read and decoded once for all its missing views; batches are committed as they
    are computed (an interrupted run keeps them), and an unchanged rerun computes nothing. On a
    cache that cannot be written (`writable=False`) the missing views stay in memory (`in_memory`).
    Images are read and decoded as `features` does them: `max_pixels` (None: the default), and decoder
    warnings to the cache's log, not over the progress bar. `engine_options` (an `ExtractOptions` whose
    engine is `ray`) computes the views in shards on that engine instead, a segment per shard.
    """
    from bottleneck.backbones.runtime import get_feature_model
    from bottleneck.errors import stop_if_interrupted
    from bottleneck.features.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, UnreadableImage, decode_image_file
    from bottleneck.features.engines import computed_by, non_finite_rows
    from bottleneck.features.engines.local import bounded_map, make_bar
    from bottleneck.features.noise import decoder_log_in, decoder_noise_to, decoding

    VIEWS.check(views, "--augment", DataError, f"{VIEWS.must} views per image")
    store = view_store(cache_dir, plain, recipe)
    with store.writer() if writable else contextlib.nullcontext(MemoryWriter(store)) as writer:
        todo, queued = [], set()
        for path, content_hash in images:
            missing = [k for k in range(views) if view_key(content_hash, recipe, k) not in writer.known_hashes]
            if missing and content_hash not in queued:  # a picture held twice (a copy, a link) gets its views once
                queued.add(content_hash)
                todo.append((path, content_hash, missing))
        reused = len(images) * views - sum(len(m) for _, _, m in todo)
        computed = non_finite = 0
        if todo and engine_options is not None and engine_options.engine != "local" and writable:
            computed = _views_on_engine(todo, writer, spec, recipe, views, engine_options, Path(cache_dir), log)
        elif todo:
            model = get_feature_model(spec, runtime, Path(cache_dir))
            bar = make_bar(sum(len(m) for _, _, m in todo), progress, unit="view")
            pending: list[tuple[np.ndarray, str, str]] = []

            def prepare(item):
                path, content_hash, missing = item
                try:  # the guards of `features`: no FIFO, no file past the size limit
                    with decoding(path):
                        pixels = decode_image_file(path, spec.input_size, max_pixels or DEFAULT_MAX_PIXELS)
                except (UnreadableImage, ImageDecodeError) as exc:  # changed or gone since `features` read it
                    log(f"warning: no views of {path}: {exc}")
                    return []
                return [
                    (make_view(pixels, content_hash, recipe, k), view_key(content_hash, recipe, k), path)
                    for k in missing
                ]

            def flush() -> None:
                nonlocal computed, non_finite
                if pending:
                    features = np.asarray(model(np.stack([p for p, _, _ in pending])), np.float32)
                    good = ~non_finite_rows(features)  # as `features` does: NaN or infinity is never stored
                    kept = [item for item, ok in zip(pending, good) if ok]
                    writer.commit(
                        [key for _, key, _ in kept],
                        features[good],
                        [path for _, _, path in kept],
                        computed_by=computed_by(model),
                    )
                    computed += len(kept)
                    non_finite += len(pending) - len(kept)
                    bar.update(len(pending))
                    pending.clear()

            try:
                with decoder_noise_to(decoder_log_in(Path(cache_dir), writable)):
                    for made in bounded_map(prepare, todo, workers or os.cpu_count() or 1, 2 * (workers or 2)):
                        stop_if_interrupted()
                        pending.extend(made)
                        if len(pending) >= batch_size:
                            flush()
                    flush()
            finally:
                bar.close()
        if non_finite:
            log(
                f"warning: the backbone gave non-finite features (NaN or infinity) for {non_finite} views; they are not "
                "stored (a damaged weight?)"
            )
        writer.finish({VIEWS_ATTR: max(views, views_held(store))})
    return ViewRun(computed, reused, store.path, writer if isinstance(writer, MemoryWriter) else None)
