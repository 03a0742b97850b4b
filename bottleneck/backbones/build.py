"""Build the network of a `BackboneSpec` with Keras 3, on whichever backend this process runs.

The seam is `build_feature_network`: float32 RGB pixels (0-255) in, pooled features out, with the
spec's preprocessing as built-in Keras layers in front of the frozen backbone. It is written with
Keras layers only, so TensorFlow, JAX and PyTorch run the same network with the same weights.
Feature extraction (`FeatureModel`, compiled the way each backend does best), the OpenVINO runtime
and exported classifiers all run this one network, so a model exported from a run computes exactly
the features its head was trained on. Backends are imported only when a network is built.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Callable, TypeVar

import numpy as np

from bottleneck.backbones.applications import CAFFE_MEAN_BGR, TORCH_MEAN_RGB, TORCH_STD_RGB
from bottleneck.backbones.backend import MIXED_POLICY, backend_versions, import_keras, quiet_startup
from bottleneck.backbones.spec import RANDOM_WEIGHTS_SEED, WEIGHTS_IMAGENET, WEIGHTS_NONE, BackboneSpec
from bottleneck.errors import BackboneError
from bottleneck.text import first_line

#: The name of the feature network's input: float32 (n, size, size, 3) RGB pixels in 0..255.
INPUT_NAME = "pixels"

T = TypeVar("T")


def import_tensorflow():
    """(tensorflow, keras), quietly, or a one-line error if TensorFlow is not installed.

    For the parts that need TensorFlow itself (graph decoding, SavedModel export, fine-tuning);
    networks are built with `import_keras`, on any backend.
    """
    try:
        # TensorFlow's C++ start-up chatter (CPU features, tf.data attribute notes) is not for users.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        keras = import_keras()  # strict float32 before TensorFlow first computes
        with quiet_startup():  # imported here first when Keras runs on another backend
            import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # retracing notes and the like; errors still raise
    except ImportError:
        raise BackboneError(
            "TensorFlow is not installed: pip install 'bottleneck-transfer[cpu]' (or '[gpu]' on a CUDA machine)"
        ) from None
    if keras.config.backend() != "tensorflow":
        raise BackboneError(
            f"this step runs on TensorFlow (its graphs, SavedModels and tf.data), but Keras runs on "
            f"{keras.config.backend()} here (KERAS_BACKEND): set KERAS_BACKEND=tensorflow for it; "
            "`features` and `predict` run on any backend (--backend)"
        )
    return tf, keras


# ---------------------------------------------------------------------------------------------
# Weights: all or nothing

#: What Keras says (as a warning, or in an error) when some weights of a file did not load. Keras 3
#: raises for most mismatches but only warns for some (skipped layers, nested containers left with
#: "freshly-initialized weights"); either way the backbone would be partly random.
_PARTIAL_LOAD = re.compile(
    r"could not be loaded|skipping (loading|variable|nested)|freshly.initiali[sz]ed|mismatch in (shape|number)"
    r"|expected \d+ variables|layer count mismatch|weight count mismatch",
    re.IGNORECASE,
)


class _LogCapture(logging.Handler):
    """Collects the warnings Keras logs (rather than warns) while it is installed on the root logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _LogCapture:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc_info) -> None:
        logging.getLogger().removeHandler(self)


def what_did_not_load(message: str) -> str:
    """A one-line summary of Keras' message about weights that did not load.

    "A total of 31 objects could not be loaded ... [<Conv2D name=a, ...>, ...]" becomes
    "31 layers did not load: a, b, c and 28 more"; other messages give their first line.
    """
    total = re.search(r"A total of (\d+) objects could not be loaded", message)
    if total:
        listed = message.split("List of objects that could not be loaded:", 1)[-1]
        names = list(dict.fromkeys(re.findall(r"name=([^,>\s]+)", listed)))
        count = int(total.group(1))
        shown = ", ".join(names[:3])
        more = f" and {count - 3} more" if count > 3 else ""
        return f"{count} layers did not load: {shown}{more}" if names else first_line(message)
    line = first_line(message)
    return line if len(line) <= 300 else line[:297] + "..."


