"""Every Keras application as a backbone: the table's numbers, the feature network (preprocessing as
layers, safe_mode loading), all-or-nothing weights files, and `bottleneck backbones`."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import warnings

import h5py
import numpy as np
import pytest

from bottleneck.backbones.applications import ARCHITECTURES
from bottleneck.backbones.build import FeatureModel, build_feature_network, build_keras_backbone, preprocessing_layers
from bottleneck.backbones.foundation import FOUNDATION_MODELS
from bottleneck.backbones.spec import DECODE_VERSION, BackboneSpec
from bottleneck.errors import BackboneError

NAMES = sorted(ARCHITECTURES)
SMALL = "mobilenet_v3_small"  # the quickest to build: the weights tests use it

#: Feature networks built once (weights none, each at its minimum size) and shared by the tests.
_NETWORKS: dict = {}


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def network_of(name: str):
    if name not in _NETWORKS:
        _NETWORKS[name] = build_feature_network(
            BackboneSpec(architecture=name, weights="none", image_size=ARCHITECTURES[name].min_size)
        )
    return _NETWORKS[name]


@pytest.fixture(scope="module", autouse=True)
def forget_networks():
    yield
    _NETWORKS.clear()


def test_the_common_applications_are_all_there():
    assert {
        "inception_v3",
        "xception",
        "resnet50",
        "resnet50_v2",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "efficientnet_b1",
        "efficientnet_b2",
        "efficientnet_b3",
        "efficientnet_v2_b0",
        "convnext_tiny",
        "densenet121",
    } <= set(ARCHITECTURES)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_application_gives_its_features_at_its_minimum_size(name):
    import keras
    import tensorflow as tf

    arch = ARCHITECTURES[name]
    network = network_of(name)
    assert network.input.name == "pixels" and tuple(network.input.shape) == (None, arch.min_size, arch.min_size, 3)
    features = network(tf.cast(pixels(2, arch.min_size), tf.float32), training=False).numpy()
    assert features.shape == (2, arch.feature_dim) and np.isfinite(features).all()
    assert network.trainable is False and not network.trainable_weights
    with pytest.raises(ValueError):  # the minimum is Keras' own, not only ours
        getattr(keras.applications, arch.keras_builder)(
            include_top=False, weights=None, input_shape=(arch.min_size - 1, arch.min_size - 1, 3), pooling="avg"
        )
    with pytest.raises(BackboneError, match=f"--image-size must be between {arch.min_size} and 2048 for {name}"):
        BackboneSpec(architecture=name, weights="none", image_size=arch.min_size - 1)


@pytest.mark.slow
def test_feature_model_runs_the_same_network_on_uint8_batches():
    name = "resnet50"  # 'caffe': the preprocessing with weights of its own
    batch = pixels(3, ARCHITECTURES[name].min_size, seed=1)
    model = FeatureModel(BackboneSpec(architecture=name, weights="none", image_size=ARCHITECTURES[name].min_size))
    expected = network_of(name)(batch.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(model(batch), expected, rtol=1e-5, atol=1e-5)
    assert model.model.input.name == "pixels"


def test_fingerprints_differ_between_applications():
    at_minimum = {
        BackboneSpec(architecture=n, weights="none", image_size=ARCHITECTURES[n].min_size).fingerprint() for n in NAMES
    }
    at_one_size = {BackboneSpec(architecture=n, weights="none", image_size=75).fingerprint() for n in NAMES}
    assert len(at_minimum) == len(at_one_size) == len(NAMES)
    assert all(fp.startswith(n) for fp, n in zip(sorted(at_one_size), NAMES))


def test_inception_v3_fingerprint_is_unchanged_so_old_caches_stay_valid():
    assert BackboneSpec().identity() == {
        "architecture": "inception_v3",
        "weights": "imagenet",
        "input_size": 299,
        "pooling": "avg",
        "preprocessing": "inception: x / 127.5 - 1 (RGB)",
        "decode": DECODE_VERSION,
    }


@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_layers_equal_keras_preprocess_input(name):
    import keras

    arch = ARCHITECTURES[name]
    x = np.random.default_rng(2).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    inputs = keras.Input((8, 8, 3))
    outputs = inputs
    for layer in preprocessing_layers(arch.preprocess_mode):
        outputs = layer(outputs)
    ours = keras.Model(inputs, outputs)(x).numpy() if outputs is not inputs else x
    expected = getattr(keras.applications, arch.keras_module).preprocess_input(x.copy())
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_model_file_preprocessing_layers():
    x = np.random.default_rng(3).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    (unit,) = preprocessing_layers("unit")
    np.testing.assert_allclose(unit(x).numpy(), x / 255.0, rtol=0, atol=1e-6)
    assert preprocessing_layers("none") == []


def saved_config_modules(path) -> set[str]:
    """The Python modules a saved .keras file names for its layers."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    return set(re.findall(r'"module": "([^"]+)"', config))


@pytest.mark.slow
def test_feature_networks_load_in_safe_mode_without_this_package(tmp_path):
    import keras

    for name in ["resnet50", SMALL]:  # caffe's fixed Dense; a backbone with its own preprocessing
        size = ARCHITECTURES[name].min_size
        path = tmp_path / f"{name}.keras"
        network_of(name).save(path)
        assert not any(module.startswith("bottleneck") for module in saved_config_modules(path))
        loaded = keras.saving.load_model(path, safe_mode=True)
        x = pixels(2, size).astype(np.float32)
        np.testing.assert_allclose(
            loaded(x, training=False).numpy(), network_of(name)(x, training=False).numpy(), rtol=1e-5, atol=1e-5
        )
    x = np.random.default_rng(4).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    for mode in ["tf", "torch", "unit"]:
        inputs = keras.Input((4, 4, 3), name="pixels")
        outputs = inputs
        for layer in preprocessing_layers(mode):
            outputs = layer(outputs)
        keras.Model(inputs, outputs).save(tmp_path / f"{mode}.keras")
        loaded = keras.saving.load_model(tmp_path / f"{mode}.keras", safe_mode=True)
        np.testing.assert_allclose(loaded(x).numpy(), keras.Model(inputs, outputs)(x).numpy(), rtol=0, atol=1e-6)


# --- weights files: all or nothing -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A no-top MobileNetV3Small saved as .weights.h5, the same truncated, and a MobileNetV3Large's."""
    import keras

    folder = tmp_path_factory.mktemp("weights")
    size = ARCHITECTURES[SMALL].min_size
    keras.utils.set_random_seed(7)
    model = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
    )
    full = folder / "small.weights.h5"
    model.save_weights(full)
    truncated = folder / "truncated.weights.h5"
    shutil.copy(full, truncated)
    with h5py.File(truncated, "a") as handle:
        layers = handle["layers"]
        for name in sorted(layers)[len(layers) // 2 :]:
            del layers[name]
    other = folder / "large.weights.h5"
    keras.applications.MobileNetV3Large(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
    ).save_weights(other)
    return {"full": full, "truncated": truncated, "other": other, "model": model}


def small_spec(weights) -> BackboneSpec:
    return BackboneSpec(architecture=SMALL, weights=str(weights), image_size=ARCHITECTURES[SMALL].min_size)


def test_a_whole_weights_file_loads_silently(small_weights):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        backbone = build_keras_backbone(small_spec(small_weights["full"]))
    for mine, saved in zip(backbone.weights, small_weights["model"].weights):
        np.testing.assert_array_equal(mine.numpy(), saved.numpy())


@pytest.mark.parametrize("which", ["truncated", "other"])
def test_a_weights_file_that_loads_only_partly_is_an_error(small_weights, which):
    path = small_weights[which]
    with pytest.raises(BackboneError) as caught:
        build_keras_backbone(small_spec(path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"weights file {path} does not fit {SMALL} without its top (")
    assert "layers did not load: " in message


def test_a_truncated_legacy_h5_is_an_error(small_weights, tmp_path):
    from keras.src.legacy.saving import legacy_h5_format

    legacy = tmp_path / "truncated.h5"
    with h5py.File(legacy, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, small_weights["model"])
        names = [n.decode() if isinstance(n, bytes) else n for n in handle.attrs["layer_names"]]
        for name in names[len(names) // 2 :]:
            del handle[name]
        handle.attrs["layer_names"] = [n.encode() for n in names[: len(names) // 2]]
    with pytest.raises(BackboneError, match=r"^weights file .*truncated.h5 does not fit .* \(Layer count mismatch"):
        build_keras_backbone(small_spec(legacy))


def test_a_load_keras_only_warns_about_is_an_error_too(small_weights, monkeypatch):
    """Keras 3 leaves some layers "freshly initialized" with only a warning; that must not pass."""
    import keras

    original = keras.Model.load_weights

    def load_then_warn(self, *args, **kwargs):
        original(self, *args, **kwargs)
        warnings.warn(
            "Skipping nested container at 'layers/stem': no matching group found in the saved file. "
            "Affected layers will retain their freshly-initialized weights."
        )

    monkeypatch.setattr(keras.Model, "load_weights", load_then_warn)
    with pytest.raises(
        BackboneError,
        match=r"^weights file .*small.weights.h5 does not fit mobilenet_v3_small without "
        r"its top \(only part of it loaded; Skipping nested container",
    ):
        build_keras_backbone(small_spec(small_weights["full"]))


# --- bottleneck backbones --------------------------------------------------------------------


def test_backbones_command_lists_every_backbone_without_tensorflow(tmp_path):
    home = tmp_path / "keras"
    (home / "models").mkdir(parents=True)
    (home / "models" / ARCHITECTURES["resnet50"].weights_file).write_bytes(b"cached")
    probe = (
        "import argparse, sys\n"
        "from bottleneck.cli import backbones\n"
        "parser = argparse.ArgumentParser(); commands = parser.add_subparsers()\n"
        "backbones.add_parser(commands)\n"
        "args = parser.parse_args(['backbones', '--json'])\n"
        "assert args.handler(args) == 0\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    import os
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KERAS_HOME": str(home)},
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == {*ARCHITECTURES, *FOUNDATION_MODELS, "pixels"}
    assert by_name["resnet50"]["weights_cached"] is True and by_name["xception"]["weights_cached"] is False
    assert by_name["resnet50"]["weights_path"] == str(home / "models" / ARCHITECTURES["resnet50"].weights_file)
    expected = {
        "default_size": 240,
        "min_size": 32,
        "feature_dim": 1280,
        "preprocess_mode": "none",
        "weights_file": "efficientnetb1_notop.h5",
    }
    assert {key: by_name["efficientnet_b1"][key] for key in expected} == expected
    table = done.stderr.splitlines()
    assert table[0].split() == ["backbone", "size", "min", "features", "imagenet", "weights", "preprocessing"]
    assert table[1].split()[:5] == ["inception_v3", "299", "75", "2048", "not"]


def test_backbones_command_prints_a_table(capsys):
    from bottleneck.cli import backbones

    assert backbones.run(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ARCHITECTURES) and "pixels" in out


#: Whose ImageNet weights file name Keras composes in code: ask the builder (one per naming scheme;
#: EfficientNetB1-B3 are named like B0). The others name their file literally in their module.
_COMPOSED_NAMES = [
    "resnet50",
    "resnet50_v2",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_v2_b0",
    "convnext_tiny",
]


@pytest.mark.slow
def test_weights_file_names_are_those_keras_downloads(monkeypatch):
    """Ask builders for their ImageNet weights and stop them at the download, or read the Keras module."""
    import inspect

    import keras
    from keras.src.utils import file_utils

    class Asked(Exception):
        pass

    def get_file(fname=None, *args, **kwargs):
        raise Asked(fname)

    monkeypatch.setattr(file_utils, "get_file", get_file)
    for name in _COMPOSED_NAMES:
        arch = ARCHITECTURES[name]
        builder = getattr(keras.applications, arch.keras_builder)
        with pytest.raises(Asked) as asked, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            builder(include_top=False, weights="imagenet", input_shape=(arch.min_size,) * 2 + (3,), pooling="avg")
        assert str(asked.value) == arch.weights_file, name
    for name in ["inception_v3", "xception", "densenet121"]:
        arch = ARCHITECTURES[name]
        source = inspect.getsource(sys.modules[getattr(keras.applications, arch.keras_builder).__module__])
        assert f'"{arch.weights_file}"' in source, name
    for n in (1, 2, 3):
        assert ARCHITECTURES[f"efficientnet_b{n}"].weights_file == f"efficientnetb{n}_notop.h5"


def test_openvino_conversions_of_an_older_format_are_replaced(tmp_path):
    """Conversions made before the preprocessing was in the network expect other input: convert again."""
    from bottleneck.backbones.openvino import FORMAT, FORMAT_FILE, _replace_folder, is_current_conversion

    def folder(name: str, text: str, current: bool = True):
        path = tmp_path / name
        path.mkdir()
        (path / "model.xml").write_text(text)
        if current:
            (path / FORMAT_FILE).write_text(FORMAT)
        return path

    target = folder("net.openvino", "old", current=False)
    assert not is_current_conversion(target)
    _replace_folder(folder(".staging", "new"), target)
    assert is_current_conversion(target) and (target / "model.xml").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["net.openvino"]
    _replace_folder(folder(".late", "newer"), target)  # another process converted first: keep its result
    assert (target / "model.xml").read_text() == "new"
