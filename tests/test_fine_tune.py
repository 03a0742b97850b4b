"""`bottleneck fine-tune`: interrupt and resume, a run like any other, predict on it, bad input; the recipe: BatchNorm
modes, discriminative rates, the learning-rate finder, a win over the parent on a planted task."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.errors import BottleneckError
from bottleneck.features.extract import extract_features
from bottleneck.inspect.report import write_report
from bottleneck.learn.classifier import build_classifier
from bottleneck.learn.finetune import FineTuneConfig, fine_tune
from bottleneck.learn.finetune_network import fit_temperature, soften_head
from bottleneck.learn.pretrain import PretrainConfig, pretrain
from bottleneck.learn.run_folder import PREDICTIONS_FILE, load_run
from bottleneck.learn.runs import HeadConfig, train_head
from bottleneck.learn.splits import SplitConfig
from bottleneck.use.predict import predict_images

from .conftest import make_dataset

SPLIT = SplitConfig(val_pct=25, test_pct=25, seed=2)
CONFIG = FineTuneConfig(epochs=4, learning_rate=1e-3, batch_size=8, patience=10, augment=("flip", "crop", "brightness"))
# Every part of the recipe at once: the finder, the head's epoch, BatchNorm's affine parameters, AdamW, smoothing.
RECIPE = FineTuneConfig(
    epochs=3,
    learning_rate="auto",
    batch_size=8,
    patience=10,
    augment=("flip", "crop"),
    head_epochs=1,
    bn="affine",
    weight_decay=0.01,
    label_smoothing=0.1,
    lower_rate_factor=10,
    warmup=0.3,
)


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


@pytest.mark.slow
@pytest.mark.parametrize("config", [CONFIG, RECIPE], ids=["plain", "recipe"])
def test_interrupted_fine_tune_resumes_to_the_same_result(parent, tmp_path, config):
    _, _, _, run = parent

    def stop_at_two(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        fine_tune(run, config, runs, on_epoch_end=stop_at_two)
    assert not [p for p in runs.iterdir() if not p.name.startswith(".")]  # no half run folder
    said: list[str] = []
    resumed = fine_tune(run, config, runs, log=said.append)
    assert resumed.resumed_from_epoch == 2
    assert not any(line.startswith("finding the learning rate") for line in said)  # the first run's choice is kept
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]  # the work folder is gone once done
    fresh = fine_tune(run, config, tmp_path / "fresh")
    assert resumed.metrics["learning_rate"] == fresh.metrics["learning_rate"]
    assert fresh.resumed_from_epoch == 0
    np.testing.assert_allclose(resumed.metrics["history"]["val_loss"], fresh.metrics["history"]["val_loss"], rtol=1e-5)
    for name in ("train", "validation", "test"):
        assert resumed.metrics["splits"][name]["accuracy"] == fresh.metrics["splits"][name]["accuracy"]
        assert abs(resumed.metrics["splits"][name]["log_loss"] - fresh.metrics["splits"][name]["log_loss"]) < 1e-5


@pytest.mark.slow
def test_fine_tuned_run_keeps_batchnorm_and_works_with_predict_and_report(parent, capsys):
    import keras

    root, data, base, run = parent
    assert (
        main(
            [
                "fine-tune",
                "--run",
                str(run),
                "--epochs",
                "3",
                "--learning-rate",
                "0.001",
                "--gradual",
                "--label-smoothing",
                "0",
                "--augment",
                "flip,crop",
                "--json",
            ]
        )
        == 0
    )
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
    for name in ("bn1", "bn2"):  # --bn affine (the default): moving statistics untouched, gamma and beta trained
        before, after = original.get_layer(name).get_weights(), tuned_layers[name].get_weights()
        for i in (2, 3):
            np.testing.assert_array_equal(before[i], after[i])
        assert not np.array_equal(before[0], after[0]), metrics["best_epoch"]
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


@pytest.mark.slow
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
    assert any(
        line.startswith(f"warning: the head or backbone of run {run.name} changed since ")
        and "saved epoch 1" in line
        and "fine-tuning starts again" in line
        for line in said
    ), said


def test_bad_fine_tune_input_is_one_line(parent, capsys):
    _, _, _, run = parent
    with pytest.raises(BottleneckError, match="nearest names: conv"):
        fine_tune(run, FineTuneConfig(unfreeze_from="conv"))
    for value in (math.nan, -1.0):  # the command refuses these in argparse (tests/test_hostile_values.py)
        with pytest.raises(
            BottleneckError,
            match=rf"^--learning-rate must be more than 0 and at most 10, or auto; "
            rf"got {value}$",
        ):
            FineTuneConfig(learning_rate=value)
    for args, message in [
        (["--augment", "flip,rotate"], "unknown --augment rotate; choose from: flip, crop, brightness"),
    ]:
        if message is None:  # argparse's choices
            with pytest.raises(SystemExit):
                main(["fine-tune", "--run", str(run), *args])
            assert "argument --bn: invalid choice: 'moving'" in capsys.readouterr().err
            continue
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
        with pytest.raises(
            BottleneckError,
            match=rf"^the same fine-tune of run {run.name} is already running "
            r"\(pid 4242\); wait for it to finish",
        ):
            fine_tune(run, config, run.parent)
    # Once the first is done, the same command runs.
    assert fine_tune(run, config, run.parent).run_dir.is_dir()


# The recipe: a planted task, discriminative rates, the learning-rate finder.


@pytest.fixture(scope="module")
def far_digits(tmp_path_factory):
    """The demo's far source in small: a base pretrained on digits 0-4, a logreg head on its features for digits
    5-9 from 10 images per class. Its frozen features are poor for the target (the demo's negative transfer)."""
    from bottleneck.demo import DemoConfig, write_digits, write_target_split

    root = tmp_path_factory.mktemp("far_digits")
    source, target, cache = root / "source", root / "target", root / "cache"
    write_digits(source, (0, 1, 2, 3, 4), size=16, parity=0)
    write_digits(target, (5, 6, 7, 8, 9), size=16, parity=1)
    split = root / "split.csv"
    write_target_split(target, split, DemoConfig())
    base = root / "base.keras"
    pretrain(source, base, PretrainConfig(image_size=16, blocks=2, filters=8, epochs=3))
    spec = BackboneSpec(architecture=str(base), layer="features")
    extract_features(target, cache, spec)
    # The default C auto: on these 75 images it picks C 10, a head so sharp that fine-tuning barely moves it unless
    # it is first softened (measured, 30 epochs at 1e-3: parent 0.7005 -> 0.7086 unsoftened, 0.7460 softened).
    run = train_head(target, cache, root / "runs", spec, HeadConfig("logreg"), split_file=str(split)).run_dir
    return root, run


@pytest.mark.slow
def test_fine_tuning_beats_its_parent_where_frozen_features_are_poor(far_digits, tmp_path):
    _, run = far_digits
    parent_accuracy = json.loads((run / "metrics.json").read_text())["splits"]["test"]["accuracy"]
    config = FineTuneConfig(learning_rate=1e-3, epochs=30, patience=30, label_smoothing=0.1)
    tuned = fine_tune(run, config, tmp_path)
    assert tuned.metrics["best_epoch"] > 0
    # Softened on validation: the same predictions, a lower validation loss, recorded in the run.
    softened = tuned.metrics["softened"]
    assert softened["temperature"] > 1 and softened["validation_loss_after"] < softened["validation_loss_before"]
    # Measured: 0.70 -> 0.75 on these 374 test images; the margin asked is over twice the parent's standard error.
    assert tuned.metrics["splits"]["test"]["accuracy"] > parent_accuracy + 0.03


def test_temperature_fitting_recovers_a_known_temperature_and_never_sharpens():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in proba])
    assert fit_temperature(logits * 4, y) == pytest.approx(4, rel=0.1)  # a head 4 times too sharp
    assert fit_temperature(logits / 3, y) == 1.0  # too soft: left as it is


