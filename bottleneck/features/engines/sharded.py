"""A sharded engine's three steps (plan shards, compute one shard, write one segment) and the driver that
takes in their results; `ShardedEngine.map_shards` is all a scheduler implements (see `bottleneck.features.engines`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from bottleneck import naming
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.features.discover import ImageFile
from bottleneck.features.engines.base import DEFAULT_BATCH_SIZE, NON_FINITE, Tally, computed_by, non_finite_rows
from bottleneck.features.store import Failure, FeatureStore, FeatureWriter
from bottleneck.text import error_line, printable

if TYPE_CHECKING:
    from bottleneck.features.augment import AugmentRecipe

DEFAULT_SHARD_SIZE = 2000
#: Tries of a shard inside one worker (Python errors); a killed worker is restarted by the engine.
SHARD_TRIES = 3
#: Test hook: 'raise-once:DIR', 'kill-once:DIR' (one shard, on its first try) or 'raise-always:DIR'
#: (the first shard, on every try). DIR holds the marker file that makes "once" once across processes.
FAULT_ENV = "BOTTLENECK_TEST_FAULT"


# ---------------------------------------------------------------------------------------------
# Step 1: plan


@dataclass(frozen=True)
class Shard:
    """A few thousand images computed and written together, named from their content."""

    index: int
    name: str
    items: tuple[tuple[ImageFile, str | None], ...]  # (image, remembered hash or None)


def shard_name(fingerprint: str, items: list[tuple[ImageFile, str | None]]) -> str:
    """A name that only these files, unchanged, under this backbone get: a retry finds its segment."""
    digest = hashlib.sha256(fingerprint.encode())
    for image, _ in items:
        digest.update(b"\0" + os.fsencode(str(image.path)) + f"\t{image.size}\t{image.mtime_ns}".encode())
    return digest.hexdigest()[:32]


def plan_shards(todo: list[tuple[ImageFile, str | None]], fingerprint: str, shard_size: int | None) -> list[Shard]:
    """Cut the todo list, in order, into shards of at most `shard_size` images (None: `DEFAULT_SHARD_SIZE`).

    The members of one tar shard make one shard of their own, so a segment is written per tar shard
    and each tar is read by one worker; only an explicit `shard_size` cuts a tar shard further.
    """
    shards: list[Shard] = []
    start = 0
    while start < len(todo):
        container = todo[start][0].container
        limit = shard_size or (len(todo) if container else DEFAULT_SHARD_SIZE)
        end = start + 1
        while end < len(todo) and end - start < limit and todo[end][0].container == container:
            end += 1
        items = todo[start:end]
        shards.append(Shard(len(shards), shard_name(fingerprint, items), tuple(items)))
        start = end
    return shards


@dataclass(frozen=True)
class ViewPlan:
    """A job of augmented views instead of plain features: `count` views of each image by `recipe`
    (`bottleneck.features.augment`), each row keyed by its view key, into the view store."""

    recipe: AugmentRecipe  # plain data
    count: int


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to compute shards of one run (plain data: it is pickled to workers)."""

    spec: BackboneSpec
    runtime: str
    store: FeatureStore  # plain data: paths, fingerprint, attributes
    batch_size: int | str  # or 'auto': each worker settles it for its own device
    max_pixels: int
    known_hashes: frozenset = frozenset()  # content already in the store when the run started
    known_failures: tuple = ()  # (key, Failure) of failures already recorded
    threads: int | None = None  # decoding threads per worker; None: one per CPU core of its machine
    tries: int = SHARD_TRIES
    views: ViewPlan | None = None  # None: plain features; else augmented views (`known_hashes` are view keys)

    def rows_of(self, content_hash: str, pixels: np.ndarray | None) -> Iterator[tuple[str, np.ndarray | None]]:
        """(row key, pixels to compute) of one decoded image: its content hash, or each of its views' keys."""
        if self.views is None:
            yield content_hash, pixels
            return
        from bottleneck.features.augment import make_view, view_key

        for k in range(self.views.count):
            key = view_key(content_hash, self.views.recipe, k)
            yield (
                key,
                (
                    None
                    if pixels is None or key in self.known_hashes
                    else make_view(pixels, content_hash, self.views.recipe, k)
                ),
            )