def load_all_or_nothing(load: Callable[[], T], source: str, architecture: str) -> T:
    """Run `load` (which loads weights from `source`); a partial load is a `BackboneError`, never a warning.

    Errors from `load` itself propagate unchanged; warnings unrelated to weights are passed on.
    """
    with warnings.catch_warnings(record=True) as caught, _LogCapture() as logged:
        warnings.simplefilter("always")
        result = load()
    partial = [m for m in [str(w.message) for w in caught] + logged.messages if _PARTIAL_LOAD.search(m)]
    for warning in caught:
        if not _PARTIAL_LOAD.search(str(warning.message)):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if partial:
        raise BackboneError(
            f"weights file {source} does not fit {architecture} without its top "
            f"(only part of it loaded; {what_did_not_load(partial[0])})"
        )
    return result


# ---------------------------------------------------------------------------------------------
# Backbones


def build_keras_backbone(spec: BackboneSpec):
    """The frozen Keras application of `spec`: takes preprocessed float input, returns pooled features."""
    keras = import_keras()
    builder = getattr(keras.applications, spec.arch.keras_builder)
    shape = (spec.input_size, spec.input_size, 3)
    if spec.weights == WEIGHTS_IMAGENET:
        model = _build_with_imagenet_weights(spec, builder, shape)
    else:
        model = builder(include_top=False, weights=None, input_shape=shape, pooling=spec.pooling)
        if spec.weights == WEIGHTS_NONE:
            portable_random_weights(model, RANDOM_WEIGHTS_SEED)
        else:
            _load_weights_file(model, spec)
    model.trainable = False
    return model


def portable_random_weights(model, seed: int) -> None:
    """Give `model` seeded random weights drawn with NumPy, so every backend gets the same network.

    Each backend's own initialisers draw different numbers from one seed. Here every trainable
    variable that is not a constant (kernels, not biases or batch-norm scales) is redrawn Glorot-
    uniform from its shape, with a generator seeded by (`seed`, its position); constants and
    non-trainable statistics keep their initial values.
    """
    for position, variable in enumerate(model.trainable_weights):
        values = np.asarray(variable.numpy())
        if values.size == 0 or np.all(values == values.flat[0]):
            continue
        fan_in, fan_out = _fans(values.shape)
        limit = np.sqrt(6.0 / max(1.0, fan_in + fan_out))
        rng = np.random.default_rng([seed, position])
        variable.assign(rng.uniform(-limit, limit, values.shape).astype(values.dtype))


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
    """(fan in, fan out) of a weight of `shape`, as Keras' variance-scaling initialisers count them."""
    if len(shape) == 1:
        return float(shape[0]), float(shape[0])
    if len(shape) == 2:
        return float(shape[0]), float(shape[1])
    receptive_field = float(np.prod(shape[:-2]))
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def _build_with_imagenet_weights(spec: BackboneSpec, builder: Callable, shape: tuple[int, int, int]):
    def build():
        return builder(include_top=False, weights="imagenet", input_shape=shape, pooling=spec.pooling)

    cached = spec.arch.cached_weights()
    source = str(cached) if cached else f"{spec.arch.weights_file} (ImageNet)"
    try:
        return load_all_or_nothing(build, source, spec.architecture)
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(
            f"could not get the ImageNet weights of {spec.architecture} ({first_line(exc)}); "
            f"Keras downloads them once into ~/.keras/models/{spec.arch.weights_file}. Offline? Pass --weights "
            "PATH to a local no-top weights file, or --weights none for random weights (tests only)"
        ) from None


def _load_weights_file(model, spec: BackboneSpec) -> None:
    try:
        load_all_or_nothing(lambda: model.load_weights(spec.weights), spec.weights, spec.architecture)
    except BackboneError:
        raise
    except Exception as exc:
        message = str(exc)
        detail = what_did_not_load(message) if _PARTIAL_LOAD.search(message) else first_line(exc)
        raise BackboneError(
            f"weights file {spec.weights} does not fit {spec.architecture} without its top ({detail})"
        ) from None


