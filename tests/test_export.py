"""`bottleneck export`: every artefact loads without this package and equals `predict` within 1e-4."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.features.decode import decode_image
from bottleneck.features.extract import extract_features
from bottleneck.learn.pretrain import PretrainConfig, pretrain
from bottleneck.learn.runs import PREDICTIONS_FILE, HeadConfig, train_head
from bottleneck.learn.splits import SplitConfig
from bottleneck.use.export import PARITY_TOLERANCE, _staging_for, export_run
from bottleneck.use.predict import predict_images

from .conftest import COLOURS, make_dataset

SPLIT = SplitConfig(val_pct=20, test_pct=30, seed=4)

# Run in a plain interpreter: only TensorFlow, Keras and NumPy; the test checks bottleneck was never imported.
# One interpreter loads every export named in its argument (a JSON list of {"out", "pixels", "paths"}).
PLAIN_LOADER = """
import json, sys
sys.modules["bottleneck"] = None  # this package made unimportable (pandas, imported by TensorFlow, would try it)
import numpy as np, tensorflow as tf, keras
results = []
for job in json.loads(sys.argv[1]):
    out, paths = job["out"], job["paths"]
    pixels = np.load(job["pixels"])
    result = {"labels": open(out + "/labels.txt").read().split()}
    model = keras.saving.load_model(out + "/model.keras", safe_mode=True)
    result["model.keras"] = model.predict(pixels, verbose=0).tolist()
    serve = tf.saved_model.load(out + "/saved_model").signatures["serving_default"]
    served = serve(images=tf.constant([open(p, "rb").read() for p in paths]))
    result["saved_model"] = served["probabilities"].numpy().tolist()
    result["top_label"] = [t.decode() for t in served["top_label"].numpy()]
    interpreter = tf.lite.Interpreter(model_path=out + "/model.tflite"); interpreter.allocate_tensors()
    rows = []
    for image in pixels:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0].tolist())
    result["model.tflite"] = rows
    results.append(result)
imported = any(name.startswith("bottleneck") and sys.modules[name] is not None for name in sys.modules)
print(json.dumps({"exports": results, "bottleneck_imported": imported}))
"""


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Images (JPEG and PNG), a small pretrained base and its features: (root, data, cache, spec)."""
    root = tmp_path_factory.mktemp("export")
    data, cache = root / "data", root / "cache"
    make_dataset(data, per_class=6, fmt="JPEG")
    make_dataset(data, per_class=6, fmt="PNG", start=6)
    base = root / "base.keras"
    pretrain(data, base, PretrainConfig(image_size=24, blocks=2, filters=8, epochs=2))
    spec = BackboneSpec(architecture=str(base), layer="features")
    extract_features(data, cache, spec)
    return root, data, cache, spec


@pytest.fixture(scope="module")
def runs(features):
    root, data, cache, spec = features
    return {"logreg": train_head(data, cache, root / "runs", spec, HeadConfig("logreg"), SPLIT).run_dir}, data


@pytest.fixture(scope="module")
def keras_run(features):
    """A keras head on the same features, trained only for the test that exports it (a slow one)."""
    root, data, cache, spec = features
    return train_head(data, cache, root / "runs", spec, HeadConfig("keras", epochs=10), SPLIT).run_dir


def test_test_split_mixes_jpeg_and_png(runs):
    paths = (runs[0]["logreg"] / PREDICTIONS_FILE).read_text()
    assert ".jpg" in paths and ".png" in paths


