"""What fine-tune trains, and how fast: the unfrozen layers, their groups and rates, BatchNorm, the softened head.

The classifier is the backbone's feature network followed by the run's head (`learn/classifier.py`). The top
layers with weights are unfrozen in up to 4 groups, each with its own rate (discriminative rates, the lowest
`lower_rate_factor` times slower), and a sharp logreg head is softened on validation before training.
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Callable

import numpy as np

from bottleneck.backbones.build import import_tensorflow
from bottleneck.errors import DataError
from bottleneck.learn.classifier import OUTPUT_NAME
from bottleneck.learn.finetune_images import _predict

if TYPE_CHECKING:
    from bottleneck.learn.finetune import FineTuneConfig


def _leaf_layers(layer) -> list:
    """Every layer inside `layer`, nested models opened up, in order."""
    inner = getattr(layer, "layers", None)
    if not inner:
        return [layer]
    return [leaf for child in inner for leaf in _leaf_layers(child)]


def _feature_network(model):
    """The backbone part of a classifier built by `build_classifier`: its first nested model."""
    return next(layer for layer in model.layers if getattr(layer, "layers", None))


def tunable_layers(model) -> list:
    """The backbone's layers that hold trainable weights, BatchNormalization excluded, bottom to top."""
    _, keras = import_tensorflow()
    leaves = _leaf_layers(_feature_network(model))
    fixed = (keras.layers.BatchNormalization, keras.layers.Normalization, keras.layers.Rescaling)
    return [
        leaf
        for leaf in leaves
        if leaf.weights and not isinstance(leaf, fixed) and not leaf.name.startswith("bottleneck_")
    ]


def choose_unfrozen(layers: list, config: FineTuneConfig) -> list:
    """The layers `config` unfreezes, bottom to top."""
    if config.unfreeze_from is not None:
        names = [layer.name for layer in layers]
        if config.unfreeze_from not in names:
            close = difflib.get_close_matches(config.unfreeze_from, names, n=5, cutoff=0.3) or names[-5:]
            raise DataError(
                f"--unfreeze-from {config.unfreeze_from!r} is not a trainable layer of this backbone; "
                f"nearest names: {', '.join(close)}"
            )
        return layers[names.index(config.unfreeze_from) :]
    return layers[-config.unfreeze :] if config.unfreeze else list(layers)


def unfreeze_groups(unfrozen: list) -> list[list]:
    """The unfrozen layers in at most 4 groups of about equal size, the top group first: each group gets its own
    learning rate (lower groups smaller), and `gradual` unfreezes one more group per epoch."""
    if len(unfrozen) <= 1:
        return [unfrozen]
    count = min(4, len(unfrozen))
    bounds = np.linspace(len(unfrozen), 0, count + 1).round().astype(int)
    return [unfrozen[bounds[i + 1] : bounds[i]] for i in range(count)]


def group_rate_factors(count: int, lower_rate_factor: float) -> list[float]:
    """Each group's share of the top rate, the top group first: 1 down to 1/lower_rate_factor, geometrically."""
    if count <= 1:
        return [1.0] * count
    return [float(lower_rate_factor ** (-i / (count - 1))) for i in range(count)]


def _batchnorm_owners(model, tunable: list) -> list[tuple]:
    """(BatchNormalization layer, the tunable layer just below it, or None) for every BatchNorm of the backbone."""
    _, keras = import_tensorflow()
    wanted = {id(layer) for layer in tunable}
    owner, found = None, []
    for leaf in _leaf_layers(_feature_network(model)):
        if id(leaf) in wanted:
            owner = leaf
        elif isinstance(leaf, keras.layers.BatchNormalization):
            found.append((leaf, owner))
    return found