def build_file_backbone(spec: BackboneSpec):
    """A user's `.keras` model cut at `spec.layer`, average-pooled when that layer is spatial."""
    keras = import_keras()
    try:
        # safe_mode refuses the Lambda layers that would run code stored in the file.
        full = keras.saving.load_model(spec.architecture, compile=False, safe_mode=True)
    except Exception as exc:
        raise BackboneError(f"cannot load {spec.architecture} as a Keras model ({first_line(exc)})") from None
    inputs = list(full.inputs)
    shape = tuple(inputs[0].shape) if len(inputs) == 1 else ()
    if len(shape) != 4 or shape[-1] != 3:
        what = f"{len(inputs)} inputs" if len(inputs) != 1 else f"input of shape {shape[1:]}"
        raise BackboneError(
            f"{spec.architecture} takes {what}; a backbone must take one RGB (3-channel) image "
            "input: save a model whose Input has shape (height, width, 3)"
        )
    output = full.get_layer(spec.layer).output
    if len(output.shape) == 4:
        output = keras.layers.GlobalAveragePooling2D(name="bottleneck_pool")(output)
    elif len(output.shape) != 2:
        output = keras.layers.Flatten(name="bottleneck_flatten")(output)
    model = keras.Model(full.inputs, output, name=f"{full.name}_to_{spec.layer}")
    model.trainable = False
    return model


def import_keras_hub():
    """keras_hub, or a one-line error naming the install (it is an opt-in extra)."""
    import_keras()
    try:
        with quiet_startup():
            import keras_hub
    except ImportError as exc:
        from bottleneck.backbones.foundation import HUB_INSTALL

        raise BackboneError(f"foundation-model backbones need KerasHub ({first_line(exc)}): {HUB_INSTALL}") from None
    return keras_hub


def build_foundation_backbone(spec: BackboneSpec):
    """The frozen KerasHub vision model of `spec` (DINOv2, CLIP or SigLIP vision, ViT): pixels -> tokens or pooled.

    `--weights none` builds the row's configuration at `spec.input_size` with seeded NumPy weights; a preset
    folder loads offline with `from_preset` (all weights or an error); `hub` downloads the preset once.
    """
    keras_hub = import_keras_hub()
    model = spec.foundation
    shape = (spec.input_size, spec.input_size, 3)
    if spec.weights == WEIGHTS_NONE:
        backbone = getattr(keras_hub.models, model.keras_hub_class)(**model.config, image_shape=shape)
        portable_random_weights(backbone, RANDOM_WEIGHTS_SEED)
    elif spec.weights == "hub":
        backbone = _download_preset(keras_hub, spec, shape)
    else:
        folder = spec.preset_folder
        loader = getattr(keras_hub.models, folder.class_name)

        def load():
            if folder.image_size == spec.input_size:
                return loader.from_preset(str(folder.path))
            return loader.from_preset(str(folder.path), image_shape=shape)  # DINOv2 interpolates its positions

        try:
            backbone = load_all_or_nothing(load, spec.weights, spec.architecture)
        except BackboneError:
            raise
        except Exception as exc:
            raise BackboneError(
                f"cannot load the preset folder {spec.weights} for {spec.architecture} ({first_line(exc)})"
            ) from None
    backbone = getattr(backbone, "vision_encoder", backbone)  # a whole CLIP or SigLIP: its vision half
    _number_the_positions(backbone)
    if spec.weights != WEIGHTS_NONE:  # seeded random weights set the resized table itself
        _resize_positions_as_tensorflow_does(backbone)
    backbone.trainable = False
    return backbone


def _number_the_positions(backbone) -> None:
    """Give position ids left at zero their numbers 0..n-1.

    KerasHub's CLIP vision embedding creates its position ids as zeros and counts on a weights file to fill
    them in (SigLIP's numbers its own): built from a configuration, or saved from one, every token would get
    the first position's embedding. Zeros are never meant, so any all-zero ids are numbered.
    """
    for ids in backbone.non_trainable_weights:
        if not ids.path.endswith("position_ids"):
            continue
        values = np.asarray(ids.numpy())
        if values.size > 1 and not values.any():
            ids.assign(np.arange(values.size, dtype=values.dtype).reshape(values.shape))


def _resize_positions_as_tensorflow_does(backbone) -> None:
    """DINOv2's position table, resized to the input's patch grid the same way on every backend.

    KerasHub resizes it (518 px -> the input's grid) with the backend's own bicubic, and PyTorch's kernel differs
    from TensorFlow's: DINOv2's features on PyTorch were 2.2e-3 of their spread away. NumPy's copy of TensorFlow's
    resize keeps the rows of one fingerprint the same whichever backend computed them.
    """
    from bottleneck.backbones.foundation import resize_position_table

    for layer in backbone._flatten_layers():
        if not (hasattr(layer, "interpolated_position_embeddings") and hasattr(layer, "position_embedding_shape")):
            continue
        if (
            tuple(layer.position_embedding_shape[:2]) == tuple(layer.image_shape[:2])
            or layer.antialias_in_interpolation
        ):
            continue  # nothing resized; or an antialiased resize, which no preset of ours asks for
        keras = import_keras()
        table = np.asarray(keras.ops.convert_to_numpy(layer.position_embeddings), np.float32)
        grid = layer.image_shape[0] // layer.patch_size, layer.image_shape[1] // layer.patch_size
        layer.interpolated_position_embeddings.assign(
            resize_position_table(table, grid).astype(layer.interpolated_position_embeddings.dtype)
        )


