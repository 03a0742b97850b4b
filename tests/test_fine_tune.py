"""`bottleneck fine-tune`: BatchNorm frozen, interrupt and resume, a run like any other, predict on it, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.errors import BottleneckError
from bottleneck.features.extract import extract_features
from bottleneck.inspect.report import write_report
from bottleneck.learn.finetune import FineTuneConfig, fine_tune
from bottleneck.learn.pretrain import PretrainConfig, pretrain
from bottleneck.learn.run_folder import PREDICTIONS_FILE
from bottleneck.learn.runs import HeadConfig, train_head
from bottleneck.learn.splits import SplitConfig
from bottleneck.use.predict import predict_images

from .conftest import make_dataset

SPLIT = SplitConfig(val_pct=25, test_pct=25, seed=2)
CONFIG = FineTuneConfig(epochs=4, learning_rate=1e-3, batch_size=8, patience=10, augment=("flip", "crop", "brightness"))


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine_tune")
    data, cache = root / "data", root / "cache"
    make_dataset(data, per_class=8)
    base = root / "base.keras"
    pretrain(data, base, PretrainConfig(image_size=16, blocks=2, filters=8, epochs=2))
    spec = BackboneSpec(architecture=str(base), layer="features")
    extract_features(data, cache, spec)
    run = train_head(data, cache, root / "runs", spec, HeadConfig("logreg"), SPLIT).run_dir
    return root, data, base, run


def test_interrupted_fine_tune_resumes_to_the_same_result(parent, tmp_path):
    _, _, _, run = parent

    def stop_at_two(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        fine_tune(run, CONFIG, runs, on_epoch_end=stop_at_two)
    assert not [p for p in runs.iterdir() if not p.name.startswith(".")]  # no half run folder
    resumed = fine_tune(run, CONFIG, runs)
    assert resumed.resumed_from_epoch == 2
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]  # the work folder is gone once done
    fresh = fine_tune(run, CONFIG, tmp_path / "fresh")
    assert fresh.resumed_from_epoch == 0
    np.testing.assert_allclose(resumed.metrics["history"]["val_loss"], fresh.metrics["history"]["val_loss"], rtol=1e-5)
    for name in ("train", "validation", "test"):
        assert resumed.metrics["splits"][name]["accuracy"] == fresh.metrics["splits"][name]["accuracy"]
        assert abs(resumed.metrics["splits"][name]["log_loss"] - fresh.metrics["splits"][name]["log_loss"]) < 1e-5


def test_fine_tuned_run_keeps_batchnorm_and_works_with_predict_and_report(parent, capsys):
    import keras

    root, data, base, run = parent
    assert main(["fine-tune", "--run", str(run), "--epochs", "3", "--learning-rate", "0.001", "--gradual",
                 "--augment", "flip,crop", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    child = root / "runs" / line["run_dir"].split("/")[-1]
    assert line["parent_run"] == run.name
    config = json.loads((child / "config.json").read_text())
    metrics = json.loads((child / "metrics.json").read_text())
    assert config["kind"] == "fine-tune" and config["parent_run"] == run.name
    assert metrics["head"] == "fine-tune" and len(metrics["history"]["loss"]) == 3
    assert set(metrics["unfrozen_layers"]) == {"conv1", "conv2"}
    assert {"accuracy", "macro_f1", "confusion_matrix"} <= set(metrics["splits"]["test"])

    tuned = keras.saving.load_model(child / "model.keras", safe_mode=True)
    original = keras.saving.load_model(base, safe_mode=True)
    tuned_layers = {layer.name: layer for layer in _leaves(tuned)}
    for name in ("bn1", "bn2"):  # inference mode: moving statistics and scale untouched
        for before, after in zip(original.get_layer(name).get_weights(), tuned_layers[name].get_weights()):
            np.testing.assert_array_equal(before, after)
    assert not np.array_equal(original.get_layer("conv2").get_weights()[0], tuned_layers["conv2"].get_weights()[0])

    recorded = {row.split(",")[0]: row.split(",")[2] for row in (child / PREDICTIONS_FILE).read_text().splitlines()[1:]}
    result = predict_images(child, [str(data / path) for path in recorded])
    assert [p.top[0][0] for p in result.predictions] == list(recorded.values())
    _, markdown = write_report(root / "runs")
    rows = [r for r in markdown.splitlines() if r.startswith("| 2")]
    parent_row = next(i for i, r in enumerate(rows) if r.startswith(f"| {run.name}"))
    assert "fine-tune" in rows[parent_row + 1] and run.name in rows[parent_row + 1]


def _leaves(layer):
    inner = getattr(layer, "layers", None)
    return [leaf for child in inner for leaf in _leaves(child)] if inner else [layer]


def test_resume_after_the_parents_head_was_swapped_says_so_and_starts_again(parent, tmp_path):
    import shutil

    root, data, base, original = parent
    run = tmp_path / original.name
    shutil.copytree(original, run)
    config = FineTuneConfig(epochs=2, learning_rate=1e-3, batch_size=8)

    def stop_at_one(epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fine_tune(run, config, tmp_path / "runs", on_epoch_end=stop_at_one)
    spec = BackboneSpec(architecture=str(base), layer="features")
    other = train_head(data, root / "cache", tmp_path / "other", spec, HeadConfig("logreg", C=0.01), SPLIT).run_dir
    shutil.copyfile(other / "head.npz", run / "head.npz")  # the same classes and width: a head that loads
    said: list[str] = []
    again = fine_tune(run, config, tmp_path / "runs", log=said.append)
    assert again.resumed_from_epoch == 0
    assert any(line.startswith(f"warning: the head or backbone of run {run.name} changed since ") and
               "saved epoch 1" in line and "fine-tuning starts again" in line for line in said), said


def test_bad_fine_tune_input_is_one_line(parent, capsys):
    _, _, _, run = parent
    with pytest.raises(BottleneckError, match="nearest names: conv"):
        fine_tune(run, FineTuneConfig(unfreeze_from="conv"))
    for args, message in [
        (["--learning-rate", "nan"], "--learning-rate must be a positive number or auto; got nan"),
        (["--learning-rate", "-1"], "--learning-rate must be a positive number or auto; got -1.0"),
        (["--augment", "flip,rotate"], "unknown --augment rotate; choose from: flip, crop, brightness"),
    ]:
        assert main(["fine-tune", "--run", str(run), *args]) == 2
        assert capsys.readouterr().err.strip() == f"bottleneck: error: {message}"


def test_the_same_fine_tune_twice_at_once_is_one_line_for_the_second(parent):
    import fcntl

    _, _, _, run = parent
    config = FineTuneConfig(epochs=1, learning_rate=1e-3, batch_size=8)
    lock = run.parent / f".fine-tune-{run.name}-{config.key()}.lock"
    with open(lock, "a+") as held:  # what the first fine-tune holds while it trains
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        with pytest.raises(BottleneckError, match=rf"^the same fine-tune of run {run.name} is already running "
                                                  r"\(pid 4242\); wait for it to finish"):
            fine_tune(run, config, run.parent)
    # Once the first is done, the same command runs.
    assert fine_tune(run, config, run.parent).run_dir.is_dir()
