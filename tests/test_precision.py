"""Exact float32 on every CPU, bf16 and int8 on purpose, and the fastest exact runtime by default.

The CPU this suite runs on may or may not have bfloat16: the checks that matter read what each
library was asked for and what it says it does, so they fail on any CPU when a hint goes missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from bottleneck.cli import main

from .conftest import make_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def runtime_auto(monkeypatch):
    """These tests are about `--runtime auto` itself: not the suite's Keras choice (conftest)."""
    monkeypatch.delenv("BOTTLENECK_RUNTIME", raising=False)


def _tiny_model_file(path: Path, size: int = 16) -> Path:
    """A small RGB conv net saved as .keras: a backbone OpenVINO converts and NNCF quantizes in seconds."""
    import keras

    rng = np.random.default_rng(3)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv2")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, outputs)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") for w in model.get_weights()])
    model.save(path)
    return path


class _RecordingCore:
    """Wraps openvino.Core: records the config of every compile_model call, then compiles for real."""

    configs: list = []

    def __init__(self, *args, **kwargs):
        self._core = _RecordingCore.real(*args, **kwargs)

    def compile_model(self, model, device=None, config=None):
        _RecordingCore.configs.append(dict(config or {}))
        return self._core.compile_model(model, device, config or {})

    def __getattr__(self, name):
        return getattr(self._core, name)


def test_every_openvino_model_is_compiled_with_the_f32_hint_and_reads_f32_after(tmp_path, monkeypatch):
    import openvino

    from bottleneck.backbones.build import FeatureModel
    from bottleneck.backbones.openvino import OpenVinoFeatureModel
    from bottleneck.backbones.spec import BackboneSpec

    _RecordingCore.real, _RecordingCore.configs = openvino.Core, []
    monkeypatch.setattr(openvino, "Core", _RecordingCore)
    spec = BackboneSpec(architecture=str(_tiny_model_file(tmp_path / "net.keras")), layer="gap")
    model = OpenVinoFeatureModel(spec, tmp_path / "cache" / f"{spec.fingerprint()}.openvino")
    # The conversion's check against TensorFlow and the runtime: both compiled, both asked for f32.
    assert len(_RecordingCore.configs) >= 2
    assert all(config.get("INFERENCE_PRECISION_HINT") == "f32" for config in _RecordingCore.configs)
    assert model._compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    batch = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(model(batch), FeatureModel(spec)(batch), rtol=1e-4, atol=1e-5)


def test_a_compiled_model_that_does_not_compute_what_was_asked_is_refused(monkeypatch):
    """What a bf16 CPU does to a float32 model without the hint (or this CPU to a bf16 request): refused."""
    import openvino

    from bottleneck.backbones import openvino as runtime
    from bottleneck.errors import BackboneError

    class Compiled:
        def __init__(self, reads):
            self.reads = reads

        def get_property(self, name):
            assert name == "INFERENCE_PRECISION_HINT"
            return self.reads

    class Core:
        reads = openvino.Type.bf16

        def compile_model(self, model, device, config):
            return Compiled(Core.reads)

    monkeypatch.setattr(openvino, "Core", Core)
    with pytest.raises(BackboneError, match=r"^OpenVINO computes in bf16 on this CPU where float32 was asked for"):
        runtime.compile_on_cpu("model.xml", "float32")
    Core.reads = openvino.Type.f32
    with pytest.raises(
        BackboneError,
        match=r"computes in f32 on this CPU where bf16 was asked for; this CPU has no "
        r"bfloat16",
    ):
        runtime.compile_on_cpu("model.xml", "bf16")
    assert runtime.compile_on_cpu("model.xml", "float32").reads == openvino.Type.f32


