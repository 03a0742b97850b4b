"""Turn a folder of labelled images into features in the store: the `features` command's pipeline.

Images whose content is already in the store are never read again (their hash is remembered
by path and stamp). The rest go to an engine (`bottleneck.features.engines`): by default the
local one, where a pool of threads reads, hashes and decodes while the backbone runs on the
previous batch and each computed batch is committed at once, so an interrupted run loses at
most the batch in flight; or Ray (`--engine ray`), where shards of a few thousand images are
computed by a pool of actors and each is written as one segment.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck import __version__, bounds, naming
from bottleneck.backbones.backend import use_backend
from bottleneck.backbones.quantize import DEFAULT_CALIBRATION_IMAGES
from bottleneck.backbones.runtime import DEFAULT_RUNTIME, RUNTIMES, check_runtime, get_feature_model, resolve_runtime
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import CacheError, DataError
from bottleneck.features.calibration import settle_calibration
from bottleneck.features.decode import DEFAULT_MAX_PIXELS
from bottleneck.features.discover import ImageFile, discover_images
from bottleneck.features.engines import DEFAULT_BATCH_SIZE, ENGINES, Tally, get_engine
from bottleneck.features.hashing import HashIndex, sha256_bytes
from bottleneck.features.noise import decoder_log_in, decoder_noise_to, describe
from bottleneck.features.shards import Columns
from bottleneck.features.store import DTYPES, Failure, FeatureStore, FeatureWriter, MemoryWriter


@dataclass
class ExtractionResult:
    """What a `features` run did."""

    images: int
    computed: int
    reused: int
    failed: int
    store: Path
    seconds: float
    classes: list[str]
    failures: list[Failure] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    pretrained: bool = True
    warning: str = ""  # set when the backbone has random weights
    decoder_warnings: int = 0  # lines libtiff and Pillow wrote while decoding (in the cache's log file)
    decoder_log: str = ""
    engine: str = "local"
    shards: int = 0  # sharded engines: how many shards the work was cut into
    failed_shards: list[str] = field(default_factory=list)  # one line per shard that failed every try
    conflicts: list[str] = field(default_factory=list)  # files reachable from two class folders
    layout_line: str = ""  # how DATA was read: split folders, a label file or a plain folder ("" for class folders)
    multi_label: bool = False  # a label file gave some image several labels: `classes` are its labels

    @property
    def images_per_second(self) -> float:
        """Computed images per second, or all images per second when none needed computing."""
        done = self.computed or self.images
        return done / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict:
        return {
            "images": self.images,
            "computed": self.computed,
            "reused": self.reused,
            "failed": self.failed,
            "store": str(self.store),
            "decoder_warnings": self.decoder_warnings,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
        } | (
            {"engine": self.engine, "shards": self.shards, "failed_shards": len(self.failed_shards)}
            if self.engine != "local"
            else {}
        )


def prepare_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """Create the cache folder if needed and check that it is writable."""
    path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(f"cannot write to cache folder {path}: {exc.strerror or exc}") from None
    return path


def store_attrs(spec: BackboneSpec, weights_id: str, feature_dim: int) -> dict:
    """The attributes every store file carries about its backbone."""
    import h5py
    import PIL

    return {
        "architecture": spec.architecture,
        "weights": spec.weights if spec.kind in ("application", "foundation") else spec.kind,
        "weights_id": weights_id,
        "pretrained": spec.pretrained,
        "warning": "" if spec.pretrained else spec.random_weights_warning,
        "input_size": spec.input_size,
        "pooling": spec.pooling,
        "layer": spec.layer or "",
        "preprocessing": spec.preprocessing,
        "precision": spec.precision,
        **({"calibration": spec.calibration} if spec.precision == "int8" else {}),
        "feature_dim": feature_dim,
        "bottleneck_version": __version__,
        "pillow_version": PIL.__version__,
        "h5py_version": h5py.__version__,
    }


def _feature_dim(spec: BackboneSpec, store_file: Path) -> int:
    if spec.feature_dim is not None:
        return spec.feature_dim
    if store_file.exists():  # a model file's store already says, so a rerun need not load the model
        import h5py

        with h5py.File(store_file, "r") as handle:
            return int(handle.attrs["feature_dim"])
    return get_feature_model(spec.float32_spec, "keras").feature_dim  # every precision has float32's width


def open_store(cache_dir: Path, spec: BackboneSpec, index: HashIndex, dtype: str | None = None) -> FeatureStore:
    """The store of `spec` in `cache_dir` (weights and model files are hashed through the index).

    `dtype` (float32 or float16) is how a new store keeps its rows; None: as the store does, else float32.
    """
    identity = spec.identity(index.hash_file)
    fingerprint = spec.fingerprint(index.hash_file)
    dim = _feature_dim(spec, naming.store_index(Path(cache_dir), fingerprint))
    return FeatureStore(cache_dir, fingerprint, dim, store_attrs(spec, identity["weights"], dim), dtype=dtype)


@dataclass(frozen=True)
class ExtractOptions:
    """How to run an extraction; checked once, before any work starts."""

    batch_size: int | str = DEFAULT_BATCH_SIZE  # or 'auto': the fastest that fits on a GPU, the default on a CPU
    workers: int | None = (
        None  # local: decoding threads (None: one per CPU core); ray: actors (None: one per node or GPU)
    )
    max_pixels: int = DEFAULT_MAX_PIXELS
    lock_timeout: float | None = None  # None: wait for another run as long as it takes
    progress: bool = False
    runtime: str = DEFAULT_RUNTIME  # auto: OpenVINO on a CPU where installed, else Keras; or keras, openvino
    backend: str | None = None  # the Keras backend (None: $KERAS_BACKEND, else tensorflow); fixed per process
    engine: str = "local"  # or 'ray' (optional extra): shards over a pool of actors, on one machine or a cluster
    shard_size: int | None = None  # ray: images per shard (None: DEFAULT_SHARD_SIZE)
    ray_address: str | None = None  # ray: a running cluster (None: start a local Ray instance)
    gpus_per_worker: float | None = None  # ray: GPUs each actor holds (None: none)
    dtype: str | None = None  # how a new store keeps its rows: float32 or float16 (None: as the store does)
    calibration: str | None = None  # int8: a folder of images to calibrate on (None: the cache's, else DATA's own)
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES  # int8: how many images a new calibration takes

    def __post_init__(self) -> None:
        if self.batch_size != "auto" and not isinstance(self.batch_size, numbers.Integral):
            raise DataError(f"--batch-size must be a whole number or auto; got {self.batch_size!r}")
        checked = {
            "workers": bounds.WORKERS,
            "max_pixels": bounds.MAX_PIXELS,
            "shard_size": bounds.SHARD_SIZE,
            "gpus_per_worker": bounds.GPUS_PER_WORKER,
            "calibration_images": bounds.CALIBRATION_IMAGES,
        }
        if self.batch_size != "auto":
            checked["batch_size"] = bounds.BATCH_SIZE
        for name, interval in checked.items():
            if getattr(self, name) is not None:
                interval.check(getattr(self, name), f"--{name.replace('_', '-')}", DataError)
        if self.runtime not in RUNTIMES:
            raise DataError(f"unknown --runtime {self.runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        if self.dtype not in (None, *DTYPES):
            raise DataError(f"unknown --dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        if self.engine not in ENGINES:
            raise DataError(f"unknown --engine {self.engine!r}; choose one of: {', '.join(ENGINES)}")
        if self.engine != "ray":
            given = [
                name for name in ("shard_size", "ray_address", "gpus_per_worker") if getattr(self, name) is not None
            ]
            if given:
                raise DataError(f"--{given[0].replace('_', '-')} applies to --engine ray only")


@dataclass
class StoreRun:
    """What `compute_into_store` did for a list of images."""

    store: FeatureStore
    computed: int
    reused: int
    failures: list[Failure]
    hash_of: dict[str, str]  # absolute path -> content hash of every image that has features
    seconds: float
    decoder_warnings: int = 0
    decoder_log: str = ""
    engine: str = "local"
    shards: int = 0
    failed_shards: list[str] = field(default_factory=list)  # one line per shard that failed every try
    in_memory: MemoryWriter | None = None  # a cache that could not be written: the rows computed in this process

    def read_rows(self, hashes: list[str]) -> np.ndarray:
        """Features of `hashes` (each with features in this run), from the store or from memory."""
        return (self.in_memory or self.store).read_rows(hashes)


def extract_features(
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    spec: BackboneSpec,
    options: ExtractOptions | None = None,
    log: Callable[[str], None] = lambda message: None,
    layout: str = "auto",
    labels: str | os.PathLike | None = None,
    columns: Columns | None = None,
    **option_values,
) -> ExtractionResult:
    """Compute the features of every image under `data_dir` that the store lacks.

    Options come as an `ExtractOptions` or as its fields by keyword (`batch_size=32`); `layout` is
    how DATA is laid out (see `bottleneck.features.discover`); `labels` a label file naming the images;
    `columns` a Parquet DATA's image and label columns (`bottleneck.features.shards.Columns`).
    """
    options = options or ExtractOptions(**option_values)
    started = time.monotonic()
    with contextlib.suppress(OSError):  # so that the listings of shards are remembered from the first run
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    discovery = discover_images(data_dir, layout=layout, labels=labels, columns=columns, cache_dir=cache_dir)
    for line in discovery.warnings:
        log(f"warning: {line}")
    done = compute_into_store(discovery.images, cache_dir, spec, options, log)
    if done.computed + done.reused == 0:
        first = done.failures[0]
        raise DataError(
            f"no image could be used: all {len(done.failures)} failed (first: {first.path}: {first.reason})"
        )
    return ExtractionResult(
        images=len(discovery.images),
        computed=done.computed,
        reused=done.reused,
        failed=len(done.failures),
        store=done.store.path,
        seconds=time.monotonic() - started,
        classes=discovery.classes,
        failures=done.failures,
        skipped=discovery.skipped,
        conflicts=discovery.conflicts,
        pretrained=spec.pretrained,
        warning="" if spec.pretrained else spec.random_weights_warning,
        decoder_warnings=done.decoder_warnings,
        decoder_log=done.decoder_log,
        engine=done.engine,
        shards=done.shards,
        failed_shards=done.failed_shards,
        layout_line=discovery.layout_line(),
        multi_label=discovery.multi_label,
    )


def compute_into_store(
    images: list[ImageFile],
    cache_dir: str | os.PathLike,
    spec: BackboneSpec,
    options: ExtractOptions,
    log: Callable[[str], None] = lambda message: None,
    read_only_ok: bool = False,
) -> StoreRun:
    """Make sure every image in `images` has features in `spec`'s store (or a recorded failure).

    The one pipeline behind `features` and `predict`: unchanged files are settled from the hash
    index, the engine computes the rest (see `bottleneck.features.engines`), and the store's
    parts and segments are merged at the end. With `read_only_ok`, a cache that cannot be written
    is read, and what it lacks is computed in this process only (`StoreRun.read_rows` has it).
    """
    started = time.monotonic()
    if options.backend is not None and spec.kind != "pixels":
        use_backend(options.backend)
    check_runtime(options.runtime, spec)  # a runtime that cannot run this precision is an error before any work
    engine = get_engine(options)
    engine.check()  # bad engine settings are an error before any work
    cache, writable = _cache_folder(cache_dir, read_only_ok, engine.name, log)
    spec = settle_calibration(
        spec,
        cache,
        [image.path for image in images] if writable else None,
        options.calibration,
        options.calibration_images,
        options.max_pixels,
        log,
    )
    index = HashIndex(cache)
    noise = None
    try:
        store = open_store(cache, spec, index, options.dtype)
        with (
            _writer(store, writable, options, log) as writer,
            _model_folder(cache, spec, options.runtime, writable) as models,
        ):
            tally = _sort_out(images, writer, index)
            needs_backbone = _settle_by_content(tally, writer, index, options)
            try:
                if needs_backbone or (tally.todo and engine.name != "local"):
                    # Before the redirect below, so TensorFlow's (or Ray's) start-up lines are not counted as decoder warnings.
                    engine.start(spec, models, log)
                if engine.name == "local":
                    # libtiff's C-level warnings and Pillow's Python warnings go to a log file, not over the progress bar.
                    with decoder_noise_to(decoder_log_in(cache, writable)) as noise:
                        engine.run(tally, writer, index, spec, log)
                else:  # decoding happens in the workers, whose output goes to their own logs
                    engine.run(tally, writer, index, spec, log)
            finally:
                engine.stop()
            writer.finish({f"{name}_version": version for name, version in tally.versions.items()})
    finally:
        index.close()
    return StoreRun(
        store,
        tally.computed,
        tally.reused,
        tally.failures,
        tally.hash_of,
        time.monotonic() - started,
        noise.count if noise else 0,
        describe(noise) if noise else "",
        engine.name,
        tally.shards,
        tally.failed_shards,
        writer if isinstance(writer, MemoryWriter) else None,  # a cache that could not be written
    )


def _cache_folder(
    cache_dir: str | os.PathLike, read_only_ok: bool, engine: str, log: Callable[[str], None]
) -> tuple[Path, bool]:
    """The cache folder and whether it can be written; one that cannot is an error unless `read_only_ok`."""
    try:
        return prepare_cache_dir(cache_dir), True
    except CacheError as exc:
        if not read_only_ok or not Path(cache_dir).is_dir() or not os.access(cache_dir, os.R_OK | os.X_OK):
            raise
        if engine != "local":
            raise CacheError(
                f"{exc}; --engine {engine} writes what it computes into the cache: use the local engine"
            ) from None
        log(f"warning: {exc}: reading what it holds; images it lacks are computed in this process only, not cached")
        return Path(cache_dir), False


@contextlib.contextmanager
def _writer(
    store: FeatureStore, writable: bool, options: ExtractOptions, log: Callable[[str], None]
) -> Iterator[FeatureWriter]:
    """The store's writer, holding its lock; or, on a cache that cannot be written, one that keeps rows in memory."""
    if not writable:
        yield MemoryWriter(store)
        return
    with store.writer(options.lock_timeout, on_wait=log) as writer:
        yield writer