def make_job(
    writer: FeatureWriter,
    spec: BackboneSpec,
    options,
    threads: int | None = None,
    views: ViewPlan | None = None,
) -> ShardJob:
    return ShardJob(
        spec=spec,
        runtime=options.runtime,
        store=writer.store,
        batch_size=options.batch_size,
        max_pixels=options.max_pixels,
        known_hashes=frozenset(writer.known_hashes),
        known_failures=tuple(writer.known_failures.items()),
        threads=threads,
        views=views,
    )


# ---------------------------------------------------------------------------------------------
# Steps 2 and 3: compute one shard, write one segment


@dataclass
class ShardResult:
    """What one shard did, sent back to the driver (plain data)."""

    index: int
    name: str
    images: int
    rows: list[tuple[str, str]] = field(default_factory=list)  # (path, hash) computed into the segment
    reused: list[tuple[str, str]] = field(default_factory=list)  # (path, hash) whose content has features already
    stamps: list[tuple[str, tuple[int, int, int], str]] = field(default_factory=list)  # for the hash index
    failures: list[Failure] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    tries: int = 1
    resumed: bool = False  # its segment existed: nothing was computed again
    error: str = ""  # set when every try failed; nothing of the shard is kept


@dataclass
class ShardOutput:
    """A computed shard, before it is written."""

    result: ShardResult
    features: np.ndarray


class _Known:
    """What `_read_and_decode` asks about the store, from a job's snapshot."""

    def __init__(self, job: ShardJob):
        self.known_hashes = job.known_hashes
        self.known_failures = dict(job.known_failures)