@pytest.mark.slow
def test_exports_load_without_bottleneck_and_equal_predict(runs, keras_run, tmp_path):
    """Both heads (logreg, keras) exported with TFLite; one plain interpreter loads both (one TensorFlow start)."""
    run_of, data = {**runs[0], "keras": keras_run}, runs[1]
    jobs = []
    for head in ("logreg", "keras"):
        run, out = run_of[head], tmp_path / head / "exported"
        result = export_run(run, out, tflite=True)
        assert sorted(p.name for p in out.iterdir()) == [
            "README.md",
            "export.json",
            "labels.txt",
            "model.keras",
            "model.tflite",
            "saved_model",
        ], head
        parity = result.parity["saved_model"]
        assert parity["jpeg"]["images"] >= 5 and parity["png"]["images"] >= 5, head
        assert result.worst <= PARITY_TOLERANCE, (head, result.parity)
        assert "Parity with `bottleneck predict`" in (out / "README.md").read_text()

        tests = [line.split(",")[0] for line in (run / PREDICTIONS_FILE).read_text().splitlines()[1:]]
        paths = [str(data / relpath) for relpath in tests]
        pixels = np.stack([decode_image(open(p, "rb").read(), 24) for p in paths]).astype(np.float32)
        np.save(tmp_path / head / "pixels.npy", pixels)
        jobs.append({"out": str(out), "pixels": str(tmp_path / head / "pixels.npy"), "paths": paths})
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOADER, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert not answer["bottleneck_imported"]

    for head, job, loaded in zip(("logreg", "keras"), jobs, answer["exports"]):
        assert loaded["labels"] == sorted(COLOURS), head
        predicted = predict_images(run_of[head], job["paths"], top=3)
        expected = np.array([[dict(p.top)[label] for label in loaded["labels"]] for p in predicted.predictions])
        for artefact in ("model.keras", "saved_model", "model.tflite"):
            np.testing.assert_allclose(
                np.array(loaded[artefact]), expected, rtol=0, atol=PARITY_TOLERANCE, err_msg=f"{head} {artefact}"
            )
        assert loaded["top_label"] == [p.top[0][0] for p in predicted.predictions], head