def set_trainable(model, unfrozen: list, bn: str = "frozen") -> None:
    """Freeze the whole network but `unfrozen` and the head. BatchNormalization stays in inference mode (its
    statistics frozen) but with `bn="train"`, where the BatchNorm layers just above unfrozen layers train."""
    _, keras = import_tensorflow()
    model.trainable = True
    wanted = {id(layer) for layer in unfrozen}
    backbone = {id(layer) for layer in _leaf_layers(_feature_network(model))}
    for layer in _leaf_layers(model):
        is_head = id(layer) not in backbone  # everything after the feature network
        layer.trainable = (id(layer) in wanted or is_head) and not isinstance(layer, keras.layers.BatchNormalization)
    if bn == "train":
        for layer, owner in _batchnorm_owners(model, unfrozen):
            layer.trainable = owner is not None


def rate_groups(model, groups: list[list], stage: int, bn: str, lower_rate_factor: float) -> list[tuple[float, list]]:
    """(rate factor, variables) per optimizer: the head at the top rate, then each unfrozen group of the backbone
    at its own share of it. With `bn="affine"` every BatchNorm's gamma and beta train too (as in fastai), at the
    rate of the group of the layer under it (the lowest unfrozen group's where that layer stays frozen)."""
    factors = group_rate_factors(len(groups), lower_rate_factor)
    active = groups[:stage]
    backbone = {id(layer) for layer in _leaf_layers(_feature_network(model))}
    head = [v for layer in _leaf_layers(model) if id(layer) not in backbone for v in layer.trainable_weights]
    found = [(1.0, head)]
    members = {id(layer): i for i, group in enumerate(active) for layer in group}
    per_group: list[list] = [[v for layer in group for v in layer.trainable_weights] for group in active]
    if active:
        for layer, owner in _batchnorm_owners(model, [leaf for group in active for leaf in group]):
            where = members.get(id(owner), len(active) - 1)
            if bn == "affine":
                per_group[where] += [v for v in (layer.gamma, layer.beta) if v is not None]
            elif bn == "train" and owner is not None:
                per_group[where] += list(layer.trainable_weights)
    found += [(factors[i], variables) for i, variables in enumerate(per_group) if variables]
    return found


TEMPERATURE_MAX = 100.0


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T >= 1 minimising the cross-entropy of softmax(logits / T) against `y` (Guo et al. 2017)."""
    grid = np.exp(np.linspace(0.0, math.log(TEMPERATURE_MAX), 241))
    losses = [_cross_entropy(logits / t, y) for t in grid]
    return float(grid[int(np.argmin(losses))])


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_proba = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_proba[np.arange(len(y)), y].mean())


def _softmax_head(model):
    """The classifier's Dense softmax output layer (a logreg head's), or None for any other head."""
    try:
        layer = model.get_layer(OUTPUT_NAME)
    except ValueError:
        return None
    activation = getattr(getattr(layer, "activation", None), "__name__", "")
    return layer if layer.__class__.__name__ == "Dense" and activation == "softmax" else None


def soften_head(model, pixels, y: np.ndarray, log: Callable[[str], None]) -> dict | None:
    """Divide a sharp logreg head's weights by the temperature fitted on the validation images.

    A head fitted to separate a few training images is so sharp that its training loss is nearly zero, which
    leaves the base almost no gradient to learn from; the calibrated head predicts the same classes with the
    confidence the validation images support. Returns what was done (kept in the run's metrics), or None."""
    _, keras = import_tensorflow()
    dense = _softmax_head(model)
    if dense is None or not len(y):
        return None
    features = keras.Model(model.inputs, dense.input)
    kernel, bias = dense.get_weights()
    logits = _predict(features, pixels).astype(np.float64) @ kernel + bias
    temperature = fit_temperature(logits, y)
    record = {
        "temperature": temperature,
        "validation_loss_before": _cross_entropy(logits, y),
        "validation_loss_after": _cross_entropy(logits / temperature, y),
    }
    if temperature > 1.0:
        dense.set_weights([kernel / temperature, bias / temperature])
        log(
            f"softened the parent's head: temperature {temperature:.3g} fitted on validation (validation loss "
            f"{record['validation_loss_before']:.3g} -> {record['validation_loss_after']:.3g}, same predictions)"
        )
    return record
