"""Every Keras backend computes the same features from the same weights, into one shared store.

TensorFlow runs in this process; JAX and PyTorch each run in a process of their own (Keras picks its
backend once per process), through the real `bottleneck features --backend` command. Parity is
measured as the largest distance between one image's features on two backends, relative to the
median distance of an image from the mean: the spread that a head separates classes with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from bottleneck.backbones.backend import BACKENDS, use_backend
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.errors import BackboneError
from bottleneck.features.extract import extract_features
from tests.conftest import TEST_SIZE, make_dataset

PARITY = 1e-4  # of the spread between images
NETWORK = ["--image-size", str(TEST_SIZE), "--batch-size", "4", "--no-progress"]  # 15 images: a short last batch


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """15 images, a weights file, and TensorFlow's features for both (random weights and the file)."""
    import keras

    root = tmp_path_factory.mktemp("backends")
    data, first_half = root / "data", root / "first-half"
    make_dataset(data, per_class=5)
    make_dataset(first_half, per_class=2)  # the same first two images of each class
    weights = root / "inception.weights.h5"
    keras.utils.set_random_seed(3)  # Keras' own initialisers: weights unlike the seeded random ones
    keras.applications.InceptionV3(
        include_top=False, weights=None, input_shape=(TEST_SIZE, TEST_SIZE, 3), pooling="avg"
    ).save_weights(weights)
    for name, flag in (("none", "none"), ("file", str(weights))):
        extract_features(data, root / f"tf-{name}", BackboneSpec(weights=flag, image_size=TEST_SIZE), batch_size=4)
    extract_features(first_half, root / "shared", BackboneSpec(weights="none", image_size=TEST_SIZE), batch_size=4)
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(root / "tf-none"),
                "--weights",
                "none",
                "--image-size",
                str(TEST_SIZE),
                "--runs",
                str(root / "runs"),
                "--head",
                "keras",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    (run,) = (root / "runs").iterdir()
    return {
        "root": root,
        "data": data,
        "weights": weights,
        "run": run,
        "tf_predictions": predict_lines(root, run, "tensorflow"),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    """The same 15 images as `work`, no features: for the tests of flags that fail or pick before any network."""
    root = tmp_path_factory.mktemp("backends-folder")
    make_dataset(root / "data", per_class=5)
    return {"root": root, "data": root / "data"}


def predict_lines(root: Path, run: Path, backend: str, stdout: str | None = None) -> dict[str, np.ndarray]:
    """Probabilities per image from `predict --json` (run here on TensorFlow, or given as another process's stdout)."""
    if stdout is None:
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(predict_argv(root, run, backend)) == 0
        stdout = buffer.getvalue()
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"path"')]
    return {
        row["path"]: np.array(sorted((t["label"], t["probability"]) for t in row["top"]))[:, 1].astype(float)
        for row in rows
    }


def predict_argv(root: Path, run: Path, backend: str) -> list[str]:
    """Predict the red images with the Keras head, computing their features again (a cache of its own)."""
    return [
        "predict",
        "--run",
        str(run),
        str(root / "data" / "red"),
        "--json",
        "--top",
        "3",
        "--cache",
        str(root / f"predict-{backend}"),
        "--no-progress",
    ]


def store_of(cache: Path) -> tuple[str, dict[str, np.ndarray], h5py.AttributeManager]:
    (path,) = cache.glob("*.h5")
    with h5py.File(path, "r") as handle:
        rows = dict(zip((h.decode() for h in handle["content_hash"][()]), handle["features"][()]))
    return path.name, rows, path


def parity(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    keys = sorted(reference)
    a, b = np.stack([reference[k] for k in keys]), np.stack([other[k] for k in keys])
    spread = np.median(np.linalg.norm(a - a.mean(0), axis=1))
    return float(np.linalg.norm(a - b, axis=1).max() / spread)


def segment_records(store_file: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for segment in sorted((store_file.parent / (store_file.stem + ".segments")).glob("seg-*.h5")):
        with h5py.File(segment, "r") as handle:
            for name, count in json.loads(handle.attrs.get("computed_by", "{}")).items():
                counts[name] = counts.get(name, 0) + count
    return counts


def features_in_a_new_process(backend: str, work: dict) -> subprocess.CompletedProcess:
    """`features --backend B`: random weights, the weights file, and the rest of the half-filled shared store."""
    root, data = work["root"], work["data"]
    shared = root / f"shared-{backend}"
    shutil.copytree(root / "shared", shared)
    calls = [
        ["features", str(data), "--cache", str(root / f"{backend}-none"), "--weights", "none"],
        ["features", str(data), "--cache", str(root / f"{backend}-file"), "--weights", str(work["weights"])],
        ["features", str(data), "--cache", str(shared), "--weights", "none"],
    ]
    calls = [[*c, "--backend", backend, *NETWORK] for c in calls]
    calls.append([*predict_argv(root, work["run"], backend), "--backend", backend])
    script = (
        "import sys; from bottleneck.cli import main\n"
        f"for argv in {calls!r}:\n"
        "    code = main(argv)\n"
        "    if code: sys.exit(code)\n"
        f"print('export exit code', main(['export', '--run', {str(work['run'])!r}, '--out', {str(root / 'x')!r}]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_backend_computes_tensorflows_features_into_the_same_store(backend, work):
    if backend == "torch" and importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is an optional extra: make test installs it unless WITH_TORCH= is empty")
    done = features_in_a_new_process(backend, work)
    assert done.returncode == 0, done.stderr[-2000:]
    root = work["root"]
    for weights in ("none", "file"):
        name, reference, _ = store_of(root / f"tf-{weights}")
        other_name, other, store_file = store_of(root / f"{backend}-{weights}")
        assert other_name == name  # one fingerprint: backends share a cache
        assert sorted(other) == sorted(reference) and len(other) == 15
        assert parity(reference, other) < PARITY, (weights, parity(reference, other))
        (label,) = segment_records(store_file)
        assert label.startswith(backend) or f", {backend} " in f", {label}"
    # The shared store: TensorFlow computed 6 images, the backend added the other 9 beside them.
    _, shared, store_file = store_of(root / f"shared-{backend}")
    assert parity(store_of(root / "tf-none")[1], shared) < PARITY
    records = segment_records(store_file)
    assert sorted(records.values()) == [6, 9] and any("tensorflow" in k for k in records)
    assert "computed 9, reused 6" in done.stdout
    # export needs TensorFlow (SavedModel): on another backend, one line
    assert "export exit code 2" in done.stdout
    assert (
        f"this step runs on TensorFlow (its graphs, SavedModels and tf.data), but Keras runs on {backend}"
        in done.stderr
    )
    # predict on this backend: the same probabilities as on TensorFlow, from features it computed itself
    predictions = predict_lines(root, work["run"], backend, done.stdout)
    assert sorted(predictions) == sorted(work["tf_predictions"]) and len(predictions) == 5
    for path, probabilities in predictions.items():
        np.testing.assert_allclose(probabilities, work["tf_predictions"][path], atol=1e-4)


@pytest.mark.slow
def test_cache_info_says_what_computed_the_rows(work, capsys):
    assert main(["cache", "info", "--cache", str(work["root"] / "tf-none")]) == 0
    assert "computed by keras " in capsys.readouterr().out


def test_a_backend_that_is_not_installed_is_one_line(folder, capsys, monkeypatch):
    import bottleneck.backbones.backend as backend

    monkeypatch.setattr(backend, "is_installed", lambda name: name == "tensorflow")
    code = main(["features", str(folder["data"]), "--cache", str(folder["root"] / "x"), "--backend", "torch", *NETWORK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "the torch backend is not installed: pip install 'bottleneck-transfer[torch]'" in err


def test_keras_cannot_switch_backend_inside_one_process(folder, capsys):
    import keras  # noqa: F401 - this test process runs Keras on TensorFlow

    code = main(["features", str(folder["data"]), "--cache", str(folder["root"] / "x"), "--backend", "jax", *NETWORK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Keras already runs on tensorflow" in err
    assert use_backend("tensorflow") == "tensorflow" and use_backend(None) == "tensorflow"


def test_an_unknown_keras_backend_variable_is_one_line(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "theano")
    with pytest.raises(BackboneError, match=f"unknown KERAS_BACKEND 'theano'; choose one of: {', '.join(BACKENDS)}"):
        use_backend(None)


def test_mixed_precision_needs_a_gpu(folder, capsys):
    code = main(
        [
            "features",
            str(folder["data"]),
            "--cache",
            str(folder["root"] / "x"),
            "--weights",
            "none",
            "--precision",
            "mixed",
            *NETWORK,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--precision mixed needs a GPU" in err


@pytest.mark.slow
def test_mixed_precision_is_a_store_of_its_own_and_stays_close():
    from bottleneck.backbones.build import FeatureModel

    full, mixed = (
        BackboneSpec(weights="none", image_size=TEST_SIZE),
        BackboneSpec(weights="none", image_size=TEST_SIZE, precision="mixed"),
    )
    assert mixed.fingerprint() != full.fingerprint() and "-mixed-" in mixed.fingerprint()
    assert full.fingerprint() == BackboneSpec(weights="none", image_size=TEST_SIZE, precision="float32").fingerprint()
    pixels = np.random.default_rng(0).integers(0, 256, (4, TEST_SIZE, TEST_SIZE, 3), dtype=np.uint8)
    a, b = FeatureModel(full)(pixels), FeatureModel(mixed)(pixels)  # float16 runs on a CPU too, slowly: tests only
    assert b.dtype == np.float32 and b.shape == a.shape
    spread = np.median(np.linalg.norm(a - a.mean(0), axis=1))
    assert 0 < np.linalg.norm(a - b, axis=1).max() / spread < 0.5


def test_batch_size_auto_is_the_default_on_a_cpu(folder, capsys):
    from bottleneck.features.engines import DEFAULT_BATCH_SIZE
    from bottleneck.features.engines.local import LocalEngine
    from bottleneck.features.extract import ExtractOptions

    engine = LocalEngine(ExtractOptions(batch_size="auto"))
    engine.start(BackboneSpec(weights="none", image_size=TEST_SIZE), folder["root"] / "auto", print)
    assert engine.batch_size == DEFAULT_BATCH_SIZE
    cache = folder["root"] / "auto-cli"
    assert (
        main(
            [
                "features",
                str(folder["data"]),
                "--cache",
                str(cache),
                "--weights",
                "none",
                "--image-size",
                str(TEST_SIZE),
                "--batch-size",
                "auto",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "computed 15" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_code:
        main(["features", str(folder["data"]), "--cache", str(cache), "--batch-size", "big"])
    assert exit_code.value.code == 2
    assert "expected a whole number from 1 to 4096, or auto, got 'big'" in capsys.readouterr().err
