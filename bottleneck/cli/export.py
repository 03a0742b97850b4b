"""`bottleneck export --run RUN --out DIR`: the run as files that load without this package."""

from __future__ import annotations

import argparse
import json
import sys

from bottleneck import bounds
from bottleneck.cli.common import Bounded, stderr


def run(args: argparse.Namespace) -> int:
    """Write model.keras, saved_model/ (bytes in), labels.txt, README.md (and model.tflite), checked against predict."""
    from bottleneck.use.export import PARITY_TOLERANCE, export_run, parity_rows

    result = export_run(
        args.run,
        args.out,
        tflite=args.tflite,
        check_images=args.check_images,
        cache_dir=args.cache,
        log=stderr,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    out = stderr if args.json else print
    out(f"exported {args.run} -> {result.out} ({', '.join(result.files)}) in {result.seconds:.1f} s")
    for row in parity_rows(result.parity)[1:]:
        out(f"  parity {row[0]:<13} {row[1]:<9} {row[2]:>4} images  max |p - predict| {row[3]}")
    if result.parity and result.worst > PARITY_TOLERANCE:
        out(
            f"  WARNING: an export differs from predict by {result.worst:.2e}, over {PARITY_TOLERANCE:g} (see README.md)"
        )
    if args.json:
        print(json.dumps({"out": str(result.out), "files": result.files, "parity": result.parity}))
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "export",
        help="export a run as a Keras model and a TensorFlow SavedModel that take images",
        description="Write DIR/model.keras (pixels -> probabilities), DIR/saved_model/ (serving_default takes "
        "encoded image bytes and decodes them exactly as bottleneck does), DIR/labels.txt and DIR/README.md; "
        "optionally DIR/model.tflite. Each is checked against `predict` on the run's test images.",
        epilog="example: bottleneck export --run runs/20260101-120000-logreg-ab12 --out exported --tflite",
    )
    parser.add_argument("--run", required=True, help="a run folder written by train-head or fine-tune")
    parser.add_argument("--out", required=True, help="folder to write (replaced if it holds an earlier export)")
    parser.add_argument("--tflite", action="store_true", help="also write a float32 TFLite model (pixels in)")
    parser.add_argument(
        "--check-images",
        type=Bounded(bounds.CHECK_IMAGES),
        default=32,
        help="test images used to measure parity with predict, %(type)s (default: 32)",
    )
    parser.add_argument(
        "--cache", default=None, help="feature cache folder (default: the one the run was trained from)"
    )
    parser.add_argument("--json", action="store_true", help="print {out, files, parity} as the last line of stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (each stage, with the time left)")
    parser.set_defaults(handler=run)