def test_a_softened_head_predicts_what_its_parent_predicted(far_digits):
    import keras

    _, run = far_digits
    model = build_classifier(load_run(run))
    pixels = np.random.default_rng(0).uniform(0, 255, (40, 16, 16, 3)).astype(np.float32)
    before = model.predict(pixels, verbose=0)
    labels = before.argmax(axis=1)[::-1].copy()  # labels it gets mostly wrong: the fitted temperature is large
    record = soften_head(model, pixels, labels, lambda message: None)
    after = model.predict(pixels, verbose=0)
    assert record["temperature"] > 1 and isinstance(model, keras.Model)
    np.testing.assert_array_equal(after.argmax(axis=1), before.argmax(axis=1))
    assert after.max(axis=1).mean() < before.max(axis=1).mean()


@pytest.fixture(scope="module")
def weak_head(tmp_path_factory):
    """A network whose loss falls when it trains: random base weights under a barely fitted head (C=0.001)."""
    root = tmp_path_factory.mktemp("weak_head")
    data, cache = root / "data", root / "cache"
    make_dataset(data, per_class=8)
    base = root / "base.keras"
    pretrain(data, base, PretrainConfig(image_size=16, blocks=2, filters=8, epochs=0))
    spec = BackboneSpec(architecture=str(base), layer="features")
    extract_features(data, cache, spec)
    return train_head(data, cache, root / "runs", spec, HeadConfig("logreg", C=0.001), SPLIT).run_dir


