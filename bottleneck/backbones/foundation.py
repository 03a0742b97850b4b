"""Foundation-model backbones from KerasHub (DINOv2, CLIP vision, SigLIP vision, ViT), one row each.

Plain data (no TensorFlow, no keras_hub), so `bottleneck backbones` and the fingerprint read it at once.
Weights: `none` (the row's configuration, seeded NumPy-drawn random weights, as for applications),
`hub` (KerasHub downloads the preset once, online), or a local preset folder (`config.json` +
`model.weights.h5`, as `Backbone.save_to_preset` writes it), loaded offline. The feature size and input
size of a preset folder are read from its `config.json`.

Pooling: `cls` (the class token after the final layer norm; for CLIP this is exactly its pooled output
before the projection), `mean` (the mean of the patch tokens, registers left out) or `pooled` (SigLIP's
own attention-pooling head, its only output). The default is `cls` where there is one: it is what DINOv2's
and CLIP's linear probes and ViT's classifier read; SigLIP has no class token, so `pooled`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bottleneck.errors import BackboneError

WEIGHTS_HUB = "hub"
#: What a missing keras-hub says: it is an opt-in install (its declared dependencies pull the full
#: tensorflow package beside tensorflow-cpu), see `make hub`.
HUB_INSTALL = (
    "pip install regex tokenizers sentencepiece kagglehub && pip install --no-deps 'keras-hub>=0.32' (or `make hub`; "
    "keras-hub's own dependencies would pull the full tensorflow beside tensorflow-cpu)"
)

#: CLIP's own per-channel statistics (RGB, 0-1), from OpenAI's preprocessing.
CLIP_MEAN_RGB = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD_RGB = (0.26862954, 0.26130258, 0.27577711)

#: Preprocessing modes (as in `build.preprocessing_layers`) and what they do.
FOUNDATION_PREPROCESSING = {
    "torch": "x / 255, minus mean (0.485, 0.456, 0.406), over std (0.229, 0.224, 0.225) (RGB)",
    "clip": "x / 255, minus mean (0.4815, 0.4578, 0.4082), over std (0.2686, 0.2613, 0.2758) (RGB)",
    "tf": "x / 127.5 - 1 (RGB)",
}

POOLINGS = {
    "cls": "the class token after the final layer norm",
    "mean": "the mean of the patch tokens (class and register tokens left out)",
    "pooled": "the model's own pooled output (SigLIP's attention-pooling head)",
}


@dataclass(frozen=True)
class FoundationModel:
    """A KerasHub vision model usable as a backbone."""

    name: str
    family: str  # dinov2, clip, siglip, vit
    keras_hub_class: str  # the class `--weights none` builds (keras_hub.models.<name>)
    preset: str  # the KerasHub preset `--weights hub` downloads
    config: dict = field(hash=False)  # the class's arguments for --weights none (image_shape added at build)
    default_size: int = 224
    feature_dim: int = 768
    preprocess_mode: str = "torch"
    poolings: tuple[str, ...] = ("cls", "mean")
    licence: str = ""

    @property
    def default_pooling(self) -> str:
        return self.poolings[0]

    @property
    def patch_size(self) -> int:
        return int(self.config["patch_size"])

    @property
    def preprocessing(self) -> str:
        return f"{self.preprocess_mode}: {FOUNDATION_PREPROCESSING[self.preprocess_mode]}"


def _dinov2(size: str, hidden: int, layers: int, heads: int, registers: int = 0) -> FoundationModel:
    name = f"dinov2_{size}" if not registers else f"dinov2_reg_{size}"
    preset = f"dinov2_{size}" if not registers else f"dinov2_with_registers_{size}"
    return FoundationModel(
        name=name,
        family="dinov2",
        keras_hub_class="DINOV2Backbone",
        preset=preset,
        config=dict(
            patch_size=14,
            num_layers=layers,
            hidden_dim=hidden,
            num_heads=heads,
            intermediate_dim=4 * hidden,
            layer_scale_init_value=1.0,
            num_register_tokens=registers,
            position_embedding_shape=(518, 518, 3),
        ),
        default_size=224,
        feature_dim=hidden,
        preprocess_mode="torch",
        poolings=("cls", "mean"),
        licence="Apache-2.0",
    )


def _clip(name: str, preset: str, patch: int) -> FoundationModel:
    return FoundationModel(
        name=name,
        family="clip",
        keras_hub_class="CLIPVisionEncoder",
        preset=preset,
        config=dict(
            patch_size=patch,
            hidden_dim=768,
            num_layers=12,
            num_heads=12,
            intermediate_dim=3072,
            intermediate_activation="quick_gelu",
        ),
        default_size=224,
        feature_dim=768,
        preprocess_mode="clip",
        poolings=("cls", "mean"),
        licence="MIT",
    )


_ROWS = [
    _dinov2("small", 384, 12, 6),
    _dinov2("base", 768, 12, 12),
    _dinov2("large", 1024, 24, 16),
    _dinov2("small", 384, 12, 6, registers=4),
    _dinov2("base", 768, 12, 12, registers=4),
    _clip("clip_vit_b16", "clip_vit_base_patch16", 16),
    _clip("clip_vit_b32", "clip_vit_base_patch32", 32),
    FoundationModel(
        name="siglip2_b16",
        family="siglip",
        keras_hub_class="SigLIPVisionEncoder",
        preset="siglip2_base_patch16_224",
        config=dict(
            patch_size=16,
            hidden_dim=768,
            num_layers=12,
            num_heads=12,
            intermediate_dim=3072,
            intermediate_activation="gelu_approximate",
        ),
        default_size=224,
        feature_dim=768,
        preprocess_mode="tf",
        poolings=("pooled",),
        licence="Apache-2.0",
    ),
    FoundationModel(
        name="vit_b16",
        family="vit",
        keras_hub_class="ViTBackbone",
        preset="vit_base_patch16_224_imagenet",
        config=dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
        default_size=224,
        feature_dim=768,
        preprocess_mode="tf",
        poolings=("cls", "mean"),
        licence="Apache-2.0",
    ),
]

FOUNDATION_MODELS = {row.name: row for row in _ROWS}

#: The classes a local preset folder of each family may hold (CLIP and SigLIP: the whole model or its
#: vision encoder; the vision encoder is taken from the whole).
_FAMILY_CLASSES = {
    "dinov2": ("DINOV2Backbone",),
    "clip": ("CLIPVisionEncoder", "CLIPBackbone"),
    "siglip": ("SigLIPVisionEncoder", "SigLIPBackbone"),
    "vit": ("ViTBackbone",),
}


@dataclass(frozen=True)
class PresetFolder:
    """What `config.json` of a local preset folder says: its class and its vision encoder's arguments."""

    path: Path
    class_name: str
    vision_config: dict = field(hash=False)

    @property
    def image_size(self) -> int:
        return int(self.vision_config["image_shape"][0])

    @property
    def feature_dim(self) -> int:
        return int(self.vision_config["hidden_dim"])

    @property
    def patch_size(self) -> int:
        patch = self.vision_config["patch_size"]
        return int(patch[0] if isinstance(patch, (list, tuple)) else patch)

    @property
    def register_tokens(self) -> int:
        return int(self.vision_config.get("num_register_tokens", 0))


