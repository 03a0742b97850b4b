"""Foundation-model backbones (KerasHub): specs, fingerprints, preset folders, features, heads and predict.

The table and the fingerprint are plain data and tested without KerasHub; building needs the opt-in
keras-hub install (`make hub`), and those tests say they were skipped without it. Networks are tiny
configurations written as local preset folders (`save_to_preset`), the way a downloaded preset is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from bottleneck.backbones.foundation import CLIP_MEAN_RGB, CLIP_STD_RGB, FOUNDATION_MODELS
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.errors import BackboneError
from tests.conftest import make_dataset

# Nothing here downloads; offline, Hugging Face's hub client would otherwise wait on the network (~100 s measured).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NO_TORCH = "PyTorch is an optional extra: make test installs it unless WITH_TORCH= is empty"
SIZE = 28  # two 14-pixel patches a side for DINOv2; CLIP, SigLIP and ViT use 14-pixel patches too here

# DINOv2's preset is trained at 42 px (a 3x3 patch grid) and used at 28 (2x2), so its position table is resized
# as the real presets' (518 px -> the input's grid) are: on every backend by TensorFlow's bicubic (PyTorch's own
# differed by 2.2e-3 of the spread).
TINY_LAYERS = dict(patch_size=14, num_layers=2, hidden_dim=32, num_heads=2)
TINY = {
    "dinov2": ("DINOV2Backbone", dict(TINY_LAYERS, intermediate_dim=64, position_embedding_shape=(42, 42, 3))),
    "clip": ("CLIPVisionEncoder", dict(TINY_LAYERS, intermediate_dim=64)),
    "siglip": ("SigLIPVisionEncoder", dict(TINY_LAYERS, intermediate_dim=64)),
    "vit": ("ViTBackbone", dict(TINY_LAYERS, mlp_dim=64)),
}


def write_preset(folder: Path, family: str, seed: int = 1, registers: int = 0) -> Path:
    """A tiny preset folder of `family` with random weights, as `Backbone.save_to_preset` writes it."""
    keras_hub = pytest.importorskip("keras_hub")
    import keras

    keras.utils.set_random_seed(seed)
    class_name, config = TINY[family]
    if registers:
        config = {**config, "num_register_tokens": registers}
    model = getattr(keras_hub.models, class_name)(**config, image_shape=(SIZE, SIZE, 3))
    for variable in model.weights:  # numbered, as in KerasHub's own CLIP presets (a fresh CLIP leaves them 0)
        if variable.path.endswith("position_ids"):
            variable.assign(np.arange(variable.shape[1]).reshape(variable.shape))
    model.save_to_preset(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------
# Plain data: no KerasHub needed


def fake_preset(folder: Path, class_name: str = "DINOV2Backbone", hidden: int = 32, weights: bytes = b"w") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "class_name": class_name,
                "config": {"hidden_dim": hidden, "image_shape": [SIZE, SIZE, 3], "patch_size": 14},
            }
        )
    )
    (folder / "model.weights.h5").write_bytes(weights)
    return folder


def test_defaults_are_pretrained_and_the_models_own_pooling():
    dino = BackboneSpec("dinov2_small")  # the flags' defaults: weights imagenet, pooling avg
    assert (dino.weights, dino.pooling, dino.input_size, dino.feature_dim, dino.kind) == (
        "hub",
        "cls",
        224,
        384,
        "foundation",
    )
    assert dino.pretrained and dino.preprocessing.startswith("torch: x / 255")
    assert BackboneSpec("siglip2_b16").pooling == "pooled"
    assert not BackboneSpec("vit_b16", weights="none").pretrained
    assert "clip:" in BackboneSpec("clip_vit_b32").preprocessing


def test_stores_never_mix(tmp_path):
    one, other = fake_preset(tmp_path / "one"), fake_preset(tmp_path / "other", weights=b"other weights")
    specs = [
        BackboneSpec("dinov2_small", weights=w, pooling=p, image_size=SIZE)
        for w in ("none", "hub", str(one), str(other))
        for p in ("cls", "mean")
    ]
    specs += [
        BackboneSpec("dinov2_base", weights="none", image_size=SIZE),
        BackboneSpec("dinov2_reg_small", weights="none", image_size=SIZE),
        BackboneSpec("vit_b16", weights="none", image_size=32),
        BackboneSpec("dinov2_small", weights="none", image_size=2 * SIZE),
    ]
    fingerprints = [spec.fingerprint() for spec in specs]
    assert len(set(fingerprints)) == len(specs)
    assert fingerprints[4].startswith("dinov2_small-28-preset-cls-")
    before = BackboneSpec("dinov2_small", weights=str(one)).fingerprint()
    (one / "metadata.json").write_text("{}")  # any file of the preset is covered
    assert BackboneSpec("dinov2_small", weights=str(one)).fingerprint() != before


def test_hugging_face_snapshots_of_other_models_are_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "hidden_size": 32}))
    with pytest.raises(BackboneError, match="a Hugging Face snapshot of a 'clip' model; KerasHub converts dinov2"):
        BackboneSpec("clip_vit_b16", weights=str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "vit", "hidden_size": 48, "image_size": 28, "patch_size": 14})
    )
    with pytest.raises(BackboneError, match="holds a vit snapshot, not a dinov2 model"):
        BackboneSpec("dinov2_small", weights=str(tmp_path))
    with pytest.raises(BackboneError, match="has no .safetensors weights"):
        BackboneSpec("vit_b16", weights=str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert BackboneSpec("vit_b16", weights=str(tmp_path)).feature_dim == 48


def test_a_store_and_a_run_record_rebuild_the_same_backbone(tmp_path):
    from bottleneck.backbones.spec import spec_from_record, spec_from_store_attrs, spec_record
    from bottleneck.features.extract import store_attrs

    spec = BackboneSpec("dinov2_small", weights=str(fake_preset(tmp_path / "one")), pooling="mean")
    attrs = store_attrs(spec, spec.weights_id(), 32)
    assert spec_from_store_attrs(attrs).fingerprint() == spec.fingerprint()
    assert spec_from_record(json.loads(json.dumps(spec_record(spec)))).fingerprint() == spec.fingerprint()


def test_bad_choices_are_one_line(tmp_path):
    with pytest.raises(BackboneError, match="--pooling pooled does not fit dinov2_small"):
        BackboneSpec("dinov2_small", pooling="pooled")
    with pytest.raises(BackboneError, match="multiple of dinov2_small's patch size 14"):
        BackboneSpec("dinov2_small", weights="none", image_size=30)
    with pytest.raises(BackboneError, match="not a KerasHub preset folder"):
        BackboneSpec("dinov2_small", weights=str(tmp_path))
    with pytest.raises(BackboneError, match="holds a CLIPVisionEncoder, not a dinov2 model"):
        BackboneSpec("dinov2_small", weights=str(fake_preset(tmp_path / "clip", "CLIPVisionEncoder")))
    clip = BackboneSpec("clip_vit_b16", weights=str(fake_preset(tmp_path / "clip2", "CLIPVisionEncoder", hidden=48)))
    assert (clip.feature_dim, clip.input_size) == (48, SIZE)
    with pytest.raises(BackboneError, match="clip_vit_b16 takes 28x28 images with these weights"):
        BackboneSpec("clip_vit_b16", weights=clip.weights, image_size=2 * SIZE)
    with pytest.raises(BackboneError, match="vit_b16 takes 224x224 images with these weights"):
        BackboneSpec("vit_b16", image_size=112)
    assert (
        BackboneSpec("dinov2_small", weights=str(fake_preset(tmp_path / "one")), image_size=2 * SIZE).input_size
        == 2 * SIZE
    )


@pytest.mark.parametrize("side,grid", [(37, (16, 16)), (37, (23, 19)), (37, (48, 64)), (3, (2, 2)), (5, (5, 5))])
def test_position_tables_resize_as_tensorflow_resizes_them(side, grid):
    import tensorflow as tf

    from bottleneck.backbones.foundation import resize_position_table

    table = np.random.default_rng(side).normal(size=(1, 1 + side * side, 8)).astype(np.float32)
    expected = tf.image.resize(table[:, 1:].reshape(1, side, side, 8), grid, method="bicubic", antialias=False)
    ours = resize_position_table(table, grid)
    assert ours.shape == (1, 1 + grid[0] * grid[1], 8)
    np.testing.assert_array_equal(ours[:, 0], table[:, 0])  # the class token's position is kept
    np.testing.assert_allclose(ours[0, 1:], expected.numpy().reshape(-1, 8), atol=2e-6)


def test_backbones_lists_them(capsys):
    assert main(["backbones", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out.splitlines()[-1])}
    assert set(FOUNDATION_MODELS) <= set(rows)
    assert rows["dinov2_small"]["pooling"] == ["cls", "mean"] and rows["siglip2_b16"]["pooling"] == ["pooled"]
    assert rows["clip_vit_b16"]["licence"] == "MIT" and rows["dinov2_base"]["feature_dim"] == 768


def test_missing_keras_hub_is_one_line(monkeypatch):
    from bottleneck.backbones.build import import_keras_hub

    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub now raises ImportError
    with pytest.raises(BackboneError, match=r"need KerasHub .*pip install --no-deps 'keras-hub>=0.32' \(or `make hub`"):
        import_keras_hub()


# ---------------------------------------------------------------------------------------------
# Built with KerasHub


def features_of(spec: BackboneSpec, pixels: np.ndarray) -> np.ndarray:
    from bottleneck.backbones.build import build_feature_network

    return np.asarray(build_feature_network(spec)(pixels))


def reference_tokens(folder: Path, pixels: np.ndarray, mean, std) -> np.ndarray:
    """The preset's own output on pixels normalized by hand."""
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(folder))
    normalized = (pixels / 255.0 - np.asarray(mean)) / np.asarray(std)
    inputs = {"images": normalized} if isinstance(backbone.input, dict) else normalized
    return np.asarray(backbone(inputs))


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")


