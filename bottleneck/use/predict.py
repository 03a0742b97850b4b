"""`bottleneck predict`: the labels a trained run gives new images, through the pipeline `features` uses.

A multi-label run gives each image every label whose probability reaches that label's threshold
(chosen on the validation split when the run was trained), with every label's probability.

Images whose content is already cached are not decoded again; the rest are read, decoded and
computed by the same threaded, batched code as `features` (and cached, so a second prediction
is free). A file that cannot be used gets its one-line reason; the others go on.
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck import naming
from bottleneck.bounds import TOP
from bottleneck.errors import DataError
from bottleneck.features.decode import NOT_A_FILE
from bottleneck.features.discover import ImageFile, holds_images, shard_members, shard_source_of, shards_in, walk_images
from bottleneck.features.extract import ExtractOptions, compute_into_store
from bottleneck.features.shards import member_of
from bottleneck.learn.run_folder import LoadedRun, load_run


@dataclass
class Prediction:
    """One image: its top labels with probabilities, or why it has none.

    A multi-label run also gives `labels`: every label at or over its threshold, most probable first
    (`top` then holds every label's probability)."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    labels: list[tuple[str, float]] | None = None
    probabilities: dict[str, float] = field(default_factory=dict)  # every label's, in the run's order (--csv)

    def as_json(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        if self.labels is not None:
            return {
                "path": self.path,
                "labels": [label for label, _ in self.labels],
                "probabilities": {label: p for label, p in self.top},
            }
        return {"path": self.path, "top": [{"label": label, "probability": p} for label, p in self.top]}


@dataclass
class PredictResult:
    """What a `predict` call did."""

    predictions: list[Prediction]
    computed: int
    reused: int
    seconds: float
    skipped: Counter = field(default_factory=Counter)
    views_computed: int = 0  # augmented views computed for --tta

    @property
    def failed(self) -> int:
        return sum(p.error is not None for p in self.predictions)

    @property
    def images_per_second(self) -> float:
        """Computed images per second, or all images per second when none needed computing."""
        done = self.computed or len(self.predictions)
        return done / self.seconds if self.seconds > 0 else 0.0


def list_inputs(
    paths: list[str], cache_dir: str | os.PathLike | None = None
) -> tuple[list[ImageFile], list[Prediction], Counter]:
    """The image files named by `paths` (folders searched recursively, shards listed: their listings remembered
    in `cache_dir`), and a failure for each missing path.

    Each image's `relpath` is the path to show: as given, or the folder as given joined with the path inside it.
    """
    images: list[ImageFile] = []
    missing: list[Prediction] = []
    skipped: Counter = Counter()
    seen: set[tuple[int, int]] = set()
    for given in paths:
        path = Path(given)
        shards = shard_source_of(given) or (
            (path, shards_in(path)) if path.is_dir() and not holds_images(path) else None
        )
        if shards is not None and shards[1]:  # tar shards, or a folder of them: their image members
            found, found_skipped, _ = shard_members(
                path if path.is_dir() else shards[0], shards[1], cache_dir=cache_dir
            )
            skipped.update(found_skipped)
            images.extend(replace(image, relpath=_shown(given, image, path.is_dir())) for image in found)
            continue
        if path.is_dir():
            found = sorted(walk_images(path, path, "", seen, skipped), key=lambda im: im.relpath)
            images.extend(replace(image, relpath=os.path.join(given, image.relpath)) for image in found)
            continue
        member = member_of(given)
        if member is not None:  # one image inside a tar shard
            images.append(
                ImageFile(
                    path.absolute(), given, "", member.size, member.stamp[1], member.stamp[2], container=member.shard
                )
            )
            continue
        try:
            st = path.stat()
        except OSError as exc:
            missing.append(Prediction(given, error=f"cannot read file: {exc.strerror or exc}"))
            continue
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader for good, /dev/zero fill the memory
            missing.append(Prediction(given, error=NOT_A_FILE))
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        # A file named explicitly is tried whatever its extension: decoding says whether it is an image.
        images.append(ImageFile(path.absolute(), given, "", st.st_size, st.st_mtime_ns, st.st_ino))
    return images, missing, skipped


def _shown(given: str, image: ImageFile, in_folder: bool) -> str:
    """How an image found from `given` is shown: under the folder as given, or its path as given (relative or not)."""
    if in_folder:
        return os.path.join(given, image.relpath)
    return str(image.path) if os.path.isabs(given) else os.path.relpath(image.path)


def _top(probabilities: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(labels[i], float(probabilities[i])) for i in order]


def _predicted(shown: str, probabilities: np.ndarray, run: LoadedRun, top: int) -> Prediction:
    """One image's prediction: its top `top` labels; multi-label: the labels over their thresholds, and every
    label's probability."""
    every = {label: float(p) for label, p in zip(run.labels, probabilities)}
    if run.thresholds is None:
        return Prediction(shown, _top(probabilities, run.labels, top), probabilities=every)
    return Prediction(
        shown,
        _top(probabilities, run.labels, len(run.labels)),
        labels=run.thresholds.labels_above(probabilities),
        probabilities=every,
    )


def _averaged_over_views(
    run: LoadedRun,
    usable: list[ImageFile],
    done,
    probabilities: np.ndarray,
    tta: int,
    options: ExtractOptions,
    log: Callable[[str], None],
) -> tuple[np.ndarray, int]:
    """The mean of the head's probabilities over each image and its cached augmented views, and the views computed."""
    from bottleneck.features.augment import compute_views, recipe_from_record, view_key

    recorded = run.config.get("augment") or {}
    recipe = recipe_from_record(recorded.get("recipe"))  # the views the head trained on, else the default
    trained = recorded.get("views_per_image")
    if not trained:
        log(
            f"warning: run {run.run_id} was trained without augmented views; averaging over views it never saw "
            "usually costs accuracy (-16 points on the demo): train with `train-head --augment` for --tta"
        )
    views = tta or trained or 4
    hashes = [done.hash_of[str(image.path)] for image in usable]
    made = compute_views(
        list(zip((str(im.path) for im in usable), hashes)),
        run.cache_dir,
        run.spec,
        done.store,
        views,
        recipe,
        runtime=options.runtime,
        batch_size=16 if options.batch_size == "auto" else int(options.batch_size),  # validated: auto or whole
        workers=options.workers,
        log=log,
        writable=done.in_memory is None,
    )
    from bottleneck.features.maintenance import store_of

    store = made.in_memory or store_of(run.cache_dir, made.store.stem)
    total = np.array(probabilities, dtype=np.float64)
    for k in range(views):
        total += run.classify(store.read_rows([view_key(h, recipe, k) for h in hashes]))
    return total / (views + 1), made.computed


def predict_images(
    run: LoadedRun | str | os.PathLike,
    paths: list[str],
    top: int = 3,
    options: ExtractOptions | None = None,
    log: Callable[[str], None] = lambda message: None,
    tta: int | None = None,
) -> PredictResult:
    """Predict every image named by `paths` with a run (a folder or a `LoadedRun`).

    `tta` (test-time augmentation): also classify that many augmented views of each image (0: as
    many as the run trained on, else 4), cached like features, and average the probabilities.
    """
    TOP.check(top, "--top", DataError)
    started = time.monotonic()
    run = run if isinstance(run, LoadedRun) else load_run(run)
    images, predictions, skipped = list_inputs(paths, run.cache_dir)
    if not images and not predictions:
        raise DataError(f"no images found in {', '.join(paths)}")
    computed = reused = views_computed = 0
    if images:
        store_file = naming.store_index(run.cache_dir, run.fingerprint)
        if not run.fine_tuned and not store_file.exists():
            log(
                f"warning: the feature store of run {run.run_id} ({store_file}) is gone; "
                "every image is computed and cached anew"
            )
        done = compute_into_store(images, run.cache_dir, run.spec, options or ExtractOptions(), log, read_only_ok=True)
        computed, reused = done.computed, done.reused
        usable = [image for image in images if str(image.path) in done.hash_of]
        features = done.read_rows([done.hash_of[str(im.path)] for im in usable]) if usable else np.zeros((0, 1))
        finite = np.asarray(np.isfinite(features).all(axis=1))  # an array: numpy's stub also allows a scalar
        reasons = {failure.path: failure.reason for failure in done.failures}
        for image in (im for im, ok in zip(usable, finite) if not ok):  # bit rot in the store: never a guess
            reasons[str(image.path)] = (
                "its cached features are not finite (NaN or infinity: bit rot in the store?); "
                "`bottleneck cache info` lists the store's segments: delete the damaged one"
            )
        usable, features = [im for im, ok in zip(usable, finite) if ok], features[finite]
        probabilities: np.ndarray | list = []
        if usable:
            probabilities = run.classify(features)
            if tta is not None:
                probabilities, views_computed = _averaged_over_views(
                    run, usable, done, probabilities, tta, options or ExtractOptions(), log
                )
        by_path = {str(image.path): _predicted(image.relpath, p, run, top) for image, p in zip(usable, probabilities)}
        for image in images:
            key = str(image.path)
            predictions.append(
                by_path.get(key) or Prediction(image.relpath, error=reasons.get(key, "no features were computed"))
            )
    result = PredictResult(predictions, computed, reused, time.monotonic() - started, skipped, views_computed)
    if result.failed == len(predictions):
        first = predictions[0]
        raise DataError(
            f"no image could be predicted: all {len(predictions)} failed (first: {first.path}: {first.error})"
        )
    return result
