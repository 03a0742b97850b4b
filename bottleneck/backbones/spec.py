"""The frozen backbone: which network, which weights, which input, and its fingerprint.

Three kinds of backbone share one `BackboneSpec`:

- a Keras application (`inception_v3`) with `--weights imagenet | none | PATH`;
- a user's own `.keras` model file cut at `--layer NAME` (spatial outputs are average-pooled);
- `pixels`: the resized image itself, flattened: the no-transfer baseline.

A spec is plain data and never imports TensorFlow, so the fingerprint (which names the feature
store) is known at once; `bottleneck.backbones.build` makes the network from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import PIL

from bottleneck.backbones.applications import ARCHITECTURES, Architecture
from bottleneck.backbones.foundation import (
    FOUNDATION_MODELS,
    POOLINGS,
    WEIGHTS_HUB,
    FoundationModel,
    PresetFolder,
    preset_files,
    read_preset_folder,
)
from bottleneck.backbones.keras_file import read_keras_file
from bottleneck.bounds import FOUNDATION_IMAGE_SIZE, IMAGE_SIZE, PIXELS_IMAGE_SIZE
from bottleneck.errors import BackboneError

#: Part of every backbone fingerprint: the version of the decoder (`bottleneck.features.decode`); bump it when
#: decoding changes the pixels it produces. Pillow's major version is in it because resampling changes between
#: majors (Pillow 13 reordered the bilinear passes, moving pixels by one level): a store is never extended with
#: features of other pixels.
DECODE_VERSION = f"pillow{PIL.__version__.split('.')[0]}-rgb-white-alpha-bilinear-v1"

PIXELS = "pixels"
PIXELS_DEFAULT_SIZE = 16

#: Preprocessing a user's model can ask for; 'none' means the model does its own (a Rescaling layer).
PREPROCESSING = {
    "none": "none: raw 0-255 RGB floats (the model rescales)",
    "unit": "unit: x / 255 (RGB)",
    "inception": "inception: x / 127.5 - 1 (RGB)",
}

WEIGHTS_IMAGENET = "imagenet"
WEIGHTS_NONE = "none"
RANDOM_WEIGHTS_SEED = 0
#: How random weights are drawn (`build.portable_random_weights`): with NumPy, so every backend gets the same network.
RANDOM_WEIGHTS_SCHEME = "numpy-glorot1"
#: `--precision`: float32 (exact, on every CPU and GPU); mixed (Keras' mixed_float16, GPU only); bf16 and int8
#: (OpenVINO on the CPU: bfloat16 arithmetic, or the network quantized by NNCF on calibration images). All but
#: float32 change the features slightly, so each is fingerprinted: a store of its own.
PRECISIONS = ("float32", "mixed", "bf16", "int8")
RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS: these features come from an untrained network (--weights none)"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that decides a feature vector: network, weights, layer, input size, preprocessing."""

    architecture: str = "inception_v3"  # a Keras application, 'pixels', or a path to a .keras file
    weights: str = WEIGHTS_IMAGENET  # Keras applications: 'imagenet', 'none', or a weights file
    image_size: int | None = None  # None: the architecture's or the model file's own
    pooling: str = "avg"
    layer: str | None = None  # .keras files: the layer to cut at
    preprocess: str | None = None  # .keras files: a key of PREPROCESSING (default 'none')
    precision: str = "float32"  # or 'mixed' (float16 compute on a GPU), 'bf16' or 'int8' (OpenVINO on a CPU)
    calibration: str | None = None  # int8: the digest of the calibration set (None: not settled yet)
    file_stem: str | None = None  # .keras files kept by content (`<sha256>.keras`): the name the user gave the file

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BackboneError(f"unknown --precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.calibration is not None and self.precision != "int8":
            raise BackboneError("a calibration set belongs to --precision int8 only")
        if self.kind == "application":
            self._check_application()
        elif self.kind == "foundation":
            self._check_foundation()
        elif self.kind == "file":
            self._check_model_file()
        elif self.input_size not in PIXELS_IMAGE_SIZE:
            raise BackboneError(
                f"--image-size must be between {PIXELS_IMAGE_SIZE.low} and {PIXELS_IMAGE_SIZE.high} for "
                f"pixels; got {self.input_size}"
            )

    @property
    def kind(self) -> str:
        """'application', 'file' or 'pixels'."""
        if self.architecture == PIXELS:
            return "pixels"
        if self.architecture in ARCHITECTURES:
            return "application"
        if self.architecture in FOUNDATION_MODELS:
            return "foundation"
        if self.architecture.endswith(".keras") or Path(self.architecture).is_file():
            return "file"
        raise BackboneError(
            f"unknown backbone {self.architecture!r}; choose one of: "
            f"{', '.join([*ARCHITECTURES, *FOUNDATION_MODELS, PIXELS])}, "
            "or a path to a .keras model file"
        )

    def _check_application(self) -> None:
        arch = ARCHITECTURES[self.architecture]
        if not arch.min_size <= self.input_size <= IMAGE_SIZE.top:
            raise BackboneError(
                f"--image-size must be between {arch.min_size} and {IMAGE_SIZE.high} for {arch.name}; "
                f"got {self.input_size}"
            )
        if self.weights not in (WEIGHTS_IMAGENET, WEIGHTS_NONE) and not Path(self.weights).is_file():
            raise BackboneError(f"weights file not found: {self.weights} (use --weights imagenet, none, or a path)")

    def _check_foundation(self) -> None:
        model = self.foundation
        # The defaults of the flags (meant for applications) become this model's: pretrained and its own pooling.
        if self.weights == WEIGHTS_IMAGENET:
            object.__setattr__(self, "weights", WEIGHTS_HUB)
        if self.pooling == "avg":
            object.__setattr__(self, "pooling", model.default_pooling)
        if self.pooling not in model.poolings:
            raise BackboneError(
                f"--pooling {self.pooling} does not fit {model.name}; choose one of: "
                f"{', '.join(f'{p} ({POOLINGS[p]})' for p in model.poolings)}"
            )
        patch, trained_size = model.patch_size, model.default_size
        if self.weights not in (WEIGHTS_NONE, WEIGHTS_HUB):
            folder = self.preset_folder  # also checks the folder holds a model of this family
            patch, trained_size = folder.patch_size, folder.image_size
        size = self.input_size
        if self.weights != WEIGHTS_NONE and model.family != "dinov2" and size != trained_size:
            # Only DINOv2 resizes its position embeddings to another grid; the others hold one per patch.
            raise BackboneError(
                f"{model.name} takes {trained_size}x{trained_size} images with these weights (its "
                f"position embeddings are fixed); got --image-size {size}"
            )
        if not patch <= size <= FOUNDATION_IMAGE_SIZE.top or size % patch:
            raise BackboneError(
                f"--image-size must be a multiple of {model.name}'s patch size {patch} "
                f"(between {patch} and {FOUNDATION_IMAGE_SIZE.high}); got {size}"
            )

    @property
    def foundation(self) -> FoundationModel:
        return FOUNDATION_MODELS[self.architecture]

    @property
    def preset_folder(self) -> PresetFolder:
        """The local preset folder of `--weights DIR` (foundation models only)."""
        return read_preset_folder(self.weights, self.foundation)

    def _check_model_file(self) -> None:
        info = read_keras_file(self.architecture)
        if not self.layer:
            raise BackboneError(
                f"--layer is needed with a model file; layers of {self.architecture}: "
                f"{', '.join(info.layer_names[-5:])}"
            )
        info.check_layer(self.layer)
        height, width, channels = info.input_shape
        if channels is not None and channels != 3:
            raise BackboneError(
                f"{self.architecture} takes {channels}-channel input; a backbone must take RGB "
                "(3-channel) images: save a model whose Input has shape (height, width, 3)"
            )
        if height and width and height != width:
            raise BackboneError(f"{self.architecture} takes {height}x{width} images; only square inputs are supported")
        if height and self.image_size and self.image_size != height:
            raise BackboneError(
                f"{self.architecture} takes {height}x{height} images; got --image-size {self.image_size}"
            )
        if not (height or self.image_size):
            raise BackboneError(f"{self.architecture} does not fix its input size: pass --image-size")
        if not height:  # a free input size takes any size; one too large is killed by the kernel, not refused
            IMAGE_SIZE.check(self.image_size, "--image-size", BackboneError, f"{IMAGE_SIZE.must} ({IMAGE_SIZE.note})")
        if (self.preprocess or "none") not in PREPROCESSING:
            raise BackboneError(f"unknown --preprocess {self.preprocess!r}; choose one of: {', '.join(PREPROCESSING)}")

    @property
    def float32_spec(self) -> BackboneSpec:
        """This backbone in float32: the network OpenVINO converts, which bf16 and int8 are derived from."""
        return replace(self, precision="float32", calibration=None)

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    @property
    def input_size(self) -> int:
        if self.image_size:
            return self.image_size
        if self.architecture == PIXELS:
            return PIXELS_DEFAULT_SIZE
        if self.architecture in ARCHITECTURES:
            return self.arch.default_size
        if self.architecture in FOUNDATION_MODELS:
            if self.weights in (WEIGHTS_NONE, WEIGHTS_HUB, WEIGHTS_IMAGENET):
                return self.foundation.default_size
            return self.preset_folder.image_size
        return int(read_keras_file(self.architecture).input_shape[0])

    @property
    def name(self) -> str:
        """A short name: the application, 'pixels', or the model file's stem (as the user named it)."""
        return (self.file_stem or Path(self.architecture).stem) if self.kind == "file" else self.architecture

    @property
    def pretrained(self) -> bool:
        """False for random weights: `--weights none`, or a model file that `pretrain --epochs 0` saved."""
        if self.kind in ("application", "foundation"):
            return self.weights != WEIGHTS_NONE
        if self.kind == "file":
            info = Path(self.architecture + ".info.json")
            try:
                return json.loads(info.read_text()).get("epochs_run", 1) > 0
            except (OSError, ValueError, AttributeError):
                return True  # a model from elsewhere: trained, as far as we can tell
        return True

    @property
    def random_weights_warning(self) -> str:
        if self.kind == "file":
            return f"RANDOM WEIGHTS: {self.architecture} was saved untrained (pretrain --epochs 0)"
        return RANDOM_WEIGHTS_WARNING

    @property
    def feature_dim(self) -> int | None:
        """Length of a feature vector, or None for a model file (known once it is built)."""
        if self.kind == "application":
            return self.arch.feature_dim
        if self.kind == "foundation":
            if self.weights in (WEIGHTS_NONE, WEIGHTS_HUB):
                return self.foundation.feature_dim
            return self.preset_folder.feature_dim
        if self.kind == "pixels":
            return self.input_size * self.input_size * 3
        return None

    @property
    def preprocessing(self) -> str:
        if self.kind == "application":
            return self.arch.preprocessing
        if self.kind == "foundation":
            return self.foundation.preprocessing
        if self.kind == "pixels":
            return "pixels: x / 255, flattened"
        return PREPROCESSING[self.preprocess or "none"]

    def weights_id(self, file_hasher: Callable[[str], str] | None = None) -> str:
        """'imagenet', 'none-seed0-<scheme>', 'sha256:<hex>' of the weights or model file, or 'none'."""
        hasher = file_hasher or _sha256_of
        if self.kind == "file":
            return "sha256:" + hasher(str(Path(self.architecture).absolute()))
        if self.kind == "pixels":
            return "none"
        if self.kind == "foundation" and self.weights == WEIGHTS_HUB:
            return f"keras-hub:{self.foundation.preset}"
        if self.kind == "foundation" and self.weights != WEIGHTS_NONE:
            return "preset-sha256:" + _preset_digest(self.weights, hasher)
        if self.weights == WEIGHTS_IMAGENET:
            return self.weights
        if self.weights == WEIGHTS_NONE:
            # Random weights are seeded and drawn with NumPy: the same network on every run and every backend.
            return f"none-seed{RANDOM_WEIGHTS_SEED}-{RANDOM_WEIGHTS_SCHEME}"
        return "sha256:" + hasher(str(Path(self.weights).absolute()))

    def identity(self, file_hasher: Callable[[str], str] | None = None) -> dict:
        """The fields the fingerprint covers, as plain JSON-able data."""
        identity = {
            "architecture": self.architecture if self.kind != "file" else "keras-file",
            "weights": self.weights_id(file_hasher),
            "input_size": self.input_size,
            "pooling": self.pooling,
            "preprocessing": self.preprocessing,
            "decode": DECODE_VERSION,
        }
        if self.kind == "file":
            identity["layer"] = self.layer
        if self.precision != "float32":  # absent for float32, so float32 stores keep their names
            identity["precision"] = self.precision
        if self.precision == "int8":
            if self.calibration is None:
                raise BackboneError("an int8 backbone has no fingerprint before its calibration set is chosen")
            identity["calibration"] = self.calibration
        return identity

    def fingerprint(self, file_hasher: Callable[[str], str] | None = None) -> str:
        """A readable, unique name for this exact backbone, e.g. 'inception_v3-299-imagenet-1a2b3c4d5e6f'."""
        identity = self.identity(file_hasher)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        if self.kind == "application":
            tag = {WEIGHTS_IMAGENET: "imagenet", WEIGHTS_NONE: "none"}.get(self.weights, "file")
        elif self.kind == "foundation":
            tag = {WEIGHTS_HUB: "hub", WEIGHTS_NONE: "none"}.get(self.weights, "preset") + f"-{self.pooling}"
        elif self.kind == "file":
            assert self.layer is not None  # __post_init__ refuses a model file without --layer
            tag = self.layer
        else:  # pixels
            tag = "raw"
        if self.precision != "float32":
            tag += f"-{self.precision}"
        if self.calibration:
            tag += f"-cal{self.calibration[:8]}"
        safe_name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in f"{self.name}-{self.input_size}-{tag}")
        return f"{safe_name}-{digest}"