def test_dinov2_pooling_and_preprocessing_match_the_preset(tmp_path, pixels):
    folder = write_preset(tmp_path / "dino", "dinov2", registers=2)
    tokens = reference_tokens(folder, pixels, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert tokens.shape == (3, 1 + 2 + 4, 32)
    cls = features_of(BackboneSpec("dinov2_reg_small", weights=str(folder)), pixels)
    mean = features_of(BackboneSpec("dinov2_reg_small", weights=str(folder), pooling="mean"), pixels)
    np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-5)
    np.testing.assert_allclose(mean, tokens[:, 3:].mean(axis=1), atol=1e-5)  # registers left out


@pytest.mark.parametrize(
    "family,name,mean,std",
    [
        ("clip", "clip_vit_b16", CLIP_MEAN_RGB, CLIP_STD_RGB),
        ("siglip", "siglip2_b16", (0.5,) * 3, (0.5,) * 3),
        ("vit", "vit_b16", (0.5,) * 3, (0.5,) * 3),
    ],
)
def test_each_family_matches_its_preset(tmp_path, pixels, family, name, mean, std):
    folder = write_preset(tmp_path / family, family)
    tokens = reference_tokens(folder, pixels, mean, std)
    features = features_of(BackboneSpec(name, weights=str(folder)), pixels)
    expected = tokens if tokens.ndim == 2 else tokens[:, 0]  # SigLIP: its pooled output; the others: the class token
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert features.shape == (3, 32)


