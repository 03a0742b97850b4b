"""Heads trained from the cache: run folders, metrics, reproducibility, reuse of splits, bad input."""

from __future__ import annotations

import json
import re
import shutil

import joblib
import numpy as np
import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.errors import BottleneckError, CacheError, DataError
from bottleneck.features.extract import extract_features
from bottleneck.learn.pretrain import PretrainConfig, pretrain
from bottleneck.learn.runs import HeadConfig, train_head
from bottleneck.learn.splits import SplitConfig, read_split_csv

from .conftest import make_dataset

SPLIT = SplitConfig(val_pct=20, test_pct=20, seed=1)
#: A logreg head with C given: where the split, the folds or the exclusions are the subject, not C's search (36 fits a
#: run, and again in every fold; test_tuned_heads checks it).
LOGREG_C1 = HeadConfig("logreg", C=1.0)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """(data, cache, spec): 24 images and a broken one, with features of a small untrained network (random weights,
    which a run must say, at a fraction of InceptionV3's cost)."""
    root = tmp_path_factory.mktemp("runs")
    data, cache = root / "data", root / "cache"
    make_dataset(data, per_class=8)
    (data / "red" / "broken.jpg").write_text("not an image")
    base = root / "untrained.keras"
    pretrain(data, base, PretrainConfig(image_size=16, blocks=2, filters=8, epochs=0))
    spec = BackboneSpec(architecture=str(base), layer="features")
    extract_features(data, cache, spec)
    return data, cache, spec


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "training_seconds"}


def test_logreg_run_folder_has_everything_and_repeats_bit_for_bit(extracted, tmp_path):
    data, cache, spec = extracted
    first = train_head(data, cache, tmp_path / "runs", None, HeadConfig("logreg"), SPLIT)
    names = sorted(p.name for p in first.run_dir.iterdir())
    assert names == ["config.json", "head.npz", "metrics.json", "model.joblib", "split.csv", "test_predictions.csv"]
    metrics = json.loads((first.run_dir / "metrics.json").read_text())
    assert metrics["head"] == "logreg" and metrics["excluded"] == {
        "failed_extraction": 1,
        "not_in_cache": 0,
        "non_finite": 0,
        "exclude_file": 0,
    }
    for name in ("train", "validation", "test"):
        split = metrics["splits"][name]
        assert {"accuracy", "macro_f1", "log_loss", "per_class", "labels", "confusion_matrix"} <= set(split)
        assert split["labels"] == ["blue", "green", "red"]
        assert np.array(split["confusion_matrix"]).sum() == split["images"]
    assert "top5_accuracy" not in metrics["splits"]["test"]  # only 3 classes
    assert not metrics["pretrained"] and "RANDOM WEIGHTS" in metrics["warning"]
    rows = read_split_csv(first.run_dir / "split.csv")
    assert len(rows) == 24 and {s for _, s in rows.values()} == {"train", "validation", "test"}
    config = json.loads((first.run_dir / "config.json").read_text())
    assert config["fingerprint"] == spec.fingerprint() and config["seed"] == 1 and "scikit-learn" in config["versions"]

    pipeline = joblib.load(first.run_dir / "model.joblib")  # plain joblib, no bottleneck needed
    assert list(pipeline.classes_) == ["blue", "green", "red"]

    second = train_head(data, cache, tmp_path / "runs", None, HeadConfig("logreg"), SPLIT)
    assert second.run_dir != first.run_dir
    assert without_timing(second.metrics) == without_timing(first.metrics)


@pytest.mark.slow
def test_keras_head_saves_a_plain_keras_model_and_repeats(extracted, tmp_path):
    import keras

    data, cache, spec = extracted
    head = HeadConfig("keras", epochs=15, dropout=0.2)
    first = train_head(data, cache, tmp_path / "runs", spec, head, SPLIT)
    assert (first.run_dir / "model.keras").exists()
    assert json.loads((first.run_dir / "labels.json").read_text()) == ["blue", "green", "red"]
    assert len(first.metrics["history"]["loss"]) >= 1 and "val_loss" in first.metrics["history"]
    model = keras.saving.load_model(first.run_dir / "model.keras", safe_mode=True)
    assert model.output_shape == (None, 3)
    second = train_head(data, cache, tmp_path / "runs", spec, head, SPLIT)
    for name in ("train", "validation", "test"):
        a, b = first.metrics["splits"][name], second.metrics["splits"][name]
        assert a["accuracy"] == b["accuracy"] and abs(a["log_loss"] - b["log_loss"]) < 1e-6