def _float32_settings(backend: str, extra_env: dict) -> tuple[dict, str]:
    code = (
        "import json; from bottleneck.backbones.backend import float32_settings, import_keras; "
        "print(json.dumps(float32_settings(import_keras()), default=str))"
    )
    env = {**os.environ, "KERAS_BACKEND": backend, **extra_env}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_float32_is_float32_arithmetic_on_every_backend_even_when_the_environment_asks_for_bf16():
    import importlib.util

    # TensorFlow through the real start-up path, in a process of its own, with bf16 asked for in the environment.
    down = {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16", "TF_SET_ONEDNN_FPMATH_MODE": "BF16"}
    settings, err = _float32_settings("tensorflow", down)
    assert settings["ONEDNN_DEFAULT_FPMATH_MODE"] == settings["TF_SET_ONEDNN_FPMATH_MODE"] == "STRICT"
    assert settings["tensorflow_tf32"] is False
    assert "ONEDNN_DEFAULT_FPMATH_MODE=BF16 would compute float32 features in a narrower type" in err
    # JAX and PyTorch (installed by CI) read back after the same settings, here: no process of their own needed.
    from bottleneck.backbones.backend import strict_float32_backend

    class Backend:
        def __init__(self, name):
            self.config = type("config", (), {"backend": staticmethod(lambda: name)})

    strict_float32_backend(Backend("jax"))
    import jax

    assert jax.config.jax_default_matmul_precision == "highest"
    if importlib.util.find_spec("torch") is not None:  # in a process of its own: torch beside TensorFlow is no test
        code = (
            "import torch; from bottleneck.backbones.backend import strict_float32_backend as s; "
            "s(type('k', (), {'config': type('c', (), {'backend': staticmethod(lambda: 'torch')})})); "
            "print(torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, "
            "torch.get_float32_matmul_precision())"
        )
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["False", "False", "highest"]


def test_runtime_auto_picks_openvino_on_a_cpu_and_keras_where_openvino_does_not_fit(monkeypatch):
    from bottleneck.backbones import runtime
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.errors import BackboneError

    inception = BackboneSpec(weights="none", image_size=75)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setattr(runtime, "_gpu_present", lambda: False)
    assert runtime.resolve_runtime("auto", inception) == "openvino"
    with pytest.raises(BackboneError, match="^unknown --runtime 'tensorflow'; choose one of: auto, keras, openvino$"):
        runtime.resolve_runtime("tensorflow", inception)  # the old name of keras, retired
    assert runtime.resolve_runtime("auto", BackboneSpec(architecture="pixels")) == "keras"
    assert runtime.resolve_runtime("auto", BackboneSpec(weights="none", precision="mixed")) == "keras"
    with pytest.raises(BackboneError, match="^--precision int8 runs on the OpenVINO runtime"):
        runtime.resolve_runtime("keras", BackboneSpec(weights="none", precision="int8"))
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # the user chose a Keras backend
    assert runtime.resolve_runtime("auto", inception) == "keras"
    monkeypatch.setenv("BOTTLENECK_RUNTIME", "keras")
    assert runtime.resolve_runtime("auto", inception) == "keras"
    assert runtime.resolve_runtime("openvino", inception) == "openvino"
    monkeypatch.setenv("BOTTLENECK_RUNTIME", "fast")
    with pytest.raises(BackboneError, match="^unknown BOTTLENECK_RUNTIME='fast'; choose keras or openvino"):
        runtime.resolve_runtime("auto", inception)
    monkeypatch.delenv("BOTTLENECK_RUNTIME")
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    monkeypatch.setattr(runtime, "_gpu_present", lambda: True)
    assert runtime.resolve_runtime("auto", inception) == "keras"
    assert runtime.resolve_runtime("auto", BackboneSpec(weights="none", precision="bf16")) == "openvino"


def test_features_run_on_openvino_by_default_say_the_one_conversion_and_share_the_keras_store(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=2)
    model = _tiny_model_file(tmp_path / "net.keras")
    flags = ["--backbone", str(model), "--layer", "gap", "--no-progress"]
    assert main(["features", str(data), "--cache", str(cache), *flags, "--json"]) == 0
    captured = capsys.readouterr()
    assert "converting net to OpenVINO once" in captured.err
    assert "converted net to OpenVINO in " in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    store = Path(summary["store"])
    with h5py.File(store, "r") as handle:
        segments = [handle.attrs[name] for name in handle.attrs if "openvino" in name]
        assert segments, dict(handle.attrs)
        auto_rows = {h.decode(): row for h, row in zip(handle["content_hash"][:], handle["features"][:])}
    # Keras computes the same features into the same store: auto changed the speed, not the cache.
    keras_cache = tmp_path / "keras-cache"
    assert main(["features", str(data), "--cache", str(keras_cache), *flags, "--runtime", "keras", "--json"]) == 0
    keras_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(keras_summary["store"]).name == store.name
    with h5py.File(keras_summary["store"], "r") as handle:
        for h, row in zip(handle["content_hash"][:], handle["features"][:]):
            np.testing.assert_allclose(auto_rows[h.decode()], row, rtol=1e-4, atol=1e-5)
    # Nothing changed: nothing converted, nothing computed.
    assert main(["features", str(data), "--cache", str(cache), *flags, "--json"]) == 0
    captured = capsys.readouterr()
    assert "convert" not in captured.err and json.loads(captured.out.strip().splitlines()[-1])["computed"] == 0


def test_under_auto_a_network_openvino_cannot_convert_runs_on_keras_with_one_line(tmp_path, capsys, monkeypatch):
    from bottleneck.backbones import openvino, runtime
    from bottleneck.errors import BackboneError

    def refuse(spec, target, log=None):
        raise BackboneError(f"OpenVINO cannot convert {spec.name} (an op it lacks); use --runtime tensorflow")

    monkeypatch.setattr(openvino, "convert_to_openvino", refuse)
    runtime._openvino_model.cache_clear()
    data = tmp_path / "data"
    make_dataset(data, per_class=1)
    model = _tiny_model_file(tmp_path / "odd.keras")
    flags = ["--backbone", str(model), "--layer", "gap", "--no-progress", "--json"]
    assert main(["features", str(data), "--cache", str(tmp_path / "cache"), *flags]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["computed"] == 3
    assert (
        "OpenVINO cannot convert odd (an op it lacks); use --runtime tensorflow; computing with Keras instead"
        in captured.err
    )
    assert main(["features", str(data), "--cache", str(tmp_path / "cache2"), *flags, "--runtime", "openvino"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("bottleneck: error: OpenVINO cannot convert odd")


def test_bf16_is_refused_in_one_line_on_a_cpu_without_it_and_computed_in_bf16_on_one_with_it(tmp_path, capsys):
    from bottleneck.backbones.openvino import cpu_capabilities

    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    model = _tiny_model_file(tmp_path / "net.keras")
    args = [
        "features",
        str(data),
        "--cache",
        str(tmp_path / "cache"),
        "--backbone",
        str(model),
        "--layer",
        "gap",
        "--precision",
        "bf16",
        "--no-progress",
        "--json",
    ]
    code = main(args)
    captured = capsys.readouterr()
    if "BF16" not in cpu_capabilities():
        assert code == 2
        assert (
            captured.err.strip()
            .splitlines()[-1]
            .startswith("bottleneck: error: --precision bf16: this CPU has no bfloat16 instructions")
        )
        assert not list((tmp_path / "cache").glob("*bf16*.h5"))
        return
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "-bf16-" in Path(summary["store"]).name and summary["computed"] == 6


def _int8_features(data: Path, cache: Path, model: Path, *extra: str) -> list[str]:
    return [
        "features",
        str(data),
        "--cache",
        str(cache),
        "--backbone",
        str(model),
        "--layer",
        "gap",
        "--precision",
        "int8",
        "--no-progress",
        "--json",
        *extra,
    ]


@pytest.mark.slow
def test_int8_calibrates_once_per_cache_and_every_later_run_on_any_folder_reuses_it(tmp_path, capsys):
    data, other, calibration, cache = (tmp_path / name for name in ("data", "other", "calibration", "cache"))
    make_dataset(data, per_class=3)
    make_dataset(other, per_class=2, start=2)  # red_002, green_002, blue_002 are in both folders
    make_dataset(calibration, per_class=4, start=10)
    model = _tiny_model_file(tmp_path / "net.keras")

    assert main(_int8_features(data, cache, model, "--calibration-images", "5")) == 0
    captured = capsys.readouterr()
    first = json.loads(captured.out.strip().splitlines()[-1])
    assert "int8: quantizing net with NNCF on 5 calibration images of DATA" in captured.err
    assert "int8: quantized in " in captured.err
    [folder] = cache.glob("*.int8-*.openvino")
    record = json.loads((folder / "calibration.json").read_text())
    assert record["calibration"]["images"] == 5 and len(record["calibration"]["content_hashes"]) == 5
    assert record["quantized_in_s"] >= 0 and record["versions"]["nncf"]
    store = Path(first["store"])
    assert f"-int8-cal{record['calibration']['digest'][:8]}-" in store.name and first["computed"] == 9
    with h5py.File(store, "r") as handle:
        assert handle.attrs["precision"] == "int8" and handle.attrs["calibration"] == record["calibration"]["digest"]
        int8 = dict(zip((h.decode() for h in handle["content_hash"][:]), handle["features"][:]))

    # int8 is close to float32, and a store of its own.
    assert (
        main(
            [
                "features",
                str(data),
                "--cache",
                str(cache),
                "--backbone",
                str(model),
                "--layer",
                "gap",
                "--no-progress",
                "--json",
            ]
        )
        == 0
    )
    exact_store = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["store"]
    assert exact_store != str(store)
    with h5py.File(exact_store, "r") as handle:
        exact = dict(zip((h.decode() for h in handle["content_hash"][:]), handle["features"][:]))
    cosine = [np.dot(int8[h], exact[h]) / (np.linalg.norm(int8[h]) * np.linalg.norm(exact[h])) for h in exact]
    assert min(cosine) > 0.99, cosine

    # A rerun does nothing; another folder reuses the calibration, and the shared images their features.
    assert main(_int8_features(data, cache, model)) == 0
    captured = capsys.readouterr()
    assert "quantiz" not in captured.err and json.loads(captured.out.strip().splitlines()[-1])["computed"] == 0
    assert main(_int8_features(other, cache, model)) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out.strip().splitlines()[-1])
    assert "quantiz" not in captured.err
    assert again["store"] == first["store"] and (again["computed"], again["reused"]) == (3, 3)

    # Another calibration set, on purpose: another int8 model and another store; the default stays the first.
    assert main(_int8_features(data, cache, model, "--calibration", str(calibration))) == 0
    captured = capsys.readouterr()
    assert f"calibration images of {calibration}" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["store"] != first["store"]
    assert len(list(cache.glob("*.int8-*.openvino"))) == 2
    assert main(_int8_features(data, cache, model)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["store"] == first["store"]

    # train-head finds the int8 store from the flags alone, and the run records the calibration.
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(cache),
                "--backbone",
                str(model),
                "--layer",
                "gap",
                "--precision",
                "int8",
                "--runs",
                str(runs),
            ]
        )
        == 0
    )
    [run] = runs.iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["fingerprint"] == store.name[: -len(".h5")]
    capsys.readouterr()


@pytest.mark.slow
def test_int8_faults_are_one_line(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=2)
    model = _tiny_model_file(tmp_path / "net.keras")
    flags = ["--backbone", str(model), "--layer", "gap", "--precision", "int8"]

    def one_line(args: list[str], starts: str) -> None:
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith(starts), lines
        assert not any("Traceback" in line for line in lines)

    one_line(
        ["train-head", "--data", str(data), "--cache", str(cache), *flags, "--runs", str(tmp_path / "runs")],
        f"bottleneck: error: no feature cache in {cache}",
    )
    one_line(
        ["features", str(data), "--cache", str(cache), *flags, "--runtime", "keras"],
        "bottleneck: error: --precision int8 runs on the OpenVINO runtime",
    )
    one_line(
        ["features", str(data), "--cache", str(cache), *flags, "--calibration", str(tmp_path / "nowhere")],
        f"bottleneck: error: --calibration {tmp_path / 'nowhere'}: not a folder of images",
    )
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not an image")
    one_line(
        ["features", str(data), "--cache", str(cache), *flags, "--calibration", str(junk)],
        "bottleneck: error: --precision int8 needs calibration images, and none of the 1 files",
    )
    with pytest.raises(SystemExit) as exited:
        main(["features", str(data), "--cache", str(cache), *flags, "--calibration-images", "0"])
    assert exited.value.code == 2
    assert "argument --calibration-images: expected a whole number from 1 to 100000, got '0'" in capsys.readouterr().err
    # A first int8 run only after the float32 features exist in the cache: train-head still has no int8 store.
    assert (
        main(
            ["features", str(data), "--cache", str(cache), "--backbone", str(model), "--layer", "gap", "--no-progress"]
        )
        == 0
    )
    capsys.readouterr()
    one_line(
        ["train-head", "--data", str(data), "--cache", str(cache), *flags, "--runs", str(tmp_path / "runs")],
        f"bottleneck: error: no int8 features in {cache} yet: run `bottleneck features DATA --cache {cache} "
        "--precision int8` first",
    )
    # A damaged int8 model is named, never run.
    assert main(["features", str(data), "--cache", str(cache), *flags, "--no-progress"]) == 0
    capsys.readouterr()
    [folder] = cache.glob("*.int8-*.openvino")
    with open(folder / "model.bin", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 16)
    from bottleneck.backbones import runtime

    runtime._openvino_model.cache_clear()
    (data / "red" / "extra.png").write_bytes((data / "red" / "red_000.png").read_bytes()[:-1] + b"\x00")
    make_dataset(data, per_class=1, start=7)
    one_line(
        ["features", str(data), "--cache", str(cache), *flags, "--no-progress"],
        f"bottleneck: error: the int8 model in {folder} does not match the record of its files (model.bin "
        "changed: damaged?)",
    )


def test_under_auto_a_network_with_a_nan_weight_stores_no_features_and_says_why(tmp_path, capsys):
    """OpenVINO computes the NaN TensorFlow computes (a faithful conversion); the pipeline refuses the rows."""
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="features")(x))
    kernel, bias = model.get_layer("conv").get_weights()
    kernel[0, 0, 0, 0] = np.nan
    model.get_layer("conv").set_weights([kernel, bias])
    model.save(tmp_path / "nan.keras")
    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    assert (
        main(
            [
                "features",
                str(data),
                "--cache",
                str(tmp_path / "cache"),
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
    assert "converted nan to OpenVINO" in err and "computing with Keras" not in err
    assert "no image could be used: all 6 failed" in err and "non-finite features (NaN or infinity)" in err