def _test_fault(shard: Shard, when: str) -> None:
    """Fail on purpose when the tests ask for it (see FAULT_ENV); does nothing otherwise."""
    setting = os.environ.get(FAULT_ENV)
    if not setting:
        return
    mode, _, folder = setting.partition(":")
    if mode == "raise-always" and when == "start" and shard.index == 0:
        raise RuntimeError(f"injected failure of shard {shard.index}")
    if mode not in ("raise-once", "kill-once") or (mode == "raise-once") != (when == "start"):
        return
    try:  # the first process to create the marker fails; every later try goes through
        os.close(os.open(Path(folder) / "fault-once", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    if mode == "raise-once":
        raise RuntimeError(f"injected failure of shard {shard.index}")
    os.kill(os.getpid(), signal.SIGKILL)  # in the middle of the shard: computed, not written


class ShardRunner:
    """Computes shards of one job in this process, loading the model once."""

    def __init__(self, job: ShardJob):
        self.job = job
        self.store = job.store
        self.known = _Known(job)
        self.model = None
        self._batch_size: int | None = int(job.batch_size) if job.batch_size != "auto" else None

    def load_model(self):
        if self.model is None:
            from bottleneck.backbones.runtime import get_feature_model

            self.model = get_feature_model(self.job.spec, self.job.runtime, self.store.cache_dir)
        return self.model

    @property
    def batch_size(self) -> int:
        """The job's batch size; `auto` is settled once per worker, on its own device."""
        if self._batch_size is None:
            from bottleneck.backbones.compile import auto_batch_size

            model = self.load_model() if self.job.spec.kind != "pixels" else None
            self._batch_size = auto_batch_size(model, DEFAULT_BATCH_SIZE) if model is not None else DEFAULT_BATCH_SIZE
        return self._batch_size

    def _count_try(self, shard: Shard) -> int:
        """Record one more try of `shard` on disk and return its number: a try whose process died counts too."""
        self.store.segments_dir.mkdir(parents=True, exist_ok=True)
        with open(tries_path(self.store, shard.name), "ab") as handle:
            handle.write(b".")
            return handle.tell()

    def run(self, shard: Shard) -> ShardResult:
        """Compute and write `shard`, trying again on errors; a shard that fails every try says why.

        Tries are counted on disk, across processes: when an engine restarts a worker that died in
        this shard and sends it again, the shard gets `job.tries` tries in all, not one more each time.
        """
        error = "its worker process died on every try"
        for _ in range(self.job.tries):
            attempt = self._count_try(shard)
            if attempt > self.job.tries:
                break
            try:
                if self.store.segment_path(shard.name).exists():
                    result = self.summarise_written(shard)
                else:
                    _test_fault(shard, "start")
                    result = self.write(self.compute(shard))
                result.tries = attempt
                return result
            except Exception as exc:  # noqa: BLE001 - reported per shard, never lost
                error = error_line(exc)
        return ShardResult(shard.index, shard.name, len(shard.items), tries=self.job.tries, error=error)

    def compute(self, shard: Shard) -> ShardOutput:
        """Read, hash and decode (threads, ahead of the model) and compute the shard's new contents."""
        from bottleneck.features.engines.local import bounded_map, read_and_decode

        job = self.job
        result = ShardResult(shard.index, shard.name, len(shard.items))
        taken: set[str] = set()
        pending: list[np.ndarray] = []
        blocks: list[np.ndarray] = []
        threads = job.threads or os.cpu_count() or 1

        def prepare(item):
            return read_and_decode(item[0], item[1], self.known, job.spec.input_size, job.max_pixels)

        def flush() -> None:
            if pending:
                blocks.append(np.asarray(self.load_model()(np.stack(pending)), dtype=np.float32))
                pending.clear()

        batch_size = self.batch_size
        for outcome in bounded_map(prepare, shard.items, threads, max(2 * batch_size, 4 * threads)):
            path = str(outcome.image.path)
            if outcome.stamp is not None and outcome.content_hash:
                result.stamps.append((path, outcome.stamp, outcome.content_hash))
            if outcome.failure is not None:
                result.failures.append(outcome.failure)
                continue
            for key, pixels in job.rows_of(outcome.content_hash, None if outcome.known else outcome.pixels):
                if pixels is None or key in taken:
                    result.reused.append((path, key))
                    continue
                taken.add(key)
                result.rows.append((path, key))
                pending.append(pixels)
                if len(pending) >= batch_size:
                    flush()
                    if len(blocks) == 2:
                        _test_fault(shard, "middle")
        flush()
        _test_fault(shard, "middle")
        if self.model is not None:
            result.versions = dict(getattr(self.model, "versions", {}) or {})
        features = np.concatenate(blocks) if blocks else np.zeros((0, self.store.feature_dim), np.float32)
        bad = non_finite_rows(features)
        if bad.any():
            result.failures.extend(
                Failure(path, content_hash, NON_FINITE)
                for (path, content_hash), is_bad in zip(result.rows, bad)
                if is_bad
            )
            result.rows = [row for row, is_bad in zip(result.rows, bad) if not is_bad]
            features = features[~bad]
        return ShardOutput(result, features)

    def write(self, output: ShardOutput) -> ShardResult:
        """Write the shard's rows and failures as one segment (temporary name, rename)."""
        result = output.result
        self.store.write_segment(
            result.name,
            [h for _, h in result.rows],
            output.features,
            [p for p, _ in result.rows],
            result.failures,
            computed_by=computed_by(self.model) if self.model is not None else "numpy",
        )
        return result

    def summarise_written(self, shard: Shard) -> ShardResult:
        """The result of a shard whose segment an earlier try wrote: files are hashed again, not decoded."""
        from bottleneck.features.decode import UnreadableImage, read_image_file
        from bottleneck.features.hashing import sha256_bytes

        hashes, failures = self.store.segment_rows(shard.name)
        rows = set(hashes)
        failed = {failure.path: failure for failure in failures}
        result = ShardResult(shard.index, shard.name, len(shard.items), resumed=True)
        taken: set[str] = set()
        for image, known_hash in shard.items:
            path = str(image.path)
            if path in failed:
                result.failures.append(failed[path])
                continue
            try:
                data, stamp = read_image_file(path, self.job.max_pixels)
                content_hash = known_hash or sha256_bytes(data)
            except UnreadableImage as exc:
                result.failures.append(Failure(path, "", str(exc)))
                continue
            result.stamps.append((path, stamp, content_hash))
            for key, _ in self.job.rows_of(content_hash, None):
                if key in rows and key not in taken:
                    taken.add(key)
                    result.rows.append((path, key))
                else:
                    result.reused.append((path, key))
        return result


# ---------------------------------------------------------------------------------------------
# The driver's side of a sharded engine


def tries_path(store: FeatureStore, name: str) -> Path:
    """The file counting the tries of shard `name` (one byte each), removed when the run ends."""
    return store.segments_dir / naming.shard_tries_file(name)


def _make_bar(total: int, progress: bool, unit: str = "img"):
    from bottleneck.features.engines.local import make_bar

    return make_bar(total, progress, unit)


class ShardedEngine:
    """Plan shards, have `map_shards` compute and write each one somewhere, take in the results."""

    name = "sharded"

    def __init__(self, options):
        self.options = options

    def check(self) -> None: ...

    def start(self, spec: BackboneSpec, cache_dir: Path, log: Callable[[str], None]) -> None: ...

    def stop(self) -> None: ...

    def map_shards(self, job: ShardJob, shards: list[Shard], log: Callable[[str], None]) -> Iterator[ShardResult]:
        """Yield one result per shard, in any order (a shard may be missing: it is reported as failed)."""
        raise NotImplementedError

    def job(self, writer: FeatureWriter, spec: BackboneSpec, views: ViewPlan | None = None) -> ShardJob:
        return make_job(writer, spec, self.options, views=views)

    def run(
        self,
        tally: Tally,
        writer: FeatureWriter,
        index,
        spec: BackboneSpec,
        log: Callable[[str], None],
        views: ViewPlan | None = None,
    ) -> None:
        """Compute `tally.todo` into `writer`'s store: plain features, or with `views` the augmented views of
        each image (`tally.computed` then counts views)."""
        store = writer.store
        shards = plan_shards(tally.todo, store.fingerprint, self.options.shard_size)
        tally.shards = len(shards)
        if not shards:
            return
        with self.quiet(store.cache_dir):
            self._run(shards, tally, writer, index, spec, log, views)

    def quiet(self, cache_dir: Path) -> contextlib.AbstractContextManager:
        """Where the engine's own native output goes while it runs (nowhere else by default)."""
        return contextlib.nullcontext()

    def _run(
        self,
        shards: list[Shard],
        tally: Tally,
        writer: FeatureWriter,
        index,
        spec: BackboneSpec,
        log: Callable[[str], None],
        views: ViewPlan | None = None,
    ) -> None:
        store = writer.store
        bar = _make_bar(len(tally.todo), self.options.progress)
        self._remove_temporaries(store)  # the driver holds the lock: what is there is left by a dead run
        seen: set[str] = set()
        missing = {shard.index: shard for shard in shards}
        say = bar.write if self.options.progress else log
        try:
            for result in self.map_shards(self.job(writer, spec, views), shards, say):
                shard = missing.pop(result.index, None)
                if shard is None:
                    continue  # a second answer for a shard already taken in
                self._take(result, shard, tally, seen, index, say)
                bar.update(result.images)
                bar.set_postfix_str(
                    f"shards {len(shards) - len(missing)}/{len(shards)}, computed {tally.computed}, "
                    f"reused {tally.reused}, failed {len(tally.failures)}"
                )
        finally:
            bar.close()
            index.flush()
            self._remove_temporaries(store)
        for shard in missing.values():  # no answer: its worker was lost on every try
            lost = ShardResult(
                shard.index, shard.name, len(shard.items), tries=0, error="its worker was lost on every try"
            )
            self._take(lost, shard, tally, seen, index, log)

    def _take(
        self, result: ShardResult, shard: Shard, tally: Tally, seen: set[str], index, log: Callable[[str], None]
    ) -> None:
        if result.error:  # nothing of it is kept; its images count as failed (not recorded: a rerun retries them)
            tries = f" after {result.tries} tries" if result.tries else ""
            first = printable(str(shard.items[0][0].path))
            line = f"shard {result.index} ({result.images} images from {first}) failed{tries}: {result.error}"
            tally.failed_shards.append(line)
            log(line)
            reason = f"not computed: its shard failed ({result.error}); run again to retry"
            tally.failures.extend(Failure(str(image.path), "", reason) for image, _ in shard.items)
            return
        for path, stamp, content_hash in result.stamps:
            index.remember(path, stamp, content_hash)
        index.flush()
        # A segment found on a shard's first try was written by an earlier run (try counters start
        # afresh each run): its rows are resumed, not computed. Found on a later try, this run wrote it.
        earlier_run = result.resumed and result.tries <= 1
        for path, content_hash in result.rows:
            if content_hash in seen or earlier_run:  # in seen: another shard computed it too, one row survives
                tally.reused += 1
                seen.add(content_hash)
            else:
                seen.add(content_hash)
                tally.computed += 1
            tally.hash_of[path] = content_hash
        for path, content_hash in result.reused:
            tally.reused += 1
            tally.hash_of[path] = content_hash
        tally.failures.extend(result.failures)
        tally.versions = tally.versions or result.versions

    @staticmethod
    def _remove_temporaries(store: FeatureStore) -> None:
        """Segments a killed worker was writing, and try counters (no worker runs; the driver holds the lock)."""
        if store.segments_dir.is_dir():
            for tmp in [
                leftover for pattern in naming.SHARD_LEFTOVER_GLOBS for leftover in store.segments_dir.glob(pattern)
            ]:
                tmp.unlink(missing_ok=True)
