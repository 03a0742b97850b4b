"""The local engine (the default): one process, batches committed as they are computed.

A pool of lower-priority threads reads, hashes and decodes ahead while the backbone runs on the
previous batch, and each computed batch is committed to the store at once by another thread, so
an interrupted run loses at most the batch in flight. `--workers` is the number of decoding
threads here. The reading and decoding helpers are shared with the sharded engines' workers.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np

from bottleneck.backbones.compile import auto_batch_size
from bottleneck.backbones.runtime import get_feature_model, resolve_runtime
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import stop_if_interrupted
from bottleneck.features.decode import ImageDecodeError, UnreadableImage, decode_image, read_image_file
from bottleneck.features.discover import ImageFile
from bottleneck.features.engines.base import DEFAULT_BATCH_SIZE, NON_FINITE, computed_by, non_finite_rows
from bottleneck.features.hashing import sha256_bytes
from bottleneck.features.noise import decoding
from bottleneck.features.store import Failure, FeatureWriter

if TYPE_CHECKING:
    from bottleneck.features.engines.sharded import ViewPlan

T = TypeVar("T")
R = TypeVar("R")
DECODE_NICENESS = 10


@dataclass
class Outcome:
    image: ImageFile
    content_hash: str = ""
    stamp: tuple[int, int, int] | None = None
    pixels: np.ndarray | None = None
    failure: Failure | None = None
    known: bool = False  # the content already has features


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, text: str) -> None: ...
    def write(self, text: str) -> None: ...
    def set_description_str(self, text: str) -> None: ...
    def close(self) -> None: ...


def make_bar(total: int, progress: bool, unit: str = "img", desc: str = "features", leave: bool = True):
    if not progress or total == 0:
        return _NullBar()
    from tqdm.auto import tqdm  # a widget in a notebook, the usual bar on a terminal

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr, smoothing=0.1, leave=leave)


def read_and_decode(image: ImageFile, known_hash: str | None, known, size: int, max_pixels: int) -> Outcome:
    """Read, hash and decode one image; `known` has `known_hashes` and `known_failures` (a StoreWriter does)."""
    path = str(image.path)
    try:
        data, stamp = read_image_file(path, max_pixels)
    except UnreadableImage as exc:
        return Outcome(image, failure=Failure(path, "", str(exc)))
    outcome = Outcome(image, content_hash=known_hash or sha256_bytes(data), stamp=stamp)
    if outcome.content_hash in known.known_hashes:
        outcome.known = True
        return outcome
    earlier = known.known_failures.get(outcome.content_hash)
    if earlier is not None:
        outcome.failure = Failure(path, outcome.content_hash, earlier.reason)
        return outcome
    try:
        with decoding(path):
            outcome.pixels = decode_image(data, size, max_pixels)
    except ImageDecodeError as exc:
        outcome.failure = Failure(path, outcome.content_hash, str(exc))
    return outcome


def _lower_thread_priority() -> None:
    """Let the backbone's threads win the CPU: decoding only has to keep ahead of the model."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """`map` over a thread pool, in order, with at most `ahead` items in flight."""
    with ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="decode", initializer=_lower_thread_priority
    ) as pool:
        pending: deque = deque()
        source = iter(items)
        try:
            for item in islice(source, ahead):
                pending.append(pool.submit(fn, item))
            while pending:
                result = pending.popleft().result()
                for item in islice(source, 1):
                    pending.append(pool.submit(fn, item))
                yield result
        finally:
            for future in pending:
                future.cancel()


