"""`bottleneck features DATA`: compute backbone features of a folder of images into the cache."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from bottleneck import bounds
from bottleneck.cli.common import (
    BATCH_SIZE_OR_AUTO,
    LOCK_TIMEOUT,
    WORKERS,
    Bounded,
    add_backbone_arguments,
    add_backend_arguments,
    add_layout_argument,
    columns_of,
    data_or_labels,
    one_line_each,
    select_backend,
    spec_from,
    stderr,
)
from bottleneck.errors import StrictModeError

_FAILURES_SHOWN = 10


def _summarise_features(result, out: Callable[[str], None]) -> None:
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(result.skipped.items()))
    kinds = "labels (multi-label)" if result.multi_label else "classes"
    out(
        f"{result.images} images"
        + (f" in {len(result.classes)} {kinds}" if result.classes else "")
        + f" -> {result.store}"
    )
    if result.layout_line:
        out(f"  {result.layout_line}")
    out(
        f"  computed {result.computed}, reused {result.reused}, failed {result.failed}"
        + (f", skipped {sum(result.skipped.values())} ({skipped})" if skipped else "")
        + f" in {result.seconds:.1f} s ({result.images_per_second:.1f} images/s)"
    )
    if result.conflicts:
        out(
            f"  WARNING: {len(result.conflicts)} files are reachable from two class folders; none takes its label "
            "from the order of the walk:"
        )
        for line in result.conflicts[:_FAILURES_SHOWN]:
            out(f"    {line}")
        if len(result.conflicts) > _FAILURES_SHOWN:
            out(f"    ... and {len(result.conflicts) - _FAILURES_SHOWN} more")
    if result.decoder_warnings:
        out(f"  {result.decoder_log}")
    if result.warning:
        out(f"  WARNING: {result.warning}")
    if result.engine != "local":
        out(
            f"  engine {result.engine}: {result.shards} shards"
            + (
                f", {len(result.failed_shards)} failed (their images are not in the store; run the same command "
                "again to retry them)"
                if result.failed_shards
                else ""
            )
        )
        for line in result.failed_shards[:_FAILURES_SHOWN]:
            out(f"    {line}")
    if result.failures:
        out("  failed:")
        from bottleneck.text import printable

        for failure in result.failures[:_FAILURES_SHOWN]:
            out(f"    {printable(failure.path)}: {failure.reason}")
        if len(result.failures) > _FAILURES_SHOWN:
            out(f"    ... and {len(result.failures) - _FAILURES_SHOWN} more (all in the store's 'failures' group)")


def run(args: argparse.Namespace) -> int:
    """Compute the backbone features of every image under DATA into the cache."""
    data_or_labels(args)
    from bottleneck.features.extract import ExtractOptions, extract_features

    if args.augment_flip is not None and not args.augment:
        from bottleneck.errors import DataError

        raise DataError("--augment-flip sets the flips of augmented views: it needs --augment N")
    spec = spec_from(args)
    select_backend(args, spec)
    options = ExtractOptions(
        batch_size=args.batch_size,
        workers=args.workers,
        max_pixels=args.max_pixels,
        lock_timeout=args.lock_timeout,
        progress=not args.no_progress and sys.stderr.isatty(),
        runtime=args.runtime,
        engine=args.engine,
        shard_size=args.shard_size,
        ray_address=args.ray_address,
        gpus_per_worker=args.gpus_per_worker,
        dtype=args.dtype,
        backend=args.backend,
        calibration=args.calibration,
        calibration_images=args.calibration_images,
    )
    result = extract_features(
        args.data,
        args.cache,
        spec,
        options,
        log=stderr,
        layout=args.layout,
        labels=args.labels,
        columns=columns_of(args),
    )
    out = one_line_each(stderr if args.json else print)
    _summarise_features(result, out)
    if args.augment:
        views = _augment(args, spec, options)
        out(
            f"  augmented views ({args.augment} per image): computed {views.computed}, reused {views.reused} -> "
            f"{views.store}"
        )
    if args.json:
        print(json.dumps(result.as_json()))
    if args.strict and result.failed:
        noun = "image" if result.failed == 1 else "images"
        raise StrictModeError(f"{result.failed} {noun} failed and --strict is set (see the list above)")
    return 0


def _augment(args: argparse.Namespace, spec, options):
    """`--augment N`: the views of every image that has features, cached beside them."""
    from bottleneck.backbones.quantize import with_default_calibration
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.features.augment import compute_views, recipe_from
    from bottleneck.features.discover import discover_images
    from bottleneck.learn.dataset import content_hashes, find_store

    spec = with_default_calibration(spec or BackboneSpec(), args.cache)  # a first int8 run has just calibrated
    plain = find_store(args.cache, spec)
    discovery = discover_images(args.data, layout=args.layout, labels=args.labels, columns=columns_of(args))
    images = discovery.images
    hashes = content_hashes(discovery.root, args.cache, [image.relpath for image in images])
    known = set(plain.index().content_hash)
    todo = [(str(image.path), h) for image, h in zip(images, hashes) if h in known]
    return compute_views(
        todo,
        args.cache,
        spec,
        plain,
        args.augment,
        recipe_from(args.augment_flip),
        runtime=options.runtime,
        batch_size=options.batch_size if options.batch_size != "auto" else 16,
        workers=options.workers,
        progress=options.progress,
        log=stderr,
        max_pixels=options.max_pixels,
        engine_options=options,
    )


def add_parser(commands) -> None:
    from bottleneck.backbones.quantize import DEFAULT_CALIBRATION_IMAGES
    from bottleneck.features.decode import DEFAULT_MAX_PIXELS
    from bottleneck.features.engines import DEFAULT_SHARD_SIZE
    from bottleneck.features.extract import DEFAULT_BATCH_SIZE

    features = commands.add_parser(
        "features",
        help="compute backbone features of a folder of images into the cache",
        description="Compute the features of every image under DATA (one sub-folder per class) into "
        "CACHE/<backbone-fingerprint>.h5 (or DATA/{train,val,test}/<class>/...: see --layout). Images already in the "
        "cache are not computed again.",
        epilog="example: bottleneck features data/flowers --cache cache --image-size 299 --json "
        "(on a cluster: --engine ray --ray-address HOST:PORT --gpus-per-worker 1)",
    )
    features.add_argument(
        "data",
        metavar="DATA",
        nargs="?",
        default=None,
        help="folder with one sub-folder of images per class (optional with --labels)",
    )
    features.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    add_layout_argument(features)
    add_backbone_arguments(features)
    features.add_argument(
        "--batch-size",
        type=BATCH_SIZE_OR_AUTO,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per backbone call, %(type)s: the fastest that fits on a GPU, "
        f"{DEFAULT_BATCH_SIZE} on a CPU (default: {DEFAULT_BATCH_SIZE})",
    )
    features.add_argument(
        "--workers",
        type=WORKERS,
        default=None,
        help="%(type)s; local engine: decoding threads (default: one per CPU core); ray engine: actors, "
        "each loading the backbone once (default: one per machine, or per GPU group with "
        "--gpus-per-worker)",
    )
    features.add_argument(
        "--max-pixels",
        type=Bounded(bounds.MAX_PIXELS),
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels than this, %(type)s (default: {DEFAULT_MAX_PIXELS:,})",
    )
    features.add_argument(
        "--lock-timeout",
        type=LOCK_TIMEOUT,
        default=None,
        metavar="SECONDS",
        help="when another run writes the same store, wait at most this long, %(type)s "
        "(default: wait until it finishes; 0: refuse at once)",
    )
    add_backend_arguments(features)
    engine = features.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process, batches committed as they go (default); ray: shards of "
        "--shard-size images over a pool of Ray Data actors, on this machine or a cluster, each "
        "written as one store segment, failed shards retried (pip install 'bottleneck-transfer[ray]')",
    )
    engine.add_argument(
        "--shard-size",
        type=Bounded(bounds.SHARD_SIZE),
        default=None,
        metavar="N",
        help=f"ray: images per shard, %(type)s (default: {DEFAULT_SHARD_SIZE})",
    )
    engine.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="ray: a running cluster (HOST:PORT, ray://HOST:PORT or auto); DATA and the cache "
        "must be at the same paths on every node (default: start a local Ray instance)",
    )
    engine.add_argument(
        "--gpus-per-worker",
        type=Bounded(bounds.GPUS_PER_WORKER),
        default=None,
        metavar="N",
        help="ray: GPUs each actor holds, %(type)s (default: none)",
    )
    int8 = features.add_argument_group("int8 (--precision int8)")
    int8.add_argument(
        "--calibration",
        default=None,
        metavar="DIR",
        help="calibrate the int8 model on the images under DIR (any layout) instead of DATA's own; the "
        "first int8 run in a cache calibrates once and later runs reuse it: another calibration set is "
        "another store, so only name one on purpose",
    )
    int8.add_argument(
        "--calibration-images",
        type=Bounded(bounds.CALIBRATION_IMAGES),
        default=DEFAULT_CALIBRATION_IMAGES,
        metavar="N",
        help=f"how many images (a seeded choice) a new calibration takes, %(type)s "
        f"(default: {DEFAULT_CALIBRATION_IMAGES}, fewer if there are fewer)",
    )
    features.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default=None,
        help="how a new store keeps its features: float16 halves disk and reads (heads still compute "
        "in float32); an existing store keeps its own (default: float32)",
    )
    features.add_argument(
        "--augment",
        type=Bounded(bounds.VIEWS),
        default=None,
        metavar="N",
        help="also compute N augmented views of each image (flip, random resized crop, brightness and "
        "contrast; seeded by the image's content, so the same views every time), cached beside the "
        "features for `train-head --augment` and `predict --tta`, %(type)s. With --backbone pixels the "
        "views are the augmented images' pixels",
    )
    features.add_argument(
        "--augment-flip",
        type=Bounded(bounds.PROBABILITY),
        default=None,
        metavar="P",
        help="with --augment: the probability of a horizontal flip in a view, %(type)s (default: 0.5; "
        "0 for digits, text and anything a mirror changes); another value is another set of views",
    )
    features.add_argument("--strict", action="store_true", help="exit with an error if any image failed")
    features.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object as the last line of stdout (the summary goes to stderr)",
    )
    features.add_argument("--no-progress", action="store_true", help="no progress bar")
    features.set_defaults(handler=run)