@pytest.mark.slow
def test_export_of_a_fine_tuned_run_and_bad_targets(runs, tmp_path, capsys):
    from bottleneck.learn.finetune import FineTuneConfig, fine_tune

    tuned = fine_tune(runs[0]["logreg"], FineTuneConfig(epochs=1, learning_rate=1e-3), tmp_path / "runs").run_dir
    result = export_run(tuned, tmp_path / "tuned-export")
    assert result.worst <= PARITY_TOLERANCE, result.parity

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep me")
    assert main(["export", "--run", str(runs[0]["logreg"]), "--out", str(occupied)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"bottleneck: error: {occupied} exists and is not an earlier export "
        "(it also holds mine.txt); choose another --out or remove it"
    )
    assert (occupied / "mine.txt").read_text() == "keep me"
    # A file named export.json does not make a folder ours: anything else in it is refused, by name.
    (occupied / "export.json").write_text("{}")
    assert main(["export", "--run", str(runs[0]["logreg"]), "--out", str(occupied)]) == 2
    assert "(it also holds mine.txt)" in capsys.readouterr().err
    assert (occupied / "mine.txt").read_text() == "keep me"

    # The export is readable as the umask allows (not mkdtemp's 0700), and a killed export's staging is cleared.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "tuned-export").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "tuned-export" / "labels.txt").stat().st_mode) == 0o666 & ~umask
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = tmp_path / f".tuned-export.{dead.pid}.abc123"
    killed.mkdir()
    (killed / "model.keras").write_bytes(b"half")
    staging = _staging_for(tmp_path / "tuned-export")  # what the next export does first
    assert not killed.exists() and staging.name.startswith(f".tuned-export.{os.getpid()}.")
    staging.rmdir()

    # The README's recipe for feeding model.keras decodes exactly as bottleneck does (JPEG draft, EXIF, alpha).
    from PIL import Image

    readme = (tmp_path / "tuned-export" / "README.md").read_text()
    block = readme[readme.index("import keras, numpy as np") :]
    recipe = block[: block.index("model = keras.saving")]
    namespace: dict = {}
    exec(recipe, namespace)  # noqa: S102 - our own README's code
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 255, (50, 40, 4), dtype=np.uint8), "RGBA").save(tmp_path / "alpha.png")
    for name in ("big.jpg", "alpha.png"):
        path = tmp_path / name
        size = int(np.asarray(namespace["pixels_of"](path)).shape[0])
        np.testing.assert_array_equal(namespace["pixels_of"](path), decode_image(path.read_bytes(), size))
    assert main(["export", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_an_interrupt_a_library_swallowed_stops_the_export_at_the_next_phase(runs, tmp_path, monkeypatch):
    """SIGTERM inside a callback TensorFlow runs from C sets the flag but its KeyboardInterrupt can vanish."""
    import bottleneck.use.export as export_module
    from bottleneck.errors import INTERRUPTED

    built = export_module.build_classifier

    def swallowed(run):
        INTERRUPTED.set()  # what our handler does before its KeyboardInterrupt is lost
        return built(run)

    monkeypatch.setattr(export_module, "build_classifier", swallowed)
    later_phases = []
    monkeypatch.setattr(export_module, "write_saved_model", lambda *args: later_phases.append("saved_model"))
    out = tmp_path / "exported"
    try:
        with pytest.raises(KeyboardInterrupt):
            export_run(runs[0]["logreg"], out)
    finally:
        INTERRUPTED.clear()
    assert later_phases == []  # stopped at the next phase, not after a SavedModel and parity checks
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no staging left either


@pytest.mark.slow
def test_tensorflow_loads_without_jax_for_the_tensorflow_backend():
    probe = (
        "import sys; from bottleneck.backbones.backend import import_keras; keras = import_keras(); "
        "import tensorflow; assert keras.config.backend() == 'tensorflow'; print('jax' in sys.modules); "
        "import importlib.util; installed = importlib.util.find_spec('jax') is not None; "
        "print(__import__('jax').numpy.zeros(2).shape if installed else '(2,)')"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "(2,)"]  # not loaded with TensorFlow; importable when asked for


def test_parity_images_re_encode_whatever_their_mode_and_transparency(tmp_path):
    """A 1-bit and a 16-bit PNG with a tRNS colour: `convert("RGB")` carried an integer `transparency` into RGB,
    and PNG's encoder raised (a traceback from `export`, found on Pillow's own test images)."""
    from PIL import Image

    from bottleneck.use.export import _reencoded

    one_bit, sixteen = tmp_path / "one.png", tmp_path / "sixteen.png"
    Image.new("1", (9, 7), 1).save(one_bit, transparency=1)
    Image.new("I;16", (9, 7), 300).save(sixteen, transparency=300)
    assert isinstance(Image.open(one_bit).info["transparency"], int)
    folder = tmp_path / "re-encoded"
    folder.mkdir()
    sets = _reencoded([one_bit, sixteen], folder)
    assert [len(paths) for paths in sets.values()] == [2, 2, 2]
    for path in sets["png"]:
        assert decode_image(path.read_bytes(), 8).shape == (8, 8, 3)


def test_images_the_saved_model_refuses_are_counted_and_the_rest_measured():
    """The graph decoder reads JPEG, PNG, GIF and BMP; a TIFF in a batch fails the whole batch."""
    import tensorflow as tf

    from bottleneck.use.export import _serve, parity_rows

    def serving(images):
        values = images.numpy().tolist()
        if any(value.startswith(b"II*") for value in values):
            raise tf.errors.InvalidArgumentError(None, None, "graph decoder: not a JPEG, PNG, GIF or BMP file")
        return {"probabilities": tf.constant([[float(len(value)), 0.0] for value in values])}

    served, kept = _serve(tf, serving, [b"\x89PNG a", b"II*\x00 tiff", b"\xff\xd8\xff jpeg"], 2)
    assert kept == [0, 2] and served["probabilities"][:, 0].tolist() == [6.0, 8.0]
    none, nothing = _serve(tf, serving, [b"II*\x00"], 2)
    assert nothing == [] and none["probabilities"].shape == (0, 2)
    rows = parity_rows({"saved_model": {"as given": {"images": 2, "max_abs_diff": 0.0, "refused": 1}}})
    assert rows[1] == ["saved_model", "as given", "2 (1 refused)", "0.00e+00"]
