"""Heads on stores larger than memory: `--max-memory`, streamed training, same results, bounded memory."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.features.extract import extract_features
from bottleneck.features.store import FeatureStore
from bottleneck.learn.head_file import arrays_from_pipeline, load_head
from bottleneck.learn.memory import MemoryBudgetError, parse_size, plan_memory
from bottleneck.learn.run_folder import PREDICTIONS_FILE, PROBABILITY_PREFIX
from bottleneck.learn.runs import HeadConfig, train_head
from bottleneck.learn.splits import SplitConfig

from .conftest import make_dataset

SPEC = BackboneSpec(architecture="pixels", image_size=16)  # 768 features
SPLIT = SplitConfig(val_pct=20, test_pct=30, seed=2)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    data, cache = root / "data", root / "cache"
    make_dataset(data, per_class=10)
    extract_features(data, cache, SPEC)
    return data, cache


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "training_seconds"}


def test_sizes_parse_and_bad_budgets_are_one_line(extracted, tmp_path, capsys):
    assert parse_size("512M") == 512 * 2**20 and parse_size("2G") == 2 * 2**30
    assert parse_size("1.5GB") == 3 * 2**29 and parse_size("64KiB") == 65536 and parse_size("1000") == 1000
    for bad in ("lots", "0", "-5M", "5X"):
        with pytest.raises(MemoryBudgetError, match="^--max-memory"):
            parse_size(bad)
    assert plan_memory(100, 2048, 10 * 2**20).mode == "in-memory"
    big = plan_memory(10**6, 2048, 256 * 2**20)
    assert big.streamed and big.chunk_rows == 8192 // 2 and "exceed the memory budget" in big.reason
    data, cache = extracted
    runs = tmp_path / "runs"
    base = ["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(runs)]
    assert main(base + ["--max-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bottleneck: error: --max-memory 'lots' is not a size") and err.count("\n") == 1
    assert main(base + ["--max-memory", "50K"]) == 2  # the 30 rows do not fit; nor does one chunk of 64
    err = capsys.readouterr().err
    assert "cannot hold one batch of 64 rows of 768 features" in err and err.count("\n") == 1
    assert not runs.exists() or not any(runs.iterdir())


def test_streamed_logreg_equals_in_memory_repeats_and_predicts(extracted, tmp_path):
    from bottleneck.use.predict import predict_images

    data, cache = extracted
    runs = tmp_path / "runs"
    in_memory = train_head(data, cache, runs, None, HeadConfig("logreg"), SPLIT)
    streamed = train_head(data, cache, runs, None, HeadConfig("logreg"), SPLIT, stream=True, chunk_rows=4)
    again = train_head(data, cache, runs, None, HeadConfig("logreg"), SPLIT, stream=True, chunk_rows=4)
    assert in_memory.metrics["training"]["mode"] == "in-memory" and in_memory.metrics["training"]["solver"] == "lbfgs"
    training = streamed.metrics["training"]
    assert training["mode"] == "streamed" and training["chunk_rows"] == 4 and training["solver"] == "lbfgs, streamed"
    assert training["converged"] and training["passes"] >= 2 and training["reason"]
    for name in ("train", "validation", "test"):  # the same objective, solved to the same tolerance
        a, b = in_memory.metrics["splits"][name], streamed.metrics["splits"][name]
        assert a["accuracy"] == b["accuracy"] and abs(a["log_loss"] - b["log_loss"]) < 1e-3
    assert without_timing(again.metrics) == without_timing(streamed.metrics)
    predictions = (streamed.run_dir / PREDICTIONS_FILE).read_text()
    assert predictions == (again.run_dir / PREDICTIONS_FILE).read_text()

    # the artefact is the usual Pipeline, and it folds into one Dense softmax as export does
    pipeline = joblib.load(streamed.run_dir / "model.joblib")
    assert list(pipeline.classes_) == ["blue", "green", "red"]
    store = FeatureStore(cache, SPEC.fingerprint(), SPEC.feature_dim, {})
    X = store.read_rows_at(np.arange(6))
    kernel, bias = arrays_from_pipeline(pipeline).as_dense()
    np.testing.assert_allclose(
        load_head(streamed.run_dir / "head.npz").predict_proba(X), pipeline.predict_proba(X), rtol=0, atol=0
    )
    logits = X @ kernel + bias
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), pipeline.predict_proba(X), atol=1e-5)

    # predict reproduces the streamed run's recorded test predictions
    with open(streamed.run_dir / PREDICTIONS_FILE, newline="") as handle:
        rows = list(csv.reader(handle))
    labels = [name.removeprefix(PROBABILITY_PREFIX) for name in rows[0][3:]]
    recorded = {row[0]: np.array([float(v) for v in row[3:]]) for row in rows[1:]}
    result = predict_images(streamed.run_dir, [str(data / path) for path in recorded], top=len(labels))
    assert result.computed == 0
    for path, prediction in zip(recorded, result.predictions):
        got = dict(prediction.top)
        np.testing.assert_allclose([got[label] for label in labels], recorded[path], atol=1e-6)


@pytest.mark.slow
def test_streamed_keras_repeats_and_streamed_folds(extracted, tmp_path):
    data, cache = extracted
    runs = tmp_path / "runs"
    head = HeadConfig("keras", epochs=6, batch_size=4)
    first = train_head(data, cache, runs, None, head, SPLIT, stream=True, chunk_rows=8)
    second = train_head(data, cache, runs, None, head, SPLIT, stream=True, chunk_rows=8)
    assert first.metrics["training"]["mode"] == "streamed" and first.metrics["training"]["solver"] == "adam, streamed"
    assert (first.run_dir / "model.keras").exists() and "val_loss" in first.metrics["history"]
    for name in ("train", "validation", "test"):
        a, b = first.metrics["splits"][name], second.metrics["splits"][name]
        assert a["accuracy"] == b["accuracy"] and abs(a["log_loss"] - b["log_loss"]) < 1e-6
    assert first.metrics["splits"]["train"]["accuracy"] >= 0.9
    logreg = HeadConfig("logreg", C=1.0)  # the C a streamed search keeps: the same objective in every fold
    folded = train_head(data, cache, runs, None, logreg, SPLIT, folds=3, stream=True, chunk_rows=8)
    plain = train_head(data, cache, runs, None, logreg, SPLIT, folds=3)
    assert folded.metrics["cross_validation"]["accuracy"] == plain.metrics["cross_validation"]["accuracy"]


_TRAIN_IN_A_SUBPROCESS = r"""
import json, sys
from pathlib import Path
import numpy as np
import h5py, scipy.optimize, scipy.special, sklearn.linear_model, sklearn.metrics, sklearn.pipeline, sklearn.preprocessing  # noqa: F401
import bottleneck.learn.domain, bottleneck.learn.metrics  # noqa: F401
from bottleneck.features.store import FeatureStore
from bottleneck.learn.dataset import FeatureRows, LabelledFeatures
from bottleneck.learn.memory import parse_size, plan_memory
from bottleneck.learn.runs import HeadConfig, train_on_features
from bottleneck.learn.splits import SplitConfig