def test_random_weights_build_the_rows_configuration(pixels):
    pytest.importorskip("keras_hub")
    spec = BackboneSpec("dinov2_small", weights="none", image_size=SIZE)
    first, again = features_of(spec, pixels), features_of(spec, pixels)
    assert first.shape == (3, 384) and np.array_equal(first, again)  # seeded: the same network each time
    assert np.std(first) > 0


def test_a_preset_folder_with_missing_weights_is_one_line(tmp_path):
    folder = write_preset(tmp_path / "dino", "dinov2")
    other = write_preset(tmp_path / "bigger", "dinov2")
    config = json.loads((other / "config.json").read_text())
    config["config"]["num_layers"] = 3  # a third block the weights file does not hold
    (other / "config.json").write_text(json.dumps(config))
    from bottleneck.backbones.build import build_feature_network

    with pytest.raises(BackboneError, match=f"{other}"):
        build_feature_network(BackboneSpec("dinov2_small", weights=str(other)))
    assert build_feature_network(BackboneSpec("dinov2_small", weights=str(folder))) is not None


def test_hub_offline_is_one_line():
    pytest.importorskip("keras_hub")
    from bottleneck.backbones.build import build_feature_network

    with pytest.raises(BackboneError, match="could not get the KerasHub preset dinov2_small .*--weights DIR"):
        build_feature_network(BackboneSpec("dinov2_small", weights="hub", image_size=SIZE))


