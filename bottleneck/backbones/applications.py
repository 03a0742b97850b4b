"""The Keras applications usable as backbones, one row each: builder, sizes, feature size, preprocessing.

Plain data (no TensorFlow), so `bottleneck backbones` and the fingerprint read it instantly. The sizes
and feature sizes are those of Keras with `include_top=False, pooling='avg'`; `tests/test_applications.py`
builds every row to check them. The weights file names are the no-top ImageNet files Keras downloads
into its cache (`$KERAS_HOME/models` or `~/.keras/models`), as named in `keras/src/applications/*.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: How the pixels must be prepared, as `keras.applications.imagenet_utils.preprocess_input` modes.
PREPROCESS_MODES = {
    "tf": "x / 127.5 - 1 (RGB)",
    "caffe": "RGB -> BGR, minus the ImageNet mean (103.939, 116.779, 123.68)",
    "torch": "x / 255, minus mean (0.485, 0.456, 0.406), over std (0.229, 0.224, 0.225) (RGB)",
    "none": "the model includes its own preprocessing: it takes raw 0-255 RGB",
}

#: The ImageNet per-channel statistics of the 'caffe' (BGR, 0-255) and 'torch' (RGB, 0-1) modes.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Architecture:
    """A Keras application usable as a backbone."""

    name: str
    keras_builder: str  # attribute of keras.applications
    keras_module: str  # module of keras.applications holding preprocess_input
    default_size: int
    min_size: int
    feature_dim: int
    preprocessing: str  # what preprocess_input does, recorded in the fingerprint
    preprocess_mode: str  # the same, as a key of PREPROCESS_MODES
    weights_file: str  # the no-top ImageNet weights, as Keras names them in its cache

    def cached_weights(self, keras_home: str | Path | None = None) -> Path | None:
        """The ImageNet weights file if Keras already has it locally, else None."""
        path = keras_cache_dir(keras_home) / self.weights_file
        return path if path.is_file() else None


def keras_cache_dir(keras_home: str | Path | None = None) -> Path:
    """Where Keras keeps downloaded weights: `$KERAS_HOME/models`, else `~/.keras/models`.

    Mirrors `keras.src.backend.config` (without importing Keras): a home folder that cannot be
    written falls back to `/tmp/.keras`.
    """
    if keras_home is None:
        keras_home = os.environ.get("KERAS_HOME")
    if keras_home is None:
        base = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
        keras_home = base / ".keras"
    return Path(keras_home).expanduser() / "models"


def _row(
    name: str,
    builder: str,
    module: str,
    default_size: int,
    min_size: int,
    feature_dim: int,
    mode: str,
    weights_file: str,
    preprocessing: str | None = None,
) -> Architecture:
    return Architecture(
        name=name,
        keras_builder=builder,
        keras_module=module,
        default_size=default_size,
        min_size=min_size,
        feature_dim=feature_dim,
        preprocessing=preprocessing or f"{mode}: {PREPROCESS_MODES[mode]}",
        preprocess_mode=mode,
        weights_file=weights_file,
    )


def _in_model(what: str) -> str:
    return f"none: raw 0-255 RGB; the model itself does {what}"


_TF_DIM = "_weights_tf_dim_ordering_tf_kernels_notop.h5"

_ROWS = [
    # The string of InceptionV3 predates this table: keep it so that existing feature caches,
    # whose fingerprints cover it, stay valid.
    _row(
        "inception_v3",
        "InceptionV3",
        "inception_v3",
        299,
        75,
        2048,
        "tf",
        "inception_v3" + _TF_DIM,
        preprocessing="inception: x / 127.5 - 1 (RGB)",
    ),
    _row("xception", "Xception", "xception", 299, 71, 2048, "tf", "xception" + _TF_DIM),
    _row("resnet50", "ResNet50", "resnet50", 224, 32, 2048, "caffe", "resnet50" + _TF_DIM),
    _row("resnet50_v2", "ResNet50V2", "resnet_v2", 224, 32, 2048, "tf", "resnet50v2" + _TF_DIM),
    _row(
        "mobilenet_v2",
        "MobileNetV2",
        "mobilenet_v2",
        224,
        32,
        1280,
        "tf",
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    ),
    _row(
        "mobilenet_v3_small",
        "MobileNetV3Small",
        "mobilenet_v3",
        224,
        32,
        576,
        "none",
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        _in_model("x / 127.5 - 1"),
    ),
    _row(
        "mobilenet_v3_large",
        "MobileNetV3Large",
        "mobilenet_v3",
        224,
        32,
        960,
        "none",
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        _in_model("x / 127.5 - 1"),
    ),
    _row(
        "efficientnet_b0",
        "EfficientNetB0",
        "efficientnet",
        224,
        32,
        1280,
        "none",
        "efficientnetb0_notop.h5",
        _in_model("x / 255 and ImageNet normalization"),
    ),
    _row(
        "efficientnet_b1",
        "EfficientNetB1",
        "efficientnet",
        240,
        32,
        1280,
        "none",
        "efficientnetb1_notop.h5",
        _in_model("x / 255 and ImageNet normalization"),
    ),
    _row(
        "efficientnet_b2",
        "EfficientNetB2",
        "efficientnet",
        260,
        32,
        1408,
        "none",
        "efficientnetb2_notop.h5",
        _in_model("x / 255 and ImageNet normalization"),
    ),
    _row(
        "efficientnet_b3",
        "EfficientNetB3",
        "efficientnet",
        300,
        32,
        1536,
        "none",
        "efficientnetb3_notop.h5",
        _in_model("x / 255 and ImageNet normalization"),
    ),
    _row(
        "efficientnet_v2_b0",
        "EfficientNetV2B0",
        "efficientnet_v2",
        224,
        32,
        1280,
        "none",
        "efficientnetv2-b0_notop.h5",
        _in_model("x / 255 and ImageNet normalization"),
    ),
    _row(
        "convnext_tiny",
        "ConvNeXtTiny",
        "convnext",
        224,
        32,
        768,
        "none",
        "convnext_tiny_notop.h5",
        _in_model("ImageNet normalization"),
    ),
    _row("densenet121", "DenseNet121", "densenet", 224, 32, 1024, "torch", "densenet121" + _TF_DIM),
]

ARCHITECTURES = {row.name: row for row in _ROWS}