cache, runs, budget, dim = Path(sys.argv[1]), Path(sys.argv[2]), parse_size(sys.argv[3]), int(sys.argv[4])

def status(field):  # VmHWM, unlike ru_maxrss, does not inherit the forking parent's peak
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
store = FeatureStore(cache, "synthetic", dim, {})
index = store.index()
paths, attrs = list(index.source_path), index.attrs
del index
memory = plan_memory(len(paths), dim, budget)
rows = FeatureRows(store=store, rows=np.arange(len(paths)), dim=dim, chunk_rows=memory.chunk_rows)
data = LabelledFeatures(paths, [p.split("/")[0] for p in paths], rows, store.path, attrs, memory=memory)
result = train_on_features(data, runs, HeadConfig("logreg", C=0.1), SplitConfig(seed=0))
peak = status("VmHWM")
print(json.dumps({"growth": peak - base, "training": result.metrics["training"], "accuracy": result.accuracy()}))
"""


def synthetic_store(cache: Path, rows: int, dim: int, classes: int = 5, seed: int = 0) -> None:
    """`rows` float32 rows of `dim` features around `classes` separable centres, committed in batches."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    store = FeatureStore(cache, "synthetic", dim, {"feature_dim": dim, "pretrained": True, "warning": ""})
    labels = np.arange(rows) % classes
    with store.writer() as writer:
        for start in range(0, rows, 4096):
            at = np.arange(start, min(rows, start + 4096))
            x = centres[labels[at]] * 0.15 + rng.normal(0, 1, (len(at), dim)).astype(np.float32)
            writer.commit(
                [hashlib.sha256(str(i).encode()).hexdigest() for i in at],
                x,
                [f"c{labels[i]}/img{i:06d}.png" for i in at],
            )
        writer.finish()


@pytest.mark.slow
def test_peak_memory_stays_within_the_budget_on_a_store_four_times_larger(tmp_path):
    rows, dim, budget = 16000, 1024, 16 * 2**20  # 62.5 MiB of features, 16 MiB budget
    synthetic_store(tmp_path / "cache", rows, dim)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _TRAIN_IN_A_SUBPROCESS,
            str(tmp_path / "cache"),
            str(tmp_path / "runs"),
            "16M",
            str(dim),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["training"]["mode"] == "streamed" and result["training"]["feature_bytes"] == rows * dim * 4
    assert result["accuracy"]["test"] > 0.8
    # beyond the budget: the labels, paths and row numbers of 16,000 images, the store's layout, and the
    # train-vs-test domain comparison (500 rows a side, kernel matrices: about 26 MiB whatever the store's size)
    footprint = 48 * 2**20
    assert result["growth"] < budget + footprint, result
