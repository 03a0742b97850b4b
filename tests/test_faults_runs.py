"""Runs are data, not code: opening a run someone sent never runs what is inside it, and a head that does
not belong to its run is one line naming the file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from bottleneck.cli import main

from .conftest import PIXELS, make_dataset


class _Payload:
    """Unpickling this creates the file it names: what a hostile model.joblib would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs-as-data")
    two, three = root / "two", root / "three"
    make_dataset(two, per_class=6, classes={"ant": (200, 40, 40), "bee": (40, 180, 60)})
    make_dataset(three, per_class=6)
    made = {}
    for name, data in (("two", two), ("three", three)):
        assert main(["features", str(data), "--cache", str(root / "cache"), *PIXELS, "--no-progress"]) == 0
        for head in ("logreg", "keras"):
            out = root / f"runs-{name}-{head}"
            extra = ["--epochs", "3"] if head == "keras" else []
            assert (
                main(
                    [
                        "train-head",
                        "--data",
                        str(data),
                        "--cache",
                        str(root / "cache"),
                        *PIXELS,
                        "--head",
                        head,
                        "--runs",
                        str(out),
                        *extra,
                    ]
                )
                == 0
            )
            [made[f"{name}-{head}"]] = list(out.iterdir())
    return root, made


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


def _predict(run: Path, image: Path, capsys) -> tuple[int, list[str]]:
    code = main(["predict", "--run", str(run), str(image)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err.strip().splitlines()


def _an_image(root: Path) -> Path:
    return next((root / "two" / "ant").iterdir())


def test_a_hostile_pickle_in_a_run_is_never_loaded(runs, tmp_path, capsys):
    root, made = runs
    run = _copy(made["two-logreg"], tmp_path)
    marker = tmp_path / "pwned"
    with open(run / "model.joblib", "wb") as handle:  # the convenience pickle, replaced by a payload
        pickle.dump(_Payload(marker), handle)
    code, _ = _predict(run, _an_image(root), capsys)
    assert code == 0 and not marker.exists()  # predicted from head.npz; the pickle never opened

    # A run that names the pickle as its head (as runs made before head.npz did) is refused, unopened.
    config = json.loads((run / "config.json").read_text())
    config["model"] = "model.joblib"
    (run / "config.json").write_text(json.dumps(config))
    (run / "head.npz").unlink()
    code, err = _predict(run, _an_image(root), capsys)
    assert code == 2 and not marker.exists()
    assert err[-1].startswith(
        f"bottleneck: error: {run} keeps its head as a pickle (model.joblib), which "
        "bottleneck does not load: a pickle runs code when it is opened"
    )
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 2
    assert not marker.exists() and "keeps its head as a pickle" in capsys.readouterr().err


def test_a_pickle_hidden_in_head_npz_is_refused(runs, tmp_path, capsys):
    root, made = runs
    run = _copy(made["two-logreg"], tmp_path)
    marker = tmp_path / "pwned"
    with np.load(run / "head.npz") as data:
        arrays = {name: data[name] for name in data.files}
    arrays["classes"] = np.array([_Payload(marker), "bee"], dtype=object)
    with open(run / "head.npz", "wb") as handle:
        np.savez(handle, **arrays)
    code, err = _predict(run, _an_image(root), capsys)
    assert code == 2 and not marker.exists()
    assert err[-1].startswith(f"bottleneck: error: {run / 'head.npz'} holds something other than plain arrays")


def test_a_head_of_another_run_is_one_line_naming_the_file(runs, tmp_path, capsys):
    root, made = runs
    for head, name in (("logreg", "head.npz"), ("keras", "model.keras")):
        run = _copy(made[f"two-{head}"], tmp_path / head)
        shutil.copy(made[f"three-{head}"] / name, run / name)  # a 3-class colour head in the ants/bees run
        if head == "keras":
            shutil.copy(made[f"three-{head}"] / "labels.json", run / "labels.json")
        code, err = _predict(run, _an_image(root), capsys)
        assert code == 2, err
        assert err[-1].startswith(
            f"bottleneck: error: {run / name} classifies blue, green, red, but the run was "
            "trained on ant, bee: the head belongs to another run"
        )
    # A Keras head whose labels.json was swapped: the outputs and the labels disagree.
    run = _copy(made["two-keras"], tmp_path / "labels")
    shutil.copy(made["three-keras"] / "labels.json", run / "labels.json")
    code, err = _predict(run, _an_image(root), capsys)
    assert code == 2 and err[-1] == (
        f"bottleneck: error: {run / 'model.keras'} gives 2 probabilities, but "
        f"{run / 'labels.json'} lists 3 labels: the head or the labels belong to another run"
    )
    # A config.json of another run: its labels are not the head's.
    run = _copy(made["two-logreg"], tmp_path / "config")
    shutil.copy(made["three-logreg"] / "config.json", run / "config.json")
    code, err = _predict(run, _an_image(root), capsys)
    assert code == 2 and "the head belongs to another run" in err[-1]


def test_a_head_for_another_feature_width_is_one_line(runs, tmp_path, capsys):
    root, made = runs
    run = _copy(made["two-logreg"], tmp_path)
    with np.load(run / "head.npz") as data:
        arrays = {name: data[name] for name in data.files}
    arrays.update(mean=np.zeros(10), scale=np.ones(10), coef=np.ones((1, 10)))
    with open(run / "head.npz", "wb") as handle:
        np.savez(handle, **arrays)
    code, err = _predict(run, _an_image(root), capsys)
    assert code == 2 and err[-1] == (
        f"bottleneck: error: {run / 'head.npz'} takes 10 features, but the run's backbone "
        "gives 192: the head belongs to another run"
    )


@pytest.mark.parametrize("name", ["head.npz", "model.keras"])
def test_random_bytes_as_a_head_are_one_line_naming_the_file(runs, tmp_path, capsys, name):
    root, made = runs
    run = _copy(made["two-logreg" if name == "head.npz" else "two-keras"], tmp_path)
    (run / name).write_bytes(os.urandom(4096))
    code, err = _predict(run, _an_image(root), capsys)
    assert code == 2 and err[-1].startswith(f"bottleneck: error: {run / name} is not a")


def test_a_keras_head_with_a_lambda_layer_is_refused_without_running_it(runs, tmp_path, capsys):
    import keras

    root, made = runs
    run = _copy(made["two-keras"], tmp_path)
    inputs = keras.Input((192,))
    outputs = keras.layers.Lambda(lambda x: x[:, :2] * 0 + 0.5)(inputs)
    keras.Model(inputs, outputs).save(run / "model.keras")
    code, err = _predict(run, _an_image(root), capsys)
    assert code == 2 and err[-1].startswith(
        f"bottleneck: error: {run / 'model.keras'} is not a Keras head this run can load"
    )


def test_test_predictions_header_is_unambiguous_for_classes_named_path_and_label(tmp_path):
    import csv

    data, cache, runs_dir = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=5, classes={"path": (200, 40, 40), "label": (40, 180, 60)})
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert main(["train-head", "--data", str(data), "--cache", str(cache), *PIXELS, "--runs", str(runs_dir)]) == 0
    [run] = list(runs_dir.iterdir())
    with open(run / "test_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "predicted", "probability_label", "probability_path"]
    for row in rows:
        assert row["label"] in ("path", "label") and row["path"].startswith(row["label"] + "/")
        assert float(row["probability_label"]) + float(row["probability_path"]) == pytest.approx(1)