def read_preset_folder(path: str, model: FoundationModel) -> PresetFolder:
    """The preset folder at `path`, checked to hold a model of `model`'s family (a `BackboneError` if not)."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise BackboneError(
            f"--weights {path}: not a KerasHub preset folder (no config.json); use --weights hub, "
            "none, or a folder that Backbone.save_to_preset wrote (config.json + model.weights.h5)"
        )
    try:
        config = json.loads(config_file.read_text())
        if isinstance(config, dict) and "model_type" in config:
            return _hugging_face_snapshot(folder, config, model)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"--weights {path}: unreadable config.json ({exc})") from None
    if not (folder / "model.weights.h5").is_file():
        raise BackboneError(f"--weights {path}: the preset folder has no model.weights.h5")
    try:
        class_name = str(config.get("registered_name") or config["class_name"]).split(">")[-1]
        arguments = dict(config["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackboneError(f"--weights {path}: unreadable config.json ({exc})") from None
    allowed = _FAMILY_CLASSES[model.family]
    if class_name not in allowed:
        raise BackboneError(
            f"--weights {path} holds a {class_name}, not a {model.family} model "
            f"({' or '.join(allowed)}) for --backbone {model.name}"
        )
    if "vision_encoder" in arguments:  # a whole CLIP or SigLIP: its vision half
        arguments = dict(arguments["vision_encoder"].get("config", arguments["vision_encoder"]))
    return PresetFolder(folder, class_name, arguments)


#: Hugging Face model types KerasHub converts on loading, and the class each becomes.
_SNAPSHOT_CLASSES = {"dinov2": "DINOV2Backbone", "vit": "ViTBackbone"}


def _hugging_face_snapshot(folder: Path, config: dict, model: FoundationModel) -> PresetFolder:
    """A transformers snapshot folder (config.json + model.safetensors) that KerasHub converts as it loads."""
    model_type = str(config["model_type"])
    class_name = _SNAPSHOT_CLASSES.get(model_type)
    if class_name is None:
        raise BackboneError(
            f"--weights {folder}: a Hugging Face snapshot of a {model_type!r} model; KerasHub converts "
            f"{' and '.join(_SNAPSHOT_CLASSES)} snapshots only (others: a KerasHub preset folder)"
        )
    if class_name not in _FAMILY_CLASSES[model.family]:
        raise BackboneError(
            f"--weights {folder} holds a {model_type} snapshot, not a {model.family} model for --backbone {model.name}"
        )
    if not list(folder.glob("*.safetensors")):
        raise BackboneError(f"--weights {folder}: the Hugging Face snapshot has no .safetensors weights")
    try:
        size = int(config["image_size"])
        arguments = {
            "hidden_dim": int(config["hidden_size"]),
            "image_shape": [size, size, 3],
            "patch_size": int(config["patch_size"]),
            "num_register_tokens": int(config.get("num_register_tokens", 0)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise BackboneError(f"--weights {folder}: config.json lacks {exc}") from None
    return PresetFolder(folder, class_name, arguments)


def preset_files(path: str) -> list[Path]:
    """The files of a preset folder that the fingerprint covers: every file, in a fixed order."""
    folder = Path(path)
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# DINOv2's position table at another input size: TensorFlow's bicubic resize, in NumPy

_BICUBIC_TABLE = 1024  # TensorFlow looks the Keys kernel up in a table of this many steps, not exactly


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of TensorFlow's `resize_bicubic` (half-pixel centres, Keys a=-0.5, no antialias).

    Its quirks kept: the kernel read from a 1,024-step table, and taps outside the image dropped with the rest
    renormalised; measured within 8e-7 of `tf.image.resize` (downsampling and upsampling, a test)."""
    steps = np.arange(_BICUBIC_TABLE + 1, dtype=np.float64) / _BICUBIC_TABLE
    near = (((1.5 * steps - 2.5) * steps * steps) + 1).astype(np.float32)
    far_x = steps + 1
    far = ((((-0.5 * far_x + 2.5) * far_x) - 4) * far_x + 2).astype(np.float32)
    matrix = np.zeros((n_out, n_in), np.float64)
    scale = np.float32(n_in) / np.float32(n_out)
    for out in range(n_out):
        position = (np.float32(out) + np.float32(0.5)) * scale - np.float32(0.5)
        base = int(np.floor(position))
        step = int(np.rint(np.float32(position - base) * _BICUBIC_TABLE))
        weights = np.array([far[step], near[step], near[_BICUBIC_TABLE - step], far[_BICUBIC_TABLE - step]], np.float64)
        taps = np.arange(base - 1, base + 3)
        inside = (taps >= 0) & (taps < n_in)
        weights = np.where(inside, weights, 0.0)
        matrix[out, taps[inside]] += weights[inside] / weights.sum()
    return matrix


def resize_position_table(table: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(1, 1 + n*n, dim) class-then-patch positions -> (1, 1 + rows*cols, dim), the patches resized bicubically."""
    side, dim = int(round((table.shape[1] - 1) ** 0.5)), table.shape[-1]
    patches = table[0, 1:].reshape(side, side, dim).astype(np.float64)
    rows, cols = _bicubic_matrix(side, grid[0]), _bicubic_matrix(side, grid[1])
    resized = np.einsum("ri,ijd,cj->rcd", rows, patches, cols).astype(np.float32)
    return np.concatenate([table[:, :1], resized.reshape(1, -1, dim)], axis=1)