def _download_preset(keras_hub, spec: BackboneSpec, shape: tuple[int, int, int]):
    model = spec.foundation
    whole = {"clip": "CLIPBackbone", "siglip": "SigLIPBackbone"}.get(model.family, model.keras_hub_class)
    loader = getattr(keras_hub.models, whole)
    try:
        kwargs = {} if spec.input_size == model.default_size else {"image_shape": shape}
        return loader.from_preset(model.preset, **kwargs)
    except Exception as exc:
        reason = first_line(exc)
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise BackboneError(
            f"could not get the KerasHub preset {model.preset} ({reason}); KerasHub downloads it once "
            "(from Kaggle) when online. Offline? Pass --weights DIR, a local preset folder (config.json + "
            "model.weights.h5, as Backbone.save_to_preset writes it), or --weights none for random weights (tests only)"
        ) from None


def pool_tokens(spec: BackboneSpec, tokens, keras):
    """`spec.pooling` of a foundation model's output, with built-in layers (so the network saves safely).

    cls: token 0 (after the final layer norm); mean: the mean of the patch tokens, leaving out the class
    token and any register tokens; pooled: the model's own pooled output, as it is.
    """
    if spec.pooling == "pooled" or len(tokens.shape) == 2:
        return tokens
    count = int(tokens.shape[1])
    if spec.pooling == "cls":
        first = keras.layers.Cropping1D((0, count - 1), name="pool_cls_token")(tokens)
        return keras.layers.Flatten(name="pool_cls_flatten")(first)
    skipped = 1 + (
        spec.foundation.config.get("num_register_tokens", 0)
        if spec.weights in (WEIGHTS_NONE, "hub")
        else spec.preset_folder.register_tokens
    )
    patches = keras.layers.Cropping1D((skipped, 0), name="pool_patch_tokens")(tokens)
    return keras.layers.GlobalAveragePooling1D(name="pool_patch_mean")(patches)


# ---------------------------------------------------------------------------------------------
# Preprocessing as layers, and the feature network

#: A `.keras` file's --preprocess, as a preprocessing mode ('inception' is Keras' 'tf' mode).
_FILE_PREPROCESS_MODES = {"none": "none", "unit": "unit", "inception": "tf"}


def preprocess_mode(spec: BackboneSpec) -> str:
    """'tf', 'caffe', 'torch', 'unit' (x / 255) or 'none': what the feature network does before the backbone."""
    if spec.kind == "application":
        return spec.arch.preprocess_mode
    if spec.kind == "foundation":
        return spec.foundation.preprocess_mode
    if spec.kind == "pixels":
        return "unit"
    return _FILE_PREPROCESS_MODES[spec.preprocess or "none"]


