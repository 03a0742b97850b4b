"""Your own base: `pretrain`, a .keras file cut at a layer as the backbone, the pixels baseline, `compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.errors import BackboneError
from bottleneck.features.extract import extract_features, open_store
from bottleneck.features.hashing import HashIndex, sha256_file
from bottleneck.learn.pretrain import PretrainConfig, pretrain

from .conftest import make_dataset

TINY = PretrainConfig(image_size=16, blocks=2, filters=4, epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    make_dataset(root / "source", per_class=6)
    make_dataset(root / "target", per_class=4, classes={"cyan": (0, 200, 200), "pink": (230, 120, 160)})
    result = pretrain(root / "source", root / "base.keras", TINY)
    return root, result


def test_pretrain_saves_a_keras_model_naming_its_feature_layer(base):
    root, result = base
    assert result.path == root / "base.keras" and result.layer == "features"
    assert result.classes == ["blue", "green", "red"] and result.epochs_run == 2
    assert json.loads((root / "base.keras.labels.json").read_text()) == ["blue", "green", "red"]


def test_features_of_own_model_match_keras_directly(base):
    import keras

    root, result = base
    spec = BackboneSpec(architecture=str(result.path), layer="features")
    assert spec.input_size == 16 and spec.fingerprint().startswith("base-16-features-")
    extracted = extract_features(root / "target", root / "cache", spec)
    assert extracted.computed == 8
    contents = open_store(root / "cache", spec, HashIndex(root / "cache")).load()
    assert contents.features.shape == (8, 8)  # 4 filters doubled once, pooled
    paths = sorted((root / "target").rglob("*.png"))
    model = keras.saving.load_model(result.path)
    cut = keras.Model(model.inputs, model.get_layer("features").output)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.BILINEAR)) for p in paths])
    expected = cut.predict(pixels.astype("float32"), verbose=0)
    rows = contents.rows_by_hash()
    np.testing.assert_allclose(contents.features[[rows[sha256_file(p)] for p in paths]], expected, rtol=1e-4, atol=1e-5)


def test_spatial_layer_is_pooled_and_a_retrained_model_never_reuses_features(base, tmp_path):
    root, result = base
    spatial = BackboneSpec(architecture=str(result.path), layer="relu1")
    assert extract_features(root / "target", tmp_path / "cache", spatial).computed == 8
    retrained = pretrain(root / "source", tmp_path / "base.keras", PretrainConfig(**{**TINY.__dict__, "seed": 5}))
    other = BackboneSpec(architecture=str(retrained.path), layer="relu1")
    assert other.fingerprint() != spatial.fingerprint()
    (tmp_path / "moved.keras").write_bytes(result.path.read_bytes())
    moved = BackboneSpec(architecture=str(tmp_path / "moved.keras"), layer="relu1")
    assert moved.fingerprint().split("-")[-1] == spatial.fingerprint().split("-")[-1]  # content, not path


def test_model_file_errors_are_one_line(base, tmp_path):
    root, result = base
    with pytest.raises(BackboneError, match=r"^layer 'featurs' is not in .*base.keras; nearest names: features"):
        BackboneSpec(architecture=str(result.path), layer="featurs")
    not_model = tmp_path / "photo.keras"
    not_model.write_bytes(b"\x89PNG not a model")
    with pytest.raises(
        BackboneError, match=r"^.*photo.keras is not a Keras model file \(.keras, as saved by model.save\)$"
    ):
        BackboneSpec(architecture=str(not_model), layer="x")
    with pytest.raises(BackboneError, match=r"^--layer is needed with a model file"):
        BackboneSpec(architecture=str(result.path))


def test_safe_mode_refuses_code_in_a_model_file(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Lambda(lambda x: x * 2, name="doubled")(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    from bottleneck.backbones.build import build_file_backbone

    with pytest.raises(BackboneError, match=r"^cannot load .*lambda.keras as a Keras model"):
        build_file_backbone(BackboneSpec(architecture=str(path), layer="doubled"))


def test_pixels_backbone_is_the_resized_image(tmp_path):
    make_dataset(tmp_path / "data", per_class=2)
    spec = BackboneSpec(architecture="pixels", image_size=8)
    extract_features(tmp_path / "data", tmp_path / "cache", spec)
    contents = open_store(tmp_path / "cache", spec, HashIndex(tmp_path / "cache")).load()
    path = sorted((tmp_path / "data").rglob("*.png"))[0]
    expected = np.asarray(Image.open(path).convert("RGB").resize((8, 8), Image.BILINEAR)).reshape(-1) / 255.0
    np.testing.assert_allclose(contents.features[contents.rows_by_hash()[sha256_file(path)]], expected, atol=1e-6)


def test_compare_command_reports_distances(base, capsys):
    root, result = base
    argv = ["--cache", str(root / "cache"), "--backbone", str(result.path), "--layer", "features"]
    assert main(["features", str(root / "source"), *argv, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(root / "source"), str(root / "target"), *argv, "--permutations", "50", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["images_a"] == 18 and figures["images_b"] == 8
    assert figures["frechet_distance"] >= 0 and 0 < figures["mmd_p_value"] <= 1


def test_pretrain_cli_with_zero_epochs_saves_the_untrained_network(base, tmp_path, capsys):
    root, _ = base
    code = main(
        [
            "pretrain",
            "--data",
            str(root / "source"),
            "--out",
            str(tmp_path / "random.keras"),
            "--epochs",
            "0",
            "--image-size",
            "16",
            "--blocks",
            "2",
            "--filters",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "0 epochs" in out and "--layer features" in out
    spec = BackboneSpec(architecture=str(tmp_path / "random.keras"), layer="features")
    assert not spec.pretrained and "saved untrained" in spec.random_weights_warning
    assert BackboneSpec(architecture=str(root / "base.keras"), layer="features").pretrained
    result = extract_features(root / "target", tmp_path / "cache", spec)
    assert not result.pretrained and result.warning.startswith("RANDOM WEIGHTS")


def test_a_model_file_with_a_nan_weight_stores_no_features_and_says_why(tmp_path, capsys):
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    kernel, bias = model.get_layer("conv").get_weights()
    kernel[0, 0, 0, 0] = np.nan  # one damaged weight
    model.get_layer("conv").set_weights([kernel, bias])
    model.save(tmp_path / "nan.keras")
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=2)
    assert (
        main(
            [
                "features",
                str(data),
                "--cache",
                str(cache),
                "--backbone",
                str(tmp_path / "nan.keras"),
                "--layer",
                "features",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no image could be used: all 6 failed" in err and "non-finite features (NaN or infinity)" in err
    store = open_store(
        cache, BackboneSpec(architecture=str(tmp_path / "nan.keras"), layer="features"), HashIndex(cache)
    )
    contents = store.load()
    assert contents.content_hash == [] and len(contents.failures) == 6


def test_augmented_views_from_a_nan_weight_are_not_stored(tmp_path):
    import keras

    from bottleneck.features.augment import compute_views, views_held
    from bottleneck.features.discover import discover_images
    from bottleneck.learn.dataset import content_hashes

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="features")(x))
    model.save(tmp_path / "good.keras")
    kernel, bias = model.get_layer("conv").get_weights()
    kernel[0, 0, 0, 0] = np.nan
    model.get_layer("conv").set_weights([kernel, bias])
    model.save(tmp_path / "nan.keras")
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=2)
    plain_spec = BackboneSpec(architecture=str(tmp_path / "good.keras"), layer="features")
    extract_features(data, cache, plain_spec)  # plain rows of the same width to hang the views on
    plain = open_store(cache, plain_spec, HashIndex(cache))
    images = discover_images(data).images
    hashes = content_hashes(data, cache, [image.relpath for image in images])
    said: list[str] = []
    nan_spec = BackboneSpec(architecture=str(tmp_path / "nan.keras"), layer="features")
    made = compute_views(list(zip((str(im.path) for im in images), hashes)), cache, nan_spec, plain, 2, log=said.append)
    assert made.computed == 0
    assert any("non-finite features (NaN or infinity) for 12 views; they are not stored" in line for line in said), said
    from bottleneck.features.maintenance import store_of

    assert (
        views_held(store_of(cache, made.store.stem)) == 2
        and store_of(cache, made.store.stem).index().content_hash == []
    )
