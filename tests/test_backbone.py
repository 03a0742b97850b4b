"""Backbone specs, fingerprints, and the three ways to get weights (imagenet, none, a file)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bottleneck.backbones.build import FeatureModel, build_keras_backbone
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import BackboneError

from .conftest import TEST_SIZE


def random_batch(n: int = 2, size: int = TEST_SIZE) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """A no-top InceptionV3 saved both ways Keras reads: `.weights.h5` and the legacy `.h5`."""
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    folder = tmp_path_factory.mktemp("weights")
    keras.utils.set_random_seed(123)
    model = keras.applications.InceptionV3(
        include_top=False, weights=None, input_shape=(TEST_SIZE, TEST_SIZE, 3), pooling="avg"
    )
    modern = folder / "mine.weights.h5"
    model.save_weights(modern)
    legacy = folder / "inception_v3_notop.h5"
    with h5py.File(legacy, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    x = keras.applications.inception_v3.preprocess_input(random_batch().astype("float32"))
    return modern, legacy, model.predict(x, verbose=0)


def test_fingerprint_names_the_exact_backbone(tmp_path):
    # The fingerprint hashes a weights file's bytes, so two files of different bytes stand for two trained networks.
    modern, legacy = tmp_path / "mine.weights.h5", tmp_path / "inception_v3_notop.h5"
    modern.write_bytes(b"weights of one training")
    legacy.write_bytes(b"weights of another")
    base = BackboneSpec(weights="none", image_size=TEST_SIZE)
    assert base.fingerprint() == BackboneSpec(weights="none", image_size=TEST_SIZE).fingerprint()
    assert base.fingerprint().startswith("inception_v3-75-none-")
    others = {
        BackboneSpec(weights="none").fingerprint(),
        BackboneSpec(weights="imagenet", image_size=TEST_SIZE).fingerprint(),
        BackboneSpec(weights=str(modern), image_size=TEST_SIZE).fingerprint(),
        BackboneSpec(weights=str(legacy), image_size=TEST_SIZE).fingerprint(),
    }
    assert len(others | {base.fingerprint()}) == 5
    copy = tmp_path / "copy.weights.h5"
    copy.write_bytes(modern.read_bytes())
    assert (
        BackboneSpec(weights=str(copy), image_size=TEST_SIZE).fingerprint()
        == BackboneSpec(weights=str(modern), image_size=TEST_SIZE).fingerprint()
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 50}, "--image-size must be between 75 and 2048 for inception_v3; got 50"),
        (
            {"weights": "/nowhere/w.h5"},
            "weights file not found: /nowhere/w.h5 (use --weights imagenet, none, or a path)",
        ),
        (
            {"architecture": "vgg99"},
            "unknown backbone 'vgg99'; choose one of: inception_v3, xception, resnet50, "
            "resnet50_v2, mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, efficientnet_b0, efficientnet_b1, "
            "efficientnet_b2, efficientnet_b3, efficientnet_v2_b0, convnext_tiny, densenet121, dinov2_small, "
            "dinov2_base, dinov2_large, dinov2_reg_small, dinov2_reg_base, clip_vit_b16, clip_vit_b32, siglip2_b16, "
            "vit_b16, pixels, "
            "or a path to a .keras model file",
        ),
    ],
)
def test_bad_specs_are_refused_before_tensorflow_loads(kwargs, message):
    with pytest.raises(BackboneError) as caught:
        BackboneSpec(**kwargs)
    assert str(caught.value) == message


@pytest.mark.slow
def test_random_weights_are_the_same_network_every_time():
    spec = BackboneSpec(weights="none", image_size=TEST_SIZE)
    first, second = FeatureModel(spec), FeatureModel(spec)
    np.testing.assert_array_equal(first(random_batch()), second(random_batch()))


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1], ids=["weights.h5", "legacy-h5"])
def test_weights_file_is_loaded(weights_files, which):
    path, expected = weights_files[which], weights_files[2]
    features = FeatureModel(BackboneSpec(weights=str(path), image_size=TEST_SIZE))(random_batch())
    assert features.shape == (2, 2048) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)


def test_weights_file_of_another_network_is_a_clear_error(tmp_path):
    wrong = tmp_path / "wrong.weights.h5"
    import keras

    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(wrong)
    with pytest.raises(
        BackboneError, match=r"^weights file .*wrong.weights.h5 does not fit inception_v3 without its top \("
    ):
        build_keras_backbone(BackboneSpec(weights=str(wrong), image_size=TEST_SIZE))


def test_garbage_weights_file_is_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_text("not hdf5")
    with pytest.raises(BackboneError, match="does not fit inception_v3 without its top"):
        build_keras_backbone(BackboneSpec(weights=str(garbage), image_size=TEST_SIZE))


@pytest.mark.slow
def test_imagenet_download_failure_says_what_to_do(monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.inception_v3.file_utils.get_file", offline)
    with pytest.raises(BackboneError, match=r"Offline\? Pass --weights PATH .* or --weights none"):
        build_keras_backbone(BackboneSpec(weights="imagenet", image_size=TEST_SIZE))