def _network(run):
    """The run's whole network, its training pixels and labels, and its layer groups (the top one first)."""
    from bottleneck.learn import finetune

    model = finetune.build_classifier(finetune.load_run(run))
    pixels, y, _, splits, _ = finetune._load_split_pixels(finetune.load_run(run), 16, lambda message: None)
    groups = finetune.unfreeze_groups(finetune.choose_unfrozen(finetune.tunable_layers(model), FineTuneConfig()))
    return model, pixels[splits == "train"], y[splits == "train"], groups


def _train_steps(model, groups, config, pixels, y, rate: float, epochs: int) -> None:
    import tensorflow as tf

    from bottleneck.learn import finetune

    finetune.set_trainable(model, [layer for group in groups for layer in group], config.bn)
    trainer = finetune._Trainer(
        model, finetune.rate_groups(model, groups, len(groups), config.bn, config.lower_rate_factor), config
    )
    for epoch in range(epochs):
        for batch, labels in finetune._epoch_batches(tf, pixels, y, config, epoch):
            trainer.step(batch, labels, rate)


def test_lower_groups_move_less_than_upper_ones_under_discriminative_rates(weak_head):
    model, pixels, y, groups = _network(weak_head)
    assert [[layer.name for layer in group] for group in groups] == [["conv2"], ["conv1"]]
    start = model.get_weights()

    def mean_moves(factor: float) -> dict[str, float]:
        model.set_weights(start)
        leaves = {layer.name: layer for group in groups for layer in group}
        before = {name: layer.get_weights()[0].copy() for name, layer in leaves.items()}
        _train_steps(model, groups, FineTuneConfig(batch_size=8, lower_rate_factor=factor), pixels, y, 1e-3, 2)
        return {name: float(np.abs(leaves[name].get_weights()[0] - before[name]).mean()) for name in leaves}

    even, discriminative = mean_moves(1.0), mean_moves(100.0)
    assert 0.3 < even["conv1"] / even["conv2"] < 3  # the same rate: Adam moves every weight about as much
    assert discriminative["conv1"] / discriminative["conv2"] < 0.05  # the lowest group at 1/100 of the top rate
    assert discriminative["conv2"] == pytest.approx(even["conv2"], rel=0.5)


@pytest.mark.parametrize("bn", ["frozen", "affine", "train"])
def test_batchnorm_modes_train_what_they_say(weak_head, bn):
    model, pixels, y, groups = _network(weak_head)
    layer = next(leaf for leaf in _leaves(model) if leaf.name == "bn1")
    gamma, beta, mean, variance = (w.copy() for w in layer.get_weights())
    _train_steps(model, groups, FineTuneConfig(batch_size=8, bn=bn), pixels, y, 1e-2, 1)
    after = layer.get_weights()
    affine_moved = not (np.array_equal(gamma, after[0]) and np.array_equal(beta, after[1]))
    statistics_moved = not (np.array_equal(mean, after[2]) and np.array_equal(variance, after[3]))
    assert (affine_moved, statistics_moved) == {
        "frozen": (False, False),
        "affine": (True, False),
        "train": (True, True),
    }[bn]


