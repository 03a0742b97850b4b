"""The Python API (`import bottleneck as bn`): the same split and rows as the commands, the heads as
scikit-learn estimators, and the example notebook, executed."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

import bottleneck as bn
from bottleneck.cli import main
from bottleneck.learn.heads import KerasHead, KnnHead, LogRegHead

from .conftest import make_dataset

REPO = Path(__file__).resolve().parents[1]
BACKBONE = dict(backbone="pixels", image_size=8)
#: Enough training for scikit-learn's score checks on its toy sets, and quick.
QUICK_KERAS = dict(epochs=10, learning_rate=0.05, patience=3)


@parametrize_with_checks([LogRegHead(), KnnHead()])
def test_heads_are_scikit_learn_estimators(estimator, check):
    check(estimator)


@pytest.mark.slow
@parametrize_with_checks([LogRegHead(C="auto"), KerasHead(**QUICK_KERAS)])
def test_heads_that_train_longer_are_scikit_learn_estimators(estimator, check):
    check(estimator)  # the keras head passes check_class_weight_classifiers in 10 epochs since its batch adapts


def test_import_is_light_and_the_api_is_listed():
    probe = (
        "import sys, bottleneck as bn; assert 'tensorflow' not in sys.modules and 'sklearn' not in sys.modules; "
        "print(','.join(bn.__all__))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.strip().split(",")) >= {
        "extract",
        "load_features",
        "train_head",
        "Run",
        "FeatureSet",
        "LogRegHead",
        "KerasHead",
        "KnnHead",
    }
    assert bn.LogRegHead is LogRegHead and bn.KnnHead is KnnHead
    with pytest.raises(AttributeError):
        bn.no_such_thing


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("api")
    make_dataset(root / "data", per_class=10)
    summary = bn.extract(root / "data", cache=root / "cache", progress=False, **BACKBONE)
    assert (summary.computed, summary.images) == (30, 30)
    run = bn.train_head(root / "data", cache=root / "cache", runs=root / "runs", seed=3, test_pct=20, **BACKBONE)
    return {"root": root, "run": run}


def test_load_features_splits_exactly_as_train_head(project):
    root = project["root"]
    features = bn.load_features(root / "data", cache=root / "cache", **BACKBONE)
    assert len(features) == 30 and features.classes == ["blue", "green", "red"] and features.in_memory
    split = features.split(seed=3, test_pct=20)
    with open(project["run"].path / "split.csv", newline="") as handle:
        saved = {row["path"]: row["split"] for row in csv.DictReader(handle)}
    assert dict(zip(features.paths, split.of)) == saved == project["run"].split
    (X_train, y_train), (X_test, y_test) = split.arrays("train", "test")
    assert X_train.shape == (len(split.paths("train")), 192) and X_test.dtype == np.float32
    assert list(y_test) == [features.labels[i] for i in split.indices("test")]
    frame = features.to_pandas()
    assert list(frame.columns) == ["path", "label", "split", "content_hash", "features"]
    np.testing.assert_array_equal(np.stack(frame["features"]), features.features)
    with pytest.raises(bn.BottleneckError, match="unknown split"):
        split.paths("dev")


def test_features_past_the_memory_budget_come_in_chunks(project):
    root = project["root"]
    whole = bn.load_features(root / "data", cache=root / "cache", **BACKBONE)
    streamed = bn.load_features(root / "data", cache=root / "cache", stream=True, chunk_rows=8, **BACKBONE)
    assert not streamed.in_memory
    with pytest.raises(bn.BottleneckError, match="iter_chunks"):
        streamed.features
    rows = np.zeros_like(whole.features)
    for positions, chunk in streamed.iter_chunks():
        rows[positions] = chunk
    np.testing.assert_array_equal(rows, whole.features)
    ((X, y),) = streamed.split(seed=3, test_pct=20).arrays("test")
    np.testing.assert_array_equal(X, whole.take(whole.split(seed=3, test_pct=20).indices("test")))


def test_a_run_predicts_as_the_command_does(project, capsys):
    root, run = project["root"], bn.Run.load(project["run"].path)
    rows = run.predict([root / "data" / "red"], top=2)
    capsys.readouterr()
    assert main(["predict", "--run", str(run.path), str(root / "data" / "red"), "--top", "2", "--json"]) == 0
    from_command = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["top"] for r in rows] == [r["top"] for r in from_command] and len(rows) == 10
    features = bn.load_features(root / "data", cache=root / "cache", **BACKBONE)
    probabilities = run.predict_proba(features.features)
    assert probabilities.shape == (30, 3) and np.allclose(probabilities.sum(1), 1)
    assert run.labels == ["blue", "green", "red"] and run.metrics["splits"]["test"]["accuracy"] == 1.0
    with pytest.raises(bn.BottleneckError, match="train_head got unknown settings: colour"):
        bn.train_head(root / "data", cache=root / "cache", runs=root / "runs", colour="red", **BACKBONE)


@pytest.mark.slow
def test_the_example_notebook_runs(tmp_path, monkeypatch):
    """Every code cell of examples/one_cache_many_experiments.ipynb, in order, in one namespace."""
    notebook = json.loads((REPO / "examples" / "one_cache_many_experiments.ipynb").read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "notebook", "exec"), namespace)  # noqa: S102 - our own notebook
    scores = namespace["scores"]
    assert {"kNN", "bottleneck logreg"} <= set(scores) and any(name.startswith("SVM") for name in scores)
    import importlib.util

    assert ("PyTorch linear" in scores) == (importlib.util.find_spec("torch") is not None)
    assert all(score > 0.8 for score in scores.values()), scores