@contextlib.contextmanager
def _model_folder(cache: Path, spec: BackboneSpec, runtime: str, writable: bool) -> Iterator[Path]:
    """Where the backbone's OpenVINO conversion lives: the cache, or a scratch folder when the cache is read-only
    and lacks it (converted for this process, then removed)."""
    if writable or spec.kind == "pixels" or spec.precision != "float32" or resolve_runtime(runtime, spec) != "openvino":
        yield cache
        return
    from bottleneck.backbones.openvino import conversion_problem
    from bottleneck.backbones.quantize import float_folder

    if conversion_problem(float_folder(spec, cache)) is None:
        yield cache
        return
    with tempfile.TemporaryDirectory(prefix="bottleneck-openvino-") as scratch:
        yield Path(scratch)


def _sort_out(images: list[ImageFile], writer: FeatureWriter, index: HashIndex) -> Tally:
    """Settle unchanged files from the hash index alone; the rest must be read."""
    tally = Tally()
    for image in images:
        known_hash = index.lookup(str(image.path), (image.size, image.mtime_ns, image.inode))
        if known_hash in writer.known_hashes:
            tally.reused += 1
            tally.hash_of[str(image.path)] = known_hash
        elif known_hash is not None and known_hash in writer.known_failures:
            tally.failures.append(Failure(str(image.path), known_hash, writer.known_failures[known_hash].reason))
        else:
            tally.todo.append((image, known_hash))
    return tally