def _preset_digest(folder: str, hasher: Callable[[str], str]) -> str:
    """One digest over a preset folder: each file's relative name and content hash, in a fixed order."""
    root = Path(folder).absolute()
    listing = [(str(path.relative_to(root)), hasher(str(path))) for path in preset_files(str(root))]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _sha256_of(path: str) -> str:
    from bottleneck.fs import sha256_file

    return sha256_file(path)


def spec_record(spec: BackboneSpec) -> dict:
    """`spec` as JSON-able data for a run's config.json, with file paths made absolute."""

    def absolute(path: str) -> str:
        return str(Path(path).absolute())

    return {
        "architecture": absolute(spec.architecture) if spec.kind == "file" else spec.architecture,
        "weights": spec.weights
        if spec.weights in (WEIGHTS_IMAGENET, WEIGHTS_NONE, WEIGHTS_HUB)
        else absolute(spec.weights),
        "image_size": spec.input_size,
        "pooling": spec.pooling,
        "layer": spec.layer,
        "preprocess": spec.preprocess,
        "precision": spec.precision,
        "calibration": spec.calibration,
    }


def spec_from_record(record: dict) -> BackboneSpec:
    """The spec a run recorded with `spec_record`."""
    fields = (
        "architecture",
        "weights",
        "image_size",
        "pooling",
        "layer",
        "preprocess",
        "precision",
        "calibration",
        "file_stem",
    )
    return BackboneSpec(**{name: record[name] for name in fields if name in record})


def spec_from_store_attrs(attrs: dict) -> BackboneSpec:
    """The spec behind a store's attributes (for runs that predate `spec_record`)."""
    architecture = str(attrs["architecture"])
    size = int(attrs["input_size"])
    if architecture in FOUNDATION_MODELS:
        return BackboneSpec(
            architecture=architecture, weights=str(attrs["weights"]), image_size=size, pooling=str(attrs["pooling"])
        )
    if architecture == PIXELS or architecture in ARCHITECTURES:
        weights = str(attrs.get("weights", WEIGHTS_IMAGENET)) if architecture != PIXELS else WEIGHTS_NONE
        precision = str(attrs.get("precision", "float32"))
        return BackboneSpec(
            architecture=architecture,
            weights=weights,
            image_size=size,
            precision=precision,
            calibration=str(attrs["calibration"]) if precision == "int8" else None,
        )
    by_text = {text: key for key, text in PREPROCESSING.items()}
    return BackboneSpec(
        architecture=architecture,
        layer=str(attrs.get("layer") or "") or None,
        image_size=size,
        preprocess=by_text.get(str(attrs.get("preprocessing", "")), "none"),
    )