@pytest.mark.slow
def test_learning_rate_finder_lands_in_the_good_range_and_keeps_its_curve(weak_head, tmp_path):
    from bottleneck.learn import finetune

    # Unsoftened, so that the finder sweeps the very network whose good range is measured below.
    tuned = fine_tune(weak_head, FineTuneConfig(learning_rate="auto", epochs=1, batch_size=8, soften=False), tmp_path)
    curve = json.loads((tuned.run_dir / "lr_find.json").read_text())
    assert (tuned.run_dir / "lr_find.png").stat().st_size > 1000
    chosen = curve["chosen"]
    assert tuned.metrics["learning_rate"] == chosen == tuned.metrics["lr_find"]["chosen"]
    assert len(curve["rates"]) == len(curve["smoothed"]) >= 50 and curve["rates"][0] == finetune.FINDER_LOW

    # The good range, measured: rates whose 10 epochs at least halve the training loss (here 1e-2 and 1e-1;
    # 1e-3 leaves 0.64 of 1.0).
    model, pixels, y, groups = _network(weak_head)
    start = model.get_weights()

    def loss_after(rate: float) -> float:
        model.set_weights(start)
        _train_steps(model, groups, FineTuneConfig(batch_size=8), pixels, y, rate, 10)
        proba = model.predict(pixels.astype(np.float32), verbose=0)
        return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-7, 1))))

    initial = loss_after(1e-12)
    good = [rate for rate in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1) if loss_after(rate) < initial / 2]
    assert good and min(good) / 3 <= chosen <= max(good) * 3, (chosen, good)


@pytest.mark.slow
def test_a_split_over_the_memory_budget_is_decoded_per_batch_with_the_same_result(parent, tmp_path):
    _, _, _, run = parent
    config = FineTuneConfig(epochs=2, learning_rate="auto", batch_size=8, patience=10, augment=("flip", "crop"))
    said: list[str] = []
    streamed = fine_tune(run, config, tmp_path / "streamed", log=said.append, max_memory=1000)
    assert any("are over the memory budget" in line and "per batch" in line for line in said), said
    held = fine_tune(run, config, tmp_path / "held", max_memory=2**30)
    assert streamed.metrics["learning_rate"] == held.metrics["learning_rate"]
    np.testing.assert_allclose(streamed.metrics["history"]["val_loss"], held.metrics["history"]["val_loss"], rtol=1e-6)
    for name in ("train", "validation", "test"):
        assert streamed.metrics["splits"][name]["accuracy"] == held.metrics["splits"][name]["accuracy"]
        assert abs(streamed.metrics["splits"][name]["log_loss"] - held.metrics["splits"][name]["log_loss"]) < 1e-6


def test_a_damaged_optimizer_file_starts_the_optimizer_afresh_not_a_traceback(tmp_path):
    """Resuming reads the last epoch's optimizer.npz; a cut, garbled or renamed one means a fresh optimizer."""
    from bottleneck.learn.finetune_work import _WorkFolder

    class Variable:
        def __init__(self, shape):
            self.shape, self.value = shape, None

        def assign(self, array):
            self.value = array

    work = _WorkFolder(tmp_path)
    state = {"files": {"optimizer": "opt.npz"}}
    np.savez(tmp_path / "opt.npz", v0=np.ones(3), v1=np.zeros((2, 2)))
    vs = [Variable((3,)), Variable((2, 2))]
    assert work.restore_optimizer(vs, state) and vs[1].value.shape == (2, 2)
    good = (tmp_path / "opt.npz").read_bytes()
    for damaged in (
        good[: len(good) // 2],
        b"PK\x03\x04" + b"\x00" * 40,
        b"garbage",
        good.replace(b"v1.npy", b"w1.npy"),
    ):
        (tmp_path / "opt.npz").write_bytes(damaged)
        assert not work.restore_optimizer([Variable((3,)), Variable((2, 2))], state), damaged[:10]
    assert not work.restore_optimizer(vs, {"files": {}})