class _Batcher:
    """Collects decoded images, runs the backbone on full batches, commits them in the background.

    One commit is in flight at a time, so the backbone never waits for the disk and a killed run
    loses at most the batch being computed and the one being written.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        writer: FeatureWriter,
        batch_size: int,
        runtime: str,
        on_model: Callable[[str], None],
        model_dir: Path,
    ):
        self.spec, self.writer, self.batch_size, self.runtime = spec, writer, batch_size, runtime
        self.model_dir = model_dir  # where OpenVINO conversions live: the cache, or scratch beside a read-only one
        self.on_model = on_model
        self.model: Any = None  # the runtime's feature model, loaded at the first batch
        self.pixels: list[np.ndarray] = []
        self.hashes: list[str] = []
        self.paths: list[str] = []
        self.computed = 0
        self.non_finite: list[Failure] = []  # images the backbone gave NaN or infinity for
        self._taken: set[str] = set()  # every hash computed or queued in this run
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self._in_flight: Future | None = None

    def holds(self, content_hash: str) -> bool:
        return content_hash in self._taken

    def add(self, outcome: Outcome) -> bool:
        """Queue one decoded image; return True when that completed a batch."""
        assert outcome.pixels is not None  # only a decoded image whose content has no features yet is added
        self.pixels.append(outcome.pixels)
        self.hashes.append(outcome.content_hash)
        self._taken.add(outcome.content_hash)
        self.paths.append(str(outcome.image.path))
        if len(self.pixels) >= self.batch_size:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if not self.pixels:
            return
        if self.model is None:
            if self.spec.kind != "pixels":  # the raw image: there is no network, no weights to load
                detail = f"cut at {self.spec.layer}" if self.spec.kind == "file" else f"{self.spec.weights} weights"
                chosen = resolve_runtime(self.runtime, self.spec)
                runtime = f", {chosen}" if chosen != "keras" else ""
                runtime += f", {self.spec.precision}" if self.spec.precision != "float32" else ""
                self.on_model(f"loading backbone {self.spec.architecture} ({detail}{runtime})")
            self.model = get_feature_model(self.spec, self.runtime, self.model_dir)
        features = np.asarray(self.model(np.stack(self.pixels)))
        bad = non_finite_rows(features)
        if bad.any():
            for path, content_hash in zip(np.array(self.paths)[bad], np.array(self.hashes)[bad]):
                failure = Failure(str(path), str(content_hash), NON_FINITE)
                self.non_finite.append(failure)
                self.writer.add_failure(failure)
            features = features[~bad]
            self.hashes = [h for h, is_bad in zip(self.hashes, bad) if not is_bad]
            self.paths = [p for p, is_bad in zip(self.paths, bad) if not is_bad]
        self._wait_for_commit()
        self._in_flight = self._committer.submit(
            self.writer.commit, self.hashes, features, self.paths, computed_by(self.model)
        )
        self.computed += len(self.hashes)
        self.pixels, self.hashes, self.paths = [], [], []

    def _wait_for_commit(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()  # re-raises a failed write here, in the main thread
            self._in_flight = None

    def close(self) -> None:
        """Wait for the last commit and stop the commit thread."""
        try:
            self._wait_for_commit()
        finally:
            self._committer.shutdown(wait=True)


def _count_non_finite(tally, non_finite: list[Failure]) -> None:
    """Images whose features came out non-finite are failures, with every other path of the same content."""
    bad = {failure.content_hash: failure.reason for failure in non_finite}
    for path, content_hash in list(tally.hash_of.items()):
        if content_hash in bad:
            del tally.hash_of[path]
            tally.failures.append(Failure(path, content_hash, bad[content_hash]))
            if path not in {failure.path for failure in non_finite}:
                tally.reused -= 1


class LocalEngine:
    """Today's pipeline in this process: decoding threads ahead of the backbone, parts committed per batch."""

    name = "local"

    def __init__(self, options):
        self.options = options
        self.batch_size = options.batch_size if options.batch_size != "auto" else None
        self.model_dir: Path | None = None

    def check(self) -> None:
        """Nothing to check before the run."""

    def start(self, spec: BackboneSpec, cache_dir, log: Callable[[str], None]) -> None:
        """Load the backbone (once per process) before decoding starts, and settle `--batch-size auto`."""
        self.model_dir = Path(cache_dir)
        if spec.kind != "pixels":
            model = get_feature_model(spec, self.options.runtime, cache_dir)
            if self.batch_size is None:
                self.batch_size = auto_batch_size(model, DEFAULT_BATCH_SIZE, log)

    def stop(self) -> None:
        """Nothing to release."""

    def run(
        self,
        tally,
        writer: FeatureWriter,
        index,
        spec: BackboneSpec,
        log: Callable[[str], None],
        views: ViewPlan | None = None,
    ) -> None:
        """Read, hash, decode and compute `tally.todo`; commit as it goes."""
        if views is not None:  # augment.py computes views in this process with its own loop
            raise ValueError("the local engine computes plain features only")
        options = self.options
        batch_size = self.batch_size or DEFAULT_BATCH_SIZE
        bar = make_bar(len(tally.todo), options.progress)
        batcher = _Batcher(
            spec,
            writer,
            batch_size,
            options.runtime,
            on_model=bar.write if options.progress else log,
            model_dir=self.model_dir or writer.store.cache_dir,
        )
        workers = options.workers or os.cpu_count() or 1
        ahead = max(2 * batch_size, 4 * workers)

        def prepare(job: tuple[ImageFile, str | None]) -> Outcome:
            return read_and_decode(job[0], job[1], writer, spec.input_size, options.max_pixels)

        try:
            for outcome in bounded_map(prepare, tally.todo, workers, ahead):
                stop_if_interrupted()  # a KeyboardInterrupt some library swallowed
                if outcome.stamp is not None and outcome.content_hash:
                    index.remember(str(outcome.image.path), outcome.stamp, outcome.content_hash)
                if outcome.failure is not None:
                    tally.failures.append(outcome.failure)
                    writer.add_failure(outcome.failure)
                elif (
                    outcome.known or outcome.content_hash in writer.known_hashes or batcher.holds(outcome.content_hash)
                ):
                    tally.reused += 1
                    tally.hash_of[str(outcome.image.path)] = outcome.content_hash
                else:
                    tally.hash_of[str(outcome.image.path)] = outcome.content_hash
                    if batcher.add(outcome):
                        index.flush()
                bar.update(1)
                bar.set_postfix_str(f"computed {batcher.computed}, reused {tally.reused}, failed {len(tally.failures)}")
            batcher.flush()
            bar.set_postfix_str(f"computed {batcher.computed}, reused {tally.reused}, failed {len(tally.failures)}")
        finally:
            batcher.close()
            bar.close()
            index.flush()
        tally.computed += batcher.computed
        _count_non_finite(tally, batcher.non_finite)
        if batcher.model is not None:
            tally.versions = dict(batcher.model.versions)
