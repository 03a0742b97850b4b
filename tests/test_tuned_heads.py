"""Heads that tune themselves: logreg's C chosen by cross-validation (`--C auto`, the default), and the knn head
(cosine, k chosen on validation): what they choose, what the run records, and every path a run goes through."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.errors import BottleneckError
from bottleneck.features.extract import extract_features
from bottleneck.learn.head_file import HeadFileError, load_head, load_knn
from bottleneck.learn.heads import C_GRID, KnnHead, LogRegHead
from bottleneck.learn.run_folder import load_run
from bottleneck.learn.runs import HeadConfig, train_head
from bottleneck.learn.splits import SplitConfig

from .conftest import make_dataset

SPEC = BackboneSpec(architecture="pixels", image_size=8)
PIXELS = ["--backbone", "pixels", "--image-size", "8"]
SPLIT = SplitConfig(val_pct=20, test_pct=20, seed=1)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    data, cache = root / "data", root / "cache"
    make_dataset(data, per_class=10)
    extract_features(data, cache, SPEC)
    return data, cache


def blobs(n_per_class: int, dim: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian classes around random unit directions (cosine neighbours tell them apart)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim))
    X = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.array(["a", "b", "c"]), n_per_class)


def test_C_auto_cross_validates_train_and_validation_and_refits_on_train():
    X, y = blobs(30, 12, 3.0)
    Xv, yv = blobs(10, 12, 3.0, seed=1)
    head = LogRegHead(C="auto").fit(X, y, validation_data=(Xv, yv))
    search = head.C_search_
    assert search["grid"] == list(C_GRID) and search["folds"] == 5 and search["rows"] == 90 + 30
    accuracy, loss = search["scores"]["mean_accuracy"], search["scores"]["mean_log_loss"]
    best = max(accuracy)
    assert (
        head.C_
        == search["C"]
        == min((c for c, a in zip(C_GRID, accuracy) if a == best), key=lambda c: loss[C_GRID.index(c)])
    )
    assert head.pipeline_[-1].C == head.C_  # the refit used the chosen C ...
    refit = LogRegHead(C=head.C_).fit(X, y)  # ... on the training rows only
    np.testing.assert_array_equal(head.predict_proba(Xv), refit.predict_proba(Xv))
    # Without validation rows, the folds are of the training rows alone.
    assert LogRegHead(C="auto").fit(X, y).C_search_["rows"] == 90


def test_C_auto_with_a_class_too_small_to_fold_keeps_1_and_says_why():
    X, y = blobs(4, 8, 1.0)
    head = LogRegHead(C="auto").fit(X[:9], y[:9])  # class 'c' has a single image
    assert head.C_ == 1.0 and "single" in head.C_search_["reason"]


@pytest.mark.slow
def test_C_auto_multi_label_shares_one_C_by_binary_cross_entropy():
    X, y = blobs(12, 6, 1.0)
    labels = np.empty(len(y), dtype=object)
    labels[:] = [(label, "x") if i % 2 else (label,) for i, label in enumerate(y)]
    head = LogRegHead(C="auto", multi_label=True).fit(X, labels)
    scores = head.C_search_["scores"]["mean_binary_cross_entropy"]
    assert head.C_ == C_GRID[int(np.argmin(scores))] and list(head.classes_) == ["a", "b", "c", "x"]


def test_train_head_records_the_chosen_C_and_a_given_C_is_kept(extracted, tmp_path):
    data, cache = extracted
    auto = train_head(data, cache, tmp_path / "runs", None, HeadConfig("logreg"), SPLIT)
    config = json.loads((auto.run_dir / "config.json").read_text())
    params = config["params"]
    assert params["C"] in C_GRID and params["C_grid"] == list(C_GRID) and config["tuning"]["C"]["folds"] >= 2
    assert len(config["tuning"]["C"]["scores"]["mean_accuracy"]) == len(C_GRID)
    assert auto.metrics["params"] == params and auto.metrics["tuning"] == config["tuning"]
    from bottleneck.inspect.report import Run

    shown = Run("x", auto.run_dir, config, auto.metrics).settings()
    assert shown == f"C={params['C']}"  # the report names the chosen C, not the grid
    assert load_head(auto.run_dir / "head.npz").coef.shape[1] == SPEC.feature_dim
    fixed = train_head(data, cache, tmp_path / "runs", None, HeadConfig("logreg", C=0.5), SPLIT)
    fixed_config = json.loads((fixed.run_dir / "config.json").read_text())
    assert fixed_config["params"] == {"C": 0.5} and fixed_config["tuning"] == {}


def test_streamed_C_auto_keeps_1_and_records_why(extracted, tmp_path):
    data, cache = extracted
    lines = []
    result = train_head(
        data, cache, tmp_path / "runs", None, HeadConfig("logreg"), SPLIT, stream=True, chunk_rows=7, log=lines.append
    )
    assert result.metrics["params"]["C"] == 1.0 and "streamed" in result.metrics["tuning"]["C"]["reason"]
    assert any(line.startswith("C 1 (kept: features streamed") for line in lines)


def test_knn_chooses_k_on_validation_and_votes_by_cosine_similarity():
    X, y = blobs(15, 20, 2.0)
    Xv, yv = blobs(5, 20, 2.0, seed=3)
    head = KnnHead().fit(X, y, validation_data=(Xv, yv))
    search = head.k_search_
    assert search["chosen_on"] == "validation" and search["grid"] == [1, 3, 5, 7, 9, 11, 15, 21, 31]
    best = max(search["accuracy"])
    assert head.k_ == min(
        (k for k, a in zip(search["grid"], search["accuracy"]) if a == best),
        key=lambda k: search["log_loss"][search["grid"].index(k)],
    )
    # By hand: cosine similarities, the k most similar, similarity-weighted vote shares.
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    query = Xv[:4] / np.linalg.norm(Xv[:4], axis=1, keepdims=True)
    expected = np.zeros((4, 3))
    for row, sims in enumerate(query @ unit.T):
        for j in np.argsort(-sims, kind="stable")[: head.k_]:
            expected[row, "abc".index(y[j])] += max(sims[j], 1e-6)
    np.testing.assert_allclose(head.predict_proba(Xv[:4]), expected / expected.sum(axis=1, keepdims=True), rtol=1e-5)
    assert KnnHead().fit(X, y).k_search_["chosen_on"] == "leave-one-out on the training rows"
    assert KnnHead(k=4).fit(X, y, validation_data=(Xv, yv)).k_ == 4


def test_knn_refuses_multi_label_streaming_and_a_bad_k():
    X, y = blobs(5, 4, 1.0)
    with pytest.raises(BottleneckError, match="one label per image"):
        KnnHead(multi_label=True).fit(X, y)
    with pytest.raises(BottleneckError, match="streamed from the store"):
        KnnHead().fit_rows(None, y)
    with pytest.raises(BottleneckError, match="k must be a whole number"):
        KnnHead(k=0).fit(X, y)


def test_knn_run_predicts_through_the_run_folder_and_export_is_refused_in_one_line(extracted, tmp_path, capsys):
    data, cache = extracted
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(cache),
                "--runs",
                str(runs),
                "--head",
                "knn",
                *PIXELS,
                "--val-pct",
                "20",
                "--test-pct",
                "20",
                "--seed",
                "1",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = summary["run_dir"]
    config = json.loads(open(f"{run_dir}/config.json").read())
    assert (
        config["head"] == "knn"
        and config["model"] == "head.npz"
        and config["params"]["k"] in config["params"]["k_grid"]
    )
    assert config["tuning"]["k"]["chosen_on"] == "validation"
    arrays = load_knn(f"{run_dir}/head.npz")
    assert arrays.k == config["params"]["k"] and arrays.features.shape[1] == SPEC.feature_dim
    with pytest.raises(HeadFileError, match="is a knn head"):
        load_head(f"{run_dir}/head.npz")
    run = load_run(run_dir)
    features = np.random.default_rng(0).normal(size=(3, SPEC.feature_dim)).astype(np.float32)
    np.testing.assert_allclose(run.classify(features), arrays.to_head().predict_proba(features))
    assert (
        summary["accuracy"]["test"] == json.loads(open(f"{run_dir}/metrics.json").read())["splits"]["test"]["accuracy"]
    )
    assert main(["export", "--run", run_dir, "--out", str(tmp_path / "export")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert (
        main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(runs), "--k", "3", *PIXELS]) == 2
    )
    assert "--k does not apply to the logreg head" in capsys.readouterr().err


def test_C_takes_auto_or_a_number_on_the_command_line(capsys):
    from bottleneck.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train-head", "--C", "auto"]).C == "auto"
    assert parser.parse_args(["train-head", "--C", "0.25"]).C == 0.25
    with pytest.raises(SystemExit):
        parser.parse_args(["train-head", "--C", "automatic"])
    assert "expected a number (auto or more than 0" in capsys.readouterr().err


def test_pretrain_batch_adapts_to_a_small_source():
    from bottleneck.learn.pretrain import PretrainConfig

    assert PretrainConfig().batch_for(228) == 8  # 287 images (80% train): 29 steps per epoch, not 4 of 64
    assert PretrainConfig().batch_for(900) == 30 and PretrainConfig().batch_for(100_000) == 64
    assert PretrainConfig(batch_size=16).batch_for(228) == 16


@pytest.mark.slow
def test_pretrain_shows_a_line_per_epoch_with_its_scores_and_eta(tmp_path, capsys):
    from bottleneck.learn.pretrain import PretrainConfig, pretrain

    make_dataset(tmp_path / "source", per_class=6)
    lines = []
    pretrain(
        tmp_path / "source",
        tmp_path / "base.keras",
        PretrainConfig(image_size=16, blocks=1, filters=4, epochs=2),
        log=lines.append,
        progress=True,
    )
    err = capsys.readouterr().err.splitlines()
    assert "batches of 8" in lines[0]
    assert [line.split("  ")[0] for line in err[:2]] == ["pretrain: epoch 1/2", "pretrain: epoch 2/2"]
    assert "val_acc" in err[0] and "ETA" in err[0] and err[2].startswith("pretrain: 2 epochs in")


@pytest.mark.slow
def test_keras_head_shows_its_epochs_only_when_verbose(capsys):
    from bottleneck.learn.heads import KerasHead

    X, y = blobs(10, 4, 1.0)
    Xv, yv = blobs(3, 4, 1.0, seed=1)
    KerasHead(epochs=3, patience=5).fit(X, y, validation_data=(Xv, yv))
    assert capsys.readouterr().err == ""
    head = KerasHead(epochs=3, patience=5, verbose=1).fit(X, y, validation_data=(Xv, yv))
    err = capsys.readouterr().err.splitlines()
    assert (
        err[0].startswith("keras head: epoch 1/3  loss ")
        and "ETA" in err[0]
        and err[-1].startswith("keras head: 3 epochs")
    )
    assert len(head.history_["loss"]) == 3


def test_keras_head_batch_gives_about_20_steps_per_epoch():
    from bottleneck.learn.heads import KerasHead

    assert KerasHead()._batch(50) == 8 and KerasHead()._batch(600) == 30 and KerasHead()._batch(10**6) == 64
    assert KerasHead(batch_size=5)._batch(10**6) == 5


def test_train_head_cli_shows_the_keras_heads_epochs(extracted, tmp_path, capsys):
    data, cache = extracted
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(cache),
                "--runs",
                str(tmp_path / "runs"),
                *PIXELS,
                "--head",
                "keras",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "keras head: epoch 1/2  loss " in err and "keras head: 2 epochs in" in err


def test_c_auto_cross_validates_on_a_bounded_stratified_sample(monkeypatch):
    """The search's cost stays bounded on a large training set: C is chosen on a seeded sample, every class in it."""
    import bottleneck.learn.heads as heads

    monkeypatch.setattr(heads, "C_SEARCH_ROWS", 60)
    rng = np.random.default_rng(0)
    y = np.array(["a"] * 150 + ["b"] * 40 + ["c"] * 10)
    X = rng.normal(size=(200, 5)) + (y[:, None] == "a") * 2.0
    head = LogRegHead(C="auto").fit(X, y)
    assert head.C_search_["rows"] == 60 and head.C_search_["C"] in C_GRID
    sample_X, sample_y = heads._search_sample(X, y, False, 0, 60)
    assert dict(zip(*np.unique(sample_y, return_counts=True))) == {"a": 45, "b": 12, "c": 3}  # stratified
    assert np.array_equal(heads._search_sample(X, y, False, 0, 60)[0], sample_X)  # seeded
    assert head.n_features_in_ == 5 and len(head.predict(X)) == 200  # the final fit used every row