@pytest.mark.slow
def test_features_train_head_predict(tmp_path):
    folder = write_preset(tmp_path / "dino", "dinov2")
    data = tmp_path / "data"
    make_dataset(data, per_class=3)
    flags = ["--backbone", "dinov2_small", "--weights", str(folder), "--pooling", "mean", "--runtime", "keras"]
    assert main(["features", str(data), "--cache", str(tmp_path / "cache"), *flags, "--no-progress"]) == 0
    (store,) = (tmp_path / "cache").glob("*.h5")
    assert store.name.startswith("dinov2_small-28-preset-mean-")
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(tmp_path / "cache"),
                *flags[:-2],
                "--runs",
                str(tmp_path / "runs"),
                "--head",
                "keras",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "config.json").read_text())["backbone"]["pooling"] == "mean"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(
                ["predict", "--run", str(run), str(data), "--json", "--cache", str(tmp_path / "cache"), "--no-progress"]
            )
            == 0
        )
    rows = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith('{"path"')]
    assert len(rows) == len(list(data.rglob("*.png")))
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 1  # predict read the same store
    # export (the .keras file and the SavedModel, each checked against predict) and fine-tune take it as it is
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exported"), "--no-progress"]) == 0
    assert (tmp_path / "exported" / "model.keras").is_file() and (tmp_path / "exported" / "saved_model").is_dir()
    assert main(["fine-tune", "--run", str(run), "--epochs", "1", "--unfreeze", "2"]) == 0
    (folder / "metadata.json").write_text("{}")  # the preset changed since the head was trained
    assert main(["predict", "--run", str(run), str(data), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 2


# ---------------------------------------------------------------------------------------------
# Every backend: the same features from one preset folder, into one store

NAMES = {"dinov2": "dinov2_small", "clip": "clip_vit_b16", "siglip": "siglip2_b16", "vit": "vit_b16"}


@pytest.fixture(scope="module")
def on_tensorflow(tmp_path_factory) -> Path:
    """A preset folder of each family, 6 images, and TensorFlow's features of them (`tf-<family>` caches)."""
    root = tmp_path_factory.mktemp("foundation-backends")
    make_dataset(root / "data", per_class=2)
    for family, name in NAMES.items():
        write_preset(root / family, family, seed=len(family))
        assert (
            main(
                [
                    "features",
                    str(root / "data"),
                    "--cache",
                    str(root / f"tf-{family}"),
                    "--backbone",
                    name,
                    "--weights",
                    str(root / family),
                    "--runtime",
                    "keras",
                    "--no-progress",
                ]
            )
            == 0
        )
    return root


def store_rows(cache: Path) -> tuple[str, np.ndarray]:
    import h5py

    (path,) = cache.glob("*.h5")
    with h5py.File(path, "r") as handle:
        order = np.argsort(handle["content_hash"][()])
        return path.name, handle["features"][()][order]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_every_backend_computes_tensorflows_features(backend, on_tensorflow):
    import importlib.util
    import os
    import subprocess

    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is an optional extra")
    root = on_tensorflow
    calls = [
        [
            "features",
            str(root / "data"),
            "--cache",
            str(root / f"{backend}-{family}"),
            "--backbone",
            name,
            "--weights",
            str(root / family),
            "--backend",
            backend,
            "--no-progress",
        ]
        for family, name in NAMES.items()
    ]
    script = f"import sys; from bottleneck.cli import main\nsys.exit(max(main(argv) for argv in {calls!r}))\n"
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for family in NAMES:
        name, reference = store_rows(root / f"tf-{family}")
        other_name, other = store_rows(root / f"{backend}-{family}")
        assert other_name == name  # one fingerprint: backends share a cache
        spread = np.median(np.linalg.norm(reference - reference.mean(0), axis=1))
        assert np.linalg.norm(reference - other, axis=1).max() / spread < 1e-4, family


@pytest.mark.slow
def test_cpu_precisions_compute_dinov2_features_near_float32(on_tensorflow, capsys):
    from bottleneck.backbones.openvino import cpu_capabilities

    root = on_tensorflow
    _, reference = store_rows(root / "tf-dinov2")
    spread = np.median(np.linalg.norm(reference - reference.mean(0), axis=1))
    # Measured on this tiny random DINOv2 (6 images, int8 calibrated on the same 6): bf16 1.0e-2 of the spread,
    # int8 0.31 (random weights quantize poorly; the demo's trained network: bench-precision).
    for precision, within in (("bf16", 0.03), ("int8", 0.5)):
        cache = root / f"{precision}-dinov2"
        code = main(
            [
                "features",
                str(root / "data"),
                "--cache",
                str(cache),
                "--backbone",
                "dinov2_small",
                "--weights",
                str(root / "dinov2"),
                "--precision",
                precision,
                "--no-progress",
            ]
        )
        if precision == "bf16" and "BF16" not in cpu_capabilities():
            assert code == 2 and "no bfloat16 instructions" in capsys.readouterr().err
            continue
        assert code == 0, capsys.readouterr().err
        name, rows = store_rows(cache)
        assert f"-{precision}-" in name  # a store of its own
        assert np.linalg.norm(rows - reference, axis=1).max() / spread < within, precision


# ---------------------------------------------------------------------------------------------
# Parity with Hugging Face transformers: the same random weights, converted by KerasHub from a snapshot


def hugging_face_parity(tmp_path, family: str, pixels: np.ndarray) -> dict[str, float]:
    """Our features against transformers' own outputs, relative to the spread, per pooling."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    keras_hub = pytest.importorskip("keras_hub")

    torch.manual_seed(0)
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=SIZE)
    if family == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**tiny, mlp_ratio=2)).eval()
        model.save_pretrained(tmp_path / "hf")
        normalized = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        name, loader = "dinov2_small", keras_hub.models.DINOV2Backbone
    else:
        # KerasHub's ViT conversion keeps its own layer-norm epsilon (1e-6), not the snapshot's (1e-12 in
        # google/vit-*): with 1e-12 the class token was measured 3.2e-3 of the spread away; here both use 1e-6.
        config = transformers.ViTConfig(**tiny, intermediate_size=64, layer_norm_eps=1e-6)
        whole = transformers.ViTForImageClassification(config).eval()  # KerasHub reads the `vit.` weights
        whole.save_pretrained(tmp_path / "hf")
        model, normalized = whole.vit, pixels / 127.5 - 1
        name, loader = "vit_b16", keras_hub.models.ViTBackbone
    loader.from_preset(str(tmp_path / "hf")).save_to_preset(str(tmp_path / "keras"))  # KerasHub's conversion
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(normalized.transpose(0, 3, 1, 2), dtype=torch.float32))
    tokens = out.last_hidden_state.numpy()  # after the final layer norm in both
    reference = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(axis=1)}
    if family == "dinov2":
        np.testing.assert_array_equal(reference["cls"], out.pooler_output.numpy())
    gaps = {}
    for folder in ("keras", "hf"):  # the converted preset, and the snapshot itself as --weights
        for pooling, expected in reference.items():
            ours = features_of(BackboneSpec(name, weights=str(tmp_path / folder), pooling=pooling), pixels)
            spread = np.median(np.linalg.norm(expected - expected.mean(0), axis=1))
            gaps[f"{folder} {pooling}"] = float(np.linalg.norm(ours - expected, axis=1).max() / spread)
    return gaps


def clip_from_transformers(model, folder: Path) -> None:
    """Save transformers' CLIPVisionModel `model` as a KerasHub CLIPVisionEncoder preset (KerasHub has no CLIP
    converter): the same weights, laid out as Keras keeps them."""
    import keras_hub

    config = model.config
    heads, width = config.num_attention_heads, config.hidden_size
    encoder = keras_hub.models.CLIPVisionEncoder(
        patch_size=config.patch_size,
        hidden_dim=width,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        intermediate_dim=config.intermediate_size,
        image_shape=(config.image_size, config.image_size, 3),
    )
    vision = getattr(model, "vision_model", model)  # transformers 5 keeps the layers on the model itself
    state = {key: value.numpy() for key, value in vision.state_dict().items()}
    values = {
        "embedding/class_embedding": state["embeddings.class_embedding"],
        "embedding/patch_embedding/kernel": state["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "embedding/position_embedding/embeddings": state["embeddings.position_embedding.weight"],
        "pre_layer_norm/gamma": state["pre_layrnorm.weight"],
        "pre_layer_norm/beta": state["pre_layrnorm.bias"],
        "layer_norm/gamma": state["post_layernorm.weight"],
        "layer_norm/beta": state["post_layernorm.bias"],
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"encoder_block_{i}/", f"encoder.layers.{i}."
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            values[f"{ours}attention/{name}/kernel"] = state[f"{theirs}self_attn.{proj}.weight"].T.reshape(
                width, heads, -1
            )
            values[f"{ours}attention/{name}/bias"] = state[f"{theirs}self_attn.{proj}.bias"].reshape(heads, -1)
        values[f"{ours}attention/attention_output/kernel"] = state[f"{theirs}self_attn.out_proj.weight"].T.reshape(
            heads, -1, width
        )
        values[f"{ours}attention/attention_output/bias"] = state[f"{theirs}self_attn.out_proj.bias"]
        for n in (1, 2):
            values[f"{ours}layer_norm_{n}/gamma"] = state[f"{theirs}layer_norm{n}.weight"]
            values[f"{ours}layer_norm_{n}/beta"] = state[f"{theirs}layer_norm{n}.bias"]
            values[f"{ours}dense_{n}/kernel"] = state[f"{theirs}mlp.fc{n}.weight"].T
            values[f"{ours}dense_{n}/bias"] = state[f"{theirs}mlp.fc{n}.bias"]
    assigned = 0
    for variable in encoder.weights:
        if variable.path in values:
            variable.assign(values[variable.path])
            assigned += 1
    assert assigned == len(values) == len(encoder.weights) - 1  # all but position_ids, which are constants
    encoder.save_to_preset(str(folder))


@pytest.mark.slow
def test_clip_features_equal_hugging_face_transformers(tmp_path, pixels):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    pytest.importorskip("keras_hub")

    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=14,
            image_size=SIZE,
        )
    ).eval()
    clip_from_transformers(model, tmp_path / "keras")
    normalized = (pixels / 255.0 - np.array(CLIP_MEAN_RGB)) / np.array(CLIP_STD_RGB)
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(normalized.transpose(0, 3, 1, 2), dtype=torch.float32))
        patches = getattr(model, "vision_model", model).post_layernorm(out.last_hidden_state)[:, 1:].mean(dim=1)
    for pooling, expected in (("cls", out.pooler_output.numpy()), ("mean", patches.numpy())):
        ours = features_of(BackboneSpec("clip_vit_b16", weights=str(tmp_path / "keras"), pooling=pooling), pixels)
        spread = np.median(np.linalg.norm(expected - expected.mean(0), axis=1))
        assert np.linalg.norm(ours - expected, axis=1).max() / spread < 1e-4, pooling


@pytest.mark.slow  # torch, transformers and five KerasHub builds: 9 s of the fast suite
@pytest.mark.parametrize("family", ["dinov2", "vit"])
def test_features_equal_hugging_face_transformers(tmp_path, pixels, family):
    gaps = hugging_face_parity(tmp_path, family, pixels)
    assert max(gaps.values()) < 1e-4, gaps


@pytest.mark.slow
def test_openvino_computes_the_same_features(tmp_path, pixels):
    pytest.importorskip("openvino")
    from bottleneck.backbones.runtime import get_feature_model

    folder = write_preset(tmp_path / "dino", "dinov2")
    spec = BackboneSpec("dinov2_small", weights=str(folder))
    batch = pixels.astype(np.uint8)
    keras_features = get_feature_model(spec, "keras")(batch)
    openvino_features = get_feature_model(spec, "openvino", tmp_path / "cache")(batch)
    spread = np.median(np.linalg.norm(keras_features - keras_features.mean(0), axis=1))
    assert np.linalg.norm(keras_features - openvino_features, axis=1).max() / spread < 1e-4


def test_clip_built_from_its_configuration_numbers_its_positions():
    pytest.importorskip("keras_hub")
    from bottleneck.backbones.build import build_foundation_backbone

    backbone = build_foundation_backbone(BackboneSpec("clip_vit_b32", weights="none", image_size=64))
    (ids,) = [v for v in backbone.weights if v.path.endswith("position_ids")]
    assert np.asarray(ids.numpy()).tolist() == [[0, 1, 2, 3, 4]]  # KerasHub leaves them all 0: one position for all