@pytest.mark.slow
def test_saved_split_is_reused_and_folds_are_reported(extracted, tmp_path):
    data, cache, spec = extracted
    first = train_head(data, cache, tmp_path / "runs", None, LOGREG_C1, SPLIT)
    other_seed = SplitConfig(val_pct=20, test_pct=20, seed=99)
    reused = train_head(
        data,
        cache,
        tmp_path / "runs",
        None,
        LOGREG_C1,
        other_seed,
        split_file=str(first.run_dir / "split.csv"),
        folds=3,
    )
    assert (reused.run_dir / "split.csv").read_text() == (first.run_dir / "split.csv").read_text()
    cv = reused.metrics["cross_validation"]
    assert cv["folds"] == 3 and len(cv["accuracy"]) == 3 and 0 <= cv["mean_accuracy"] <= 1


def test_new_images_without_features_are_counted_and_named(extracted, tmp_path):
    data, cache, spec = extracted
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    make_dataset(copy, per_class=1, start=90)
    warnings = []
    result = train_head(copy, cache, tmp_path / "runs", None, LOGREG_C1, SPLIT, log=warnings.append)
    assert result.metrics["excluded"]["not_in_cache"] == 3
    assert warnings[0].startswith("warning: 3 images under ") and "run `bottleneck features" in warnings[0]


