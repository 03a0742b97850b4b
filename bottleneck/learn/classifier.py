"""The whole classifier of a run as one Keras model: RGB pixels in, class probabilities out.

The backbone's feature network (preprocessing included) is followed by the run's head as
built-in Keras layers only, so the model saves to `.keras` and loads with `safe_mode=True`
without this package. A logistic-regression head becomes one Dense softmax layer (multi-label: one
Dense sigmoid layer, a probability per label) with the standardisation folded into its weights; a
Keras head is nested as it was trained.
"""

from __future__ import annotations

import numpy as np

from bottleneck.backbones.build import build_feature_network, import_tensorflow
from bottleneck.learn.run_folder import LoadedRun

#: Names the exported models use for their input and output.
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"


def head_layers(run: LoadedRun, features):
    """The run's head applied to the symbolic `features`; returns the probabilities tensor."""
    if run.config.get("head") == "knn":
        from bottleneck.errors import BottleneckError

        raise BottleneckError(
            f"{run.folder} has a knn head, which has no Keras form yet (it keeps every training "
            "row), so it is not exported or fine-tuned: train a logreg or keras head for that; `predict` takes this run"
        )
    _, keras = import_tensorflow()
    if run.config.get("head") == "logreg":
        from bottleneck.learn.head_file import load_head

        arrays = load_head(run.folder / run.config["model"])
        kernel, bias = arrays.as_dense()
        dense = keras.layers.Dense(len(bias), activation=arrays.kind, name=OUTPUT_NAME)
        outputs = dense(features)
        dense.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        return outputs
    head = keras.saving.load_model(run.folder / run.config["model"], compile=False, safe_mode=True)
    head.name = "head"
    return keras.layers.Identity(name=OUTPUT_NAME)(head(features))


def build_classifier(run: LoadedRun):
    """The run's whole network: float32 (n, size, size, 3) RGB 0-255 pixels -> (n, classes) probabilities."""
    _, keras = import_tensorflow()
    if run.fine_tuned:
        return keras.saving.load_model(run.folder / run.config["model"], compile=False, safe_mode=True)
    size = run.spec.input_size
    inputs = keras.Input((size, size, 3), dtype="float32", name=INPUT_NAME)
    features = build_feature_network(run.spec)(inputs)
    return keras.Model(inputs, head_layers(run, features), name="bottleneck_classifier")