def preprocessing_layers(mode: str) -> list:
    """Built-in Keras layers doing `mode`'s preprocessing on float32 RGB 0-255 pixels (channels last).

    They equal `keras.applications.imagenet_utils.preprocess_input(x, mode=mode)` within float32
    rounding, and hold no code of ours, so a saved model loads with `safe_mode=True` anywhere.
    """
    keras = import_keras()
    layers = keras.layers
    if mode == "none":
        return []
    if mode == "unit":
        return [layers.Rescaling(1.0 / 255, name="preprocess_unit")]
    if mode == "tf":
        return [layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")]
    if mode == "torch":
        return [
            layers.Rescaling(1.0 / 255, name="preprocess_torch_unit"),
            layers.Normalization(
                axis=-1,
                mean=list(TORCH_MEAN_RGB),
                variance=[s * s for s in TORCH_STD_RGB],
                name="preprocess_torch_normalize",
            ),
        ]
    if mode == "clip":
        from bottleneck.backbones.foundation import CLIP_MEAN_RGB, CLIP_STD_RGB

        return [
            layers.Rescaling(1.0 / 255, name="preprocess_clip_unit"),
            layers.Normalization(
                axis=-1,
                mean=list(CLIP_MEAN_RGB),
                variance=[s * s for s in CLIP_STD_RGB],
                name="preprocess_clip_normalize",
            ),
        ]
    if mode == "caffe":
        return [_caffe_layer(keras)]
    raise BackboneError(f"unknown preprocessing mode {mode!r}")


def _caffe_layer(keras):
    """RGB -> BGR minus the ImageNet mean, as a fixed 1x1 Dense: a 0/1 permutation kernel and bias -mean.

    Exact in float32: each output is one input times 1 plus zeros, rounded once when the bias is added.
    """
    dense = keras.layers.Dense(3, trainable=False, name="preprocess_caffe_bgr_minus_mean")
    dense.build((None, None, None, 3))
    reverse_channels = np.eye(3, dtype=np.float32)[::-1]  # kernel[input, output]: output c reads input 2 - c
    dense.set_weights([reverse_channels, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
    return dense


def build_feature_network(spec: BackboneSpec):
    """The whole feature network of `spec` as one `keras.Model`, frozen, on this process's backend.

    Input `pixels`: float32 (n, size, size, 3) RGB in 0..255 (size = `spec.input_size`); output: the
    pooled features, (n, feature_dim) float32. The preprocessing is built-in layers before the
    backbone (nested as one layer), so the model saves to `.keras` and loads with `safe_mode=True`
    without this package. `pixels` is x / 255 flattened. With `spec.precision == 'mixed'` the layers
    compute in float16 (Keras' mixed_float16 policy) and the output is cast back to float32; bf16 and
    int8 are OpenVINO's, so in Keras (exports, fine-tuning) their network is the float32 one.
    """
    keras = import_keras()
    previous = keras.config.dtype_policy()
    if spec.precision == "mixed":
        keras.config.set_dtype_policy(MIXED_POLICY)
    try:
        return _feature_network(spec, keras)
    finally:
        keras.config.set_dtype_policy(previous)


def _feature_network(spec: BackboneSpec, keras):
    size = spec.input_size
    pixels = keras.Input((size, size, 3), dtype="float32", name=INPUT_NAME)
    x = pixels
    for layer in preprocessing_layers(preprocess_mode(spec)):
        x = layer(x)
    if spec.kind == "pixels":
        features = keras.layers.Flatten(name="flatten_pixels")(x)
    elif spec.kind == "foundation":
        backbone = build_foundation_backbone(spec)
        features = pool_tokens(spec, backbone({"images": x} if isinstance(backbone.input, dict) else x), keras)
    else:
        backbone = build_keras_backbone(spec) if spec.kind == "application" else build_file_backbone(spec)
        features = backbone(x)
    if spec.precision == "mixed":
        features = keras.layers.Activation("linear", dtype="float32", name="features_float32")(features)
    network = keras.Model(pixels, features, name=f"{_layer_name(spec.name)}_features")
    network.trainable = False
    return network


def _layer_name(text: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)


class FeatureModel:
    """Runs the feature network on uint8 RGB batches: cast to float32, then `build_feature_network(spec)`.

    Compiled the way this process's Keras backend does best (`bottleneck.backbones.compile`); the
    cast stays inside the compiled function, so only uint8 pixels cross into the backend.
    """

    def __init__(self, spec: BackboneSpec):
        self.spec = spec
        if spec.kind == "pixels":
            # x / 255 flattened needs no backend: pixel baselines stay light (the exported
            # network does the same as Rescaling + Flatten, equal within float32 rounding).
            self.feature_dim = spec.feature_dim
            self.versions: dict = {}
            self.backend = "numpy"
            self._features = None
            return
        from bottleneck.backbones.compile import compile_feature_network

        keras = import_keras()
        network = build_feature_network(spec)
        self.model = network  # the feature network: what exports and the OpenVINO runtime convert
        self.feature_dim = int(network.output.shape[-1])
        self.backend = keras.config.backend()
        self._features = compile_feature_network(network, spec.input_size, self.backend)
        self.versions = backend_versions(keras)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 -> (n, feature_dim) float32."""
        if self._features is None:
            return batch.reshape(len(batch), -1).astype(np.float32) / 255.0
        return np.asarray(self._features(np.ascontiguousarray(batch)), dtype=np.float32)
