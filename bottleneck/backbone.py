"""The frozen backbone: which network, which weights, which input, and its fingerprint.

A `BackboneSpec` is plain data and never imports TensorFlow, so the fingerprint (which names
the feature store) is known at once. `FeatureModel` builds the Keras model, with the
backbone's own preprocessing inside one `tf.function`, only when an image must be computed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from .decode import DECODE_VERSION
from .errors import BackboneError


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


ARCHITECTURES = {
    "inception_v3": Architecture(
        name="inception_v3",
        keras_builder="InceptionV3",
        keras_module="inception_v3",
        default_size=299,
        min_size=75,
        feature_dim=2048,
        preprocessing="inception: x / 127.5 - 1 (RGB)",
    ),
}

WEIGHTS_IMAGENET = "imagenet"
WEIGHTS_NONE = "none"
RANDOM_WEIGHTS_SEED = 0
RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS: these features come from an untrained network (--weights none)"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that decides a feature vector: architecture, weights, input size, pooling."""

    architecture: str = "inception_v3"
    weights: str = WEIGHTS_IMAGENET  # 'imagenet', 'none', or a path to a Keras weights file
    image_size: int | None = None  # None: the architecture's default
    pooling: str = "avg"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise BackboneError(
                f"unknown backbone {self.architecture!r}; choose one of: {', '.join(ARCHITECTURES)}"
            )
        arch = ARCHITECTURES[self.architecture]
        size = self.input_size
        if not arch.min_size <= size <= 2048:
            raise BackboneError(
                f"--image-size must be between {arch.min_size} and 2048 for {arch.name}; got {size}"
            )
        if self.weights not in (WEIGHTS_IMAGENET, WEIGHTS_NONE):
            path = Path(self.weights)
            if not path.is_file():
                raise BackboneError(
                    f"weights file not found: {self.weights} (use --weights imagenet, none, or a path)"
                )

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    @property
    def input_size(self) -> int:
        return self.image_size or self.arch.default_size

    @property
    def pretrained(self) -> bool:
        return self.weights != WEIGHTS_NONE

    def weights_id(self, file_hasher: Callable[[str], str] | None = None) -> str:
        """'imagenet', 'none-seed0-keras<version>', or 'sha256:<hex>' of the weights file."""
        if self.weights == WEIGHTS_IMAGENET:
            return self.weights
        if self.weights == WEIGHTS_NONE:
            # Random weights are seeded, so they are the same network on every run of one Keras version.
            return f"none-seed{RANDOM_WEIGHTS_SEED}-keras{_installed_version('keras')}"
        hasher = file_hasher or _sha256_of
        return "sha256:" + hasher(str(Path(self.weights).absolute()))

    def identity(self, file_hasher: Callable[[str], str] | None = None) -> dict:
        """The fields the fingerprint covers, as plain JSON-able data."""
        return {
            "architecture": self.architecture,
            "weights": self.weights_id(file_hasher),
            "input_size": self.input_size,
            "pooling": self.pooling,
            "preprocessing": self.arch.preprocessing,
            "decode": DECODE_VERSION,
        }

    def fingerprint(self, file_hasher: Callable[[str], str] | None = None) -> str:
        """A readable, unique name for this exact backbone, e.g. 'inception_v3-299-imagenet-1a2b3c4d5e6f'."""
        identity = self.identity(file_hasher)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        tag = {WEIGHTS_IMAGENET: "imagenet", WEIGHTS_NONE: "none"}.get(self.weights, "file")
        return f"{self.architecture}-{self.input_size}-{tag}-{digest}"


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"


def _sha256_of(path: str) -> str:
    from .hashing import sha256_file

    return sha256_file(path)


def import_tensorflow():
    """(tensorflow, keras), quietly, or a one-line error if TensorFlow is not installed."""
    try:
        # TensorFlow's C++ start-up chatter (CPU features, tf.data attribute notes) is not for users.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras  # noqa: F401
        import tensorflow as tf
    except ImportError:
        raise BackboneError(
            "TensorFlow is not installed: pip install 'bottleneck[cpu]' (or '[gpu]' on a CUDA machine)"
        ) from None
    return tf, keras


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def build_keras_backbone(spec: BackboneSpec):
    """The frozen Keras model of `spec`: uint8-free, takes preprocessed float input, returns pooled features."""
    tf, keras = import_tensorflow()
    builder = getattr(keras.applications, spec.arch.keras_builder)
    shape = (spec.input_size, spec.input_size, 3)
    if spec.weights == WEIGHTS_IMAGENET:
        try:
            model = builder(include_top=False, weights="imagenet", input_shape=shape, pooling=spec.pooling)
        except Exception as exc:
            raise BackboneError(
                f"could not get the ImageNet weights of {spec.architecture} ({_first_line(exc)}); "
                "Keras downloads them once into ~/.keras/models. Offline? Pass --weights PATH to a "
                "local no-top weights file, or --weights none for random weights (tests only)"
            ) from None
    else:
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
        model = builder(include_top=False, weights=None, input_shape=shape, pooling=spec.pooling)
        if spec.weights != WEIGHTS_NONE:
            try:
                model.load_weights(spec.weights)
            except Exception as exc:
                raise BackboneError(
                    f"weights file {spec.weights} does not fit {spec.architecture} without its top "
                    f"({_first_line(exc)})"
                ) from None
    model.trainable = False
    return model


class FeatureModel:
    """Runs the frozen backbone on uint8 RGB batches; preprocessing happens inside the graph."""

    def __init__(self, spec: BackboneSpec):
        tf, keras = import_tensorflow()
        self.spec = spec
        self.model = build_keras_backbone(spec)
        preprocess = getattr(keras.applications, spec.arch.keras_module).preprocess_input
        model = self.model
        size = spec.input_size

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def features(batch):
            return model(preprocess(tf.cast(batch, tf.float32)), training=False)

        self._features = features
        self.versions = {"tensorflow": tf.__version__, "keras": keras.__version__}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 -> (n, feature_dim) float32."""
        return self._features(batch).numpy().astype(np.float32, copy=False)


@lru_cache(maxsize=4)
def get_feature_model(spec: BackboneSpec) -> FeatureModel:
    """A `FeatureModel` for `spec`, built once per process (later runs in one process reuse it)."""
    return FeatureModel(spec)