def test_bad_input_gets_one_clear_line(extracted, tmp_path):
    data, cache, spec = extracted
    with pytest.raises(CacheError, match=r"^no feature cache in .*: run `bottleneck features DATA --cache"):
        train_head(data, tmp_path / "empty-cache", tmp_path / "runs")
    with pytest.raises(
        CacheError,
        match=r"^no features for backbone inception_v3-299-none-\w+ in .*another backbone \("
        + re.escape(spec.fingerprint()),
    ):
        train_head(data, cache, tmp_path / "runs", BackboneSpec(weights="none"))
    lonely = tmp_path / "lonely"
    shutil.copytree(data, lonely)
    for extra in sorted((lonely / "blue").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(DataError, match=r"^class 'blue' has a single image with features; each class needs at least 2"):
        train_head(lonely, cache, tmp_path / "runs")
    with pytest.raises(BottleneckError, match=r"^--epochs does not apply to the logreg head$"):
        train_head(data, cache, tmp_path / "runs", head=HeadConfig("logreg", epochs=5))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_train_head_json(extracted, tmp_path, capsys):
    data, cache, spec = extracted
    code = main(
        [
            "train-head",
            "--data",
            str(data),
            "--cache",
            str(cache),
            "--runs",
            str(tmp_path / "runs"),
            "--head",
            "logreg",
            "--C",
            "0.5",
            "--class-weight",
            "balanced",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == {"run_dir", "accuracy"} and set(summary["accuracy"]) == {"train", "validation", "test"}
    assert "WARNING: RANDOM WEIGHTS" in err
    code = main(
        ["train-head", "--data", str(data), "--cache", str(tmp_path / "nothing"), "--runs", str(tmp_path / "r")]
    )
    assert code == 2 and capsys.readouterr().err.startswith("bottleneck: error: no feature cache in ")


def test_top5_accuracy_only_over_five_classes():
    from bottleneck.learn.metrics import split_metrics

    labels = [f"c{i}" for i in range(7)]
    proba = np.eye(7)[[1, 2, 3, 4, 5, 6, 0]] * 0.5 + np.eye(7) * 0.3 + 0.2 / 7
    result = split_metrics(proba, labels, labels)
    assert result["accuracy"] == 0.0 and result["top5_accuracy"] == 1.0
    assert "top5_accuracy" not in split_metrics(np.eye(3), labels[:3], labels[:3])


@pytest.mark.slow
def test_logreg_training_never_loads_tensorflow(extracted, tmp_path):
    data, cache, spec = extracted
    probe = (
        "import sys\n"
        "from bottleneck.cli import main\n"
        f"code = main(['train-head', '--data', {str(data)!r}, '--cache', {str(cache)!r}, '--runs', {str(tmp_path)!r}])\n"
        "assert code == 0 and 'tensorflow' not in sys.modules, sorted(m for m in sys.modules if 'tensorflow' in m)[:3]\n"
        "print('ok')\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def _split_rows(run_dir) -> dict[str, str]:
    return {path: split for path, (_, split) in read_split_csv(run_dir / "split.csv").items()}


def _predicted_paths(run_dir) -> list[str]:
    import csv

    with open(run_dir / "test_predictions.csv", newline="") as handle:
        return [row["path"] for row in csv.DictReader(handle)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["drawn", "split-file", "split-folders", "streamed"])
def test_exclude_never_changes_the_test_split(tmp_path, variant):
    """A planted exclude list naming test, validation and training images: the run with it is scored on exactly
    the test images of the run without it (the listed test images too); only training and validation shrink."""
    pixels = BackboneSpec(architecture="pixels", image_size=8)
    data, cache = tmp_path / "data", tmp_path / "cache"
    if variant == "split-folders":
        make_dataset(data / "train", per_class=12)
        make_dataset(data / "val", per_class=3, start=50)
        make_dataset(data / "test", per_class=3, start=80)
    else:
        make_dataset(data, per_class=14)
    extract_features(data, cache, pixels)
    options = dict(stream=True, chunk_rows=5) if variant == "streamed" else {}
    split_file = None
    if variant == "split-file":  # a saved split, written from a first draw
        first = train_head(data, cache, tmp_path / "first", None, LOGREG_C1, SPLIT)
        split_file = str(first.run_dir / "split.csv")
    plain = train_head(data, cache, tmp_path / "runs", None, LOGREG_C1, SPLIT, split_file, **options)
    splits = _split_rows(plain.run_dir)
    by_split = {name: sorted(p for p, s in splits.items() if s == name) for name in ("train", "validation", "test")}
    listed = by_split["test"][:2] + by_split["validation"][:1] + by_split["train"][:3]
    listing = tmp_path / "exclude.txt"
    listing.write_text("# planted\n" + "\n".join(listed) + "\n")

    cleaned = train_head(
        data, cache, tmp_path / "runs", None, LOGREG_C1, SPLIT, split_file, exclude=str(listing), **options
    )
    after = _split_rows(cleaned.run_dir)
    assert sorted(p for p, s in after.items() if s == "test") == by_split["test"]  # path for path
    assert _predicted_paths(cleaned.run_dir) == _predicted_paths(plain.run_dir)  # the listed test images are scored
    assert set(by_split["test"][:2]) <= set(_predicted_paths(cleaned.run_dir))
    assert (
        cleaned.metrics["splits"]["test"]["images"]
        == plain.metrics["splits"]["test"]["images"]
        == len(by_split["test"])
    )
    assert not set(listed[2:]) & set(after)  # the listed validation and training images are gone
    assert len(after) == len(splits) - 4
    record = json.loads((cleaned.run_dir / "config.json").read_text())["exclude"]
    assert {k: record[k] for k in ("listed", "left_out", "train", "validation", "test_kept")} == {
        "listed": 6,
        "left_out": 4,
        "train": 3,
        "validation": 1,
        "test_kept": 2,
    }
    assert (
        cleaned.metrics["excluded"]["exclude_file"] == 4 and cleaned.metrics["excluded"]["exclude_file_test_kept"] == 2
    )
    assert (
        "accuracy_ci" in cleaned.metrics["splits"]["test"] and "accuracy_ci" not in cleaned.metrics["splits"]["train"]
    )


def test_the_bootstrap_interval_covers_the_true_accuracy_at_about_the_nominal_rate():
    """300 simulated test sets of 200 images, each right with probability 0.8: the seeded 95% interval of
    their accuracy should hold 0.8 about 95% of the time (percentile bootstrap: a little under, never far)."""
    from bottleneck.learn.metrics import bootstrap_interval

    rng = np.random.default_rng(42)
    p, n, sets = 0.8, 200, 300
    correct = (rng.random((sets, n)) < p).astype(np.float64)
    intervals = np.array([bootstrap_interval(lambda idx, c=c: c[idx].mean(axis=1), n) for c in correct])
    coverage = np.mean((intervals[:, 0] <= p) & (p <= intervals[:, 1]))
    assert 0.90 <= coverage <= 0.99, coverage
    widths = intervals[:, 1] - intervals[:, 0]
    assert abs(np.median(widths) - 2 * 1.96 * np.sqrt(p * (1 - p) / n)) < 0.02  # the normal approximation's width


def test_split_metrics_carry_seeded_intervals_around_accuracy_and_macro_f1():
    from sklearn.metrics import f1_score

    from bottleneck.learn.metrics import macro_f1_of_resamples, paired_difference, split_metrics

    rng = np.random.default_rng(3)
    labels = ["a", "b", "c"]
    truth = rng.integers(0, 3, 120)
    predicted = np.where(rng.random(120) < 0.7, truth, rng.integers(0, 3, 120))
    proba = np.eye(3)[predicted] * 0.8 + 0.1
    y_true = [labels[t] for t in truth]
    first, again = split_metrics(proba, y_true, labels), split_metrics(proba, y_true, labels)
    assert first["accuracy_ci"] == again["accuracy_ci"] and first["macro_f1_ci"] == again["macro_f1_ci"]  # seeded
    for name in ("accuracy", "macro_f1"):
        low, high = first[f"{name}_ci"]
        assert low < first[name] < high and high - low < 0.25
    # the vectorised macro F1 of a resample is scikit-learn's, a label outside the classes counted as sklearn does
    idx = rng.integers(0, 120, (4, 120))
    with_unknown = np.where(np.arange(120) < 5, 3, truth)
    for b in range(4):
        expected = f1_score(with_unknown[idx[b]], predicted[idx[b]], labels=[0, 1, 2], average="macro", zero_division=0)
        assert macro_f1_of_resamples(with_unknown, predicted, 3, idx[b : b + 1])[0] == pytest.approx(expected)
    same = paired_difference(truth == predicted, truth == predicted)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]
    better = paired_difference(np.ones(120), truth == predicted)
    assert better["difference"] > 0 and better["ci"][0] > 0 and better["images"] == 120