def _settle_by_content(tally: Tally, writer: FeatureWriter, index: HashIndex, options: ExtractOptions) -> bool:
    """Hash the files the index does not know, in order, until one holds content the store lacks; say whether
    any image needs the backbone.

    A copied or renamed folder of known images is settled here, by content, without building the backbone
    (seconds and a gigabyte saved, when there is nothing to compute). The scan stops at the first new
    content, so a folder of new images costs one file read twice; unreadable files are left to the engine,
    which records why.
    """
    if not tally.todo:
        return False
    if any(known_hash is not None for _, known_hash in tally.todo):
        return True  # content the index knows and the store lacks: the backbone is needed anyway
    from bottleneck.features.decode import UnreadableImage, read_image_file
    from bottleneck.features.engines.local import bounded_map, make_bar

    def content_of(image: ImageFile):
        try:
            data, stamp = read_image_file(str(image.path), options.max_pixels)
        except UnreadableImage:
            return image, None, None
        return image, stamp, sha256_bytes(data)

    workers = options.workers or os.cpu_count() or 1
    remaining: list[tuple[ImageFile, str | None]] = []
    bar = make_bar(len(tally.todo), options.progress, desc="hashing", leave=False)
    try:
        for position, (image, stamp, content_hash) in enumerate(
            bounded_map(content_of, [image for image, _ in tally.todo], workers, 4 * workers)
        ):
            path = str(image.path)
            if content_hash is None:
                remaining.append((image, None))  # unreadable: the engine reads it again and records the reason
            elif content_hash in writer.known_hashes:
                index.remember(path, stamp, content_hash)
                tally.reused += 1
                tally.hash_of[path] = content_hash
            elif content_hash in writer.known_failures:
                index.remember(path, stamp, content_hash)
                tally.failures.append(Failure(path, content_hash, writer.known_failures[content_hash].reason))
            else:  # new content: the backbone is needed; the engine takes this file and every later one
                tally.todo = remaining + [(image, content_hash)] + tally.todo[position + 1 :]
                return True
            bar.update(1)
    finally:
        bar.close()
        index.flush()
    tally.todo = remaining
    return False
