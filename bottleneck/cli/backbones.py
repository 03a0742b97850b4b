"""`bottleneck backbones`: every backbone `--backbone` accepts, with its sizes, preprocessing and weights.

Reads only the application table (no TensorFlow), so it answers at once.
"""

from __future__ import annotations

import argparse
import json

from bottleneck.backbones.applications import ARCHITECTURES, keras_cache_dir
from bottleneck.cli.common import stderr


def _pixels_row() -> dict:
    """The no-transfer baseline, listed with the applications (its feature size is size x size x 3)."""
    from bottleneck.backbones.spec import PIXELS, BackboneSpec

    spec = BackboneSpec(architecture=PIXELS)
    return {
        "name": PIXELS,
        "default_size": spec.input_size,
        "min_size": 1,
        "feature_dim": spec.feature_dim,
        "preprocess_mode": "unit",
        "preprocessing": spec.preprocessing,
        "weights_file": None,
        "weights_cached": None,
        "weights_path": None,
    }


def backbone_rows() -> list[dict]:
    """One dict per backbone: the table's fields and whether Keras already has its ImageNet weights."""
    rows = []
    for arch in ARCHITECTURES.values():
        cached = arch.cached_weights()
        rows.append(
            {
                "name": arch.name,
                "default_size": arch.default_size,
                "min_size": arch.min_size,
                "feature_dim": arch.feature_dim,
                "preprocess_mode": arch.preprocess_mode,
                "preprocessing": arch.preprocessing,
                "weights_file": arch.weights_file,
                "weights_cached": cached is not None,
                "weights_path": str(cached) if cached else None,
            }
        )
    return [*rows, *foundation_rows(), _pixels_row()]


def foundation_rows() -> list[dict]:
    """The KerasHub foundation models: their sizes, pooling (the default first), preprocessing and licence."""
    from bottleneck.backbones.foundation import FOUNDATION_MODELS

    return [
        {
            "name": model.name,
            "default_size": model.default_size,
            "min_size": model.patch_size,
            "feature_dim": model.feature_dim,
            "preprocess_mode": model.preprocess_mode,
            "preprocessing": model.preprocessing,
            "pooling": list(model.poolings),
            "licence": model.licence,
            "keras_hub_preset": model.preset,
            "weights_file": None,
            "weights_cached": None,
            "weights_path": None,
        }
        for model in FOUNDATION_MODELS.values()
    ]


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table, preprocessing last since it is the longest."""
    header = ("backbone", "size", "min", "features", "imagenet weights", "preprocessing")
    lines = [header]
    for row in rows:
        weights = "-" if row["weights_cached"] is None else ("cached" if row["weights_cached"] else "not cached")
        if row.get("keras_hub_preset"):
            weights = f"hub {row['keras_hub_preset']}; pooling {'|'.join(row['pooling'])}; {row['licence']}"
        lines.append(
            (
                row["name"],
                str(row["default_size"]),
                str(row["min_size"]),
                str(row["feature_dim"]),
                weights,
                row["preprocessing"],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    numeric = {1, 2, 3}
    out = []
    for line in lines:
        cells = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths))
        ]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """List every backbone: sizes, feature size, preprocessing, and whether its ImageNet weights are cached."""
    rows = backbone_rows()
    as_json = getattr(args, "json", False)
    out = stderr if as_json else print  # with --json, stdout is for the JSON alone
    out(format_table(rows))
    out(f"\nImageNet weights are looked up in {keras_cache_dir()} (Keras downloads a missing file on first use).")
    out("Foundation models (KerasHub, an opt-in install): --weights hub | none | PRESET_DIR; --pooling, default first.")
    out("Also: --backbone MODEL.keras --layer NAME, your own Keras model cut at a layer.")
    if as_json:
        print(json.dumps(rows))
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "backbones",
        help="list the backbones --backbone accepts, and whether their ImageNet weights are cached",
        description="Every Keras application usable as --backbone (and the pixels baseline): default and "
        "minimum input size, feature size, preprocessing, and whether its no-top ImageNet weights file is "
        "already in Keras' cache ($KERAS_HOME/models or ~/.keras/models). Loads no TensorFlow.",
        epilog="example: bottleneck backbones --json",
    )
    parser.add_argument("--json", action="store_true", help="also print the list as JSON on the last line")
    parser.set_defaults(handler=run)
