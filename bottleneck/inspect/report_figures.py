"""The report's pictures as data URIs: matplotlib figures as PNG (confusion matrix, learning curve; `plots`
draws with the same helpers) and image thumbnails as JPEG, read through the one guarded reader."""

from __future__ import annotations

import base64
import io
from pathlib import Path

_THUMBNAIL_SIDE = 112


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here, none needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def confusion_png(split: dict) -> str:
    """The confusion matrix (rows true, columns predicted) as a PNG data URI."""
    import numpy as np

    plt = _pyplot()
    matrix = np.array(split["confusion_matrix"])
    labels = split["labels"]
    side = min(12, 2.5 + 0.45 * len(labels))
    figure, axes = plt.subplots(figsize=(side, side))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 6 else 0)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(labels) <= 25:
        peak = matrix.max() or 1
        for (i, j), count in np.ndenumerate(matrix):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    return _png(figure)


def learning_curve_png(history: dict) -> str:
    """Loss and accuracy per epoch, training and validation, as a PNG data URI."""
    plt = _pyplot()
    keys = [key for key in ("loss", "accuracy") if key in history or "val_" + key in history] or ["loss"]
    figure, grid = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for key, axes in zip(keys, grid[0]):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + key in history:
                values = history[prefix + key]
                axes.plot(range(1, len(values) + 1), values, style, label=("validation " if prefix else "train ") + key)
        axes.set_xlabel("epoch")
        axes.legend()
    return _png(figure)


def thumbnail_uri(path: Path, side: int = _THUMBNAIL_SIDE, quality: int = 85) -> str | None:
    """A small JPEG data URI (at most `side` pixels a side) of the image at `path`, or None if it cannot be read."""
    from PIL import Image, ImageOps

    from bottleneck.features.decode import read_image_file, to_rgb
    from bottleneck.features.noise import decoding

    try:
        # The guarded reader: a FIFO or a 64 GB file is never read; shard members are. `decoding` names the file in
        # the decoder-warnings log of the page being written.
        with decoding(path):
            data, _ = read_image_file(path)
            with Image.open(io.BytesIO(data)) as opened:
                image = to_rgb(ImageOps.exif_transpose(opened))
                image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
    except Exception:  # a moved or damaged file must not break the report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
