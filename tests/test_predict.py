"""`bottleneck predict`: the run's own test predictions reproduced, cache reuse, bad files and bad runs."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.features.extract import extract_features
from bottleneck.learn.run_folder import PREDICTIONS_FILE, PROBABILITY_PREFIX, RunError, load_run
from bottleneck.learn.runs import HeadConfig, train_head
from bottleneck.learn.splits import SplitConfig
from bottleneck.use.predict import predict_images

from .conftest import make_dataset, synthetic_image

SPLIT = SplitConfig(val_pct=20, test_pct=30, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data, cache, runs = root / "data", root / "cache", root / "runs"
    make_dataset(data, per_class=8)
    spec = BackboneSpec(architecture="pixels", image_size=8)  # what predict does around the features is under test
    extract_features(data, cache, spec)
    logreg = train_head(data, cache, runs, spec, HeadConfig("logreg"), SPLIT).run_dir
    keras_run = train_head(data, cache, runs, spec, HeadConfig("keras", epochs=20), SPLIT).run_dir
    return root, data, cache, {"logreg": logreg, "keras": keras_run}


def recorded_test_predictions(run_dir) -> dict[str, tuple[str, np.ndarray]]:
    with open(run_dir / PREDICTIONS_FILE, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return {row[0]: (row[2], np.array([float(v) for v in row[3:]])) for row in reader}, [
            name.removeprefix(PROBABILITY_PREFIX) for name in header[3:]
        ]


@pytest.mark.parametrize("head", ["logreg", "keras"])
def test_predictions_on_the_runs_test_images_equal_the_recorded_ones(trained, head):
    _, data, _, runs = trained
    recorded, labels = recorded_test_predictions(runs[head])
    assert len(recorded) >= 5
    result = predict_images(runs[head], [str(data / path) for path in recorded], top=len(labels))
    assert result.computed == 0 and result.reused == len(recorded)  # all from the cache
    for path, prediction in zip(recorded, result.predictions):
        predicted, probabilities = recorded[path]
        assert prediction.top[0][0] == predicted
        got = dict(prediction.top)
        np.testing.assert_allclose([got[label] for label in labels], probabilities, rtol=0, atol=1e-6)


def test_new_images_are_computed_once_and_bad_files_get_a_reason(trained, tmp_path, capsys):
    _, _, _, runs = trained
    new = tmp_path / "new"
    (new / "nested").mkdir(parents=True)
    synthetic_image((200, 40, 40), seed=777).save(new / "nested" / "red_like.png")
    synthetic_image((30, 60, 200), seed=778).save(new / "blue_like.jpg")
    (new / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    first = predict_images(runs["logreg"], [str(new), str(tmp_path / "absent.jpg")])
    assert (first.computed, first.reused, first.failed) == (2, 0, 2)
    by_path = {p.path: p for p in first.predictions}
    assert by_path[str(new / "nested" / "red_like.png")].top[0][0] == "red"
    assert by_path[str(new / "blue_like.jpg")].top[0][0] == "blue"
    assert len(by_path[str(new / "blue_like.jpg")].top) == 3
    assert by_path[str(new / "broken.png")].error == "truncated image (Truncated File Read)"
    assert by_path[str(tmp_path / "absent.jpg")].error.startswith("cannot read file")
    second = predict_images(runs["logreg"], [str(new)])
    assert second.computed == 0 and second.reused == 2

    assert main(["predict", "--run", str(runs["logreg"]), str(new), "--json", "--top", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {tuple(sorted(line)) for line in lines} == {("path", "top"), ("error", "path")}
    assert all(len(line["top"]) == 2 for line in lines if "top" in line)
    out_csv = tmp_path / "p.csv"
    assert main(["predict", "--run", str(runs["keras"]), str(new), "--csv", str(out_csv)]) == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 3 and rows[0]["path"] and {"label_1", "probability_red", "error"} <= set(rows[0])


def test_nothing_predictable_and_bad_runs_are_one_line_errors(trained, tmp_path, capsys):
    root, _, _, runs = trained
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert main(["predict", "--run", str(runs["logreg"]), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bottleneck: error: no image could be predicted") and "Traceback" not in "".join(err)

    assert main(["predict", "--run", str(tmp_path / "nope"), str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"bottleneck: error: run folder not found: {tmp_path / 'nope'}"
    incomplete = tmp_path / "incomplete"
    shutil.copytree(runs["logreg"], incomplete)
    (incomplete / "head.npz").unlink()
    assert main(["predict", "--run", str(incomplete), str(bad)]) == 2
    assert "is incomplete: its model file head.npz is missing" in capsys.readouterr().err
    (incomplete / "config.json").unlink()
    assert main(["predict", "--run", str(incomplete), str(bad)]) == 2
    assert "not a finished run folder (config.json is missing)" in capsys.readouterr().err


def test_a_retrained_backbone_file_leaves_the_run_its_own_and_old_runs_refuse_it(tmp_path):
    from bottleneck.learn.pretrain import PretrainConfig, pretrain

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=6)
    base = tmp_path / "base.keras"
    pretrain(data, base, PretrainConfig(image_size=16, blocks=2, filters=4, epochs=0))
    spec = BackboneSpec(architecture=str(base), layer="features")
    extract_features(data, cache, spec)
    run = train_head(data, cache, tmp_path / "runs", spec, HeadConfig("logreg"), SPLIT).run_dir
    trained_on = spec.fingerprint()
    assert load_run(run).fingerprint == load_run(run).spec.fingerprint() == trained_on
    pretrain(data, base, PretrainConfig(image_size=16, blocks=2, filters=4, epochs=0, seed=5))
    kept = load_run(run)  # the copy the run keeps by content in the cache (tests/test_travel.py)
    assert kept.fingerprint == trained_on != spec.fingerprint() and kept.spec.architecture != str(base)
    # A run written before backbones were kept names only the path: a retrained file there is refused.
    config = json.loads((run / "config.json").read_text())
    del config["backbone_file"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="has changed since training"):
        load_run(run)


def test_a_run_whose_store_is_gone_recomputes_with_a_warning(trained, tmp_path):
    _, data, _, runs = trained
    copy = tmp_path / "cache"
    messages: list[str] = []
    result = predict_images(load_run(runs["logreg"], copy), [str(data / "red")], log=messages.append)
    assert result.computed == 8 and result.failed == 0
    assert any("is gone; every image is computed and cached anew" in m for m in messages)
    assert predict_images(load_run(runs["logreg"], copy), [str(data / "red")]).computed == 0


def test_a_keras_run_without_its_labels_is_one_line(trained, tmp_path, capsys):
    _, _, _, runs = trained
    broken = tmp_path / "broken"
    shutil.copytree(runs["keras"], broken)
    (broken / "labels.json").unlink()
    assert main(["predict", "--run", str(broken), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"bottleneck: error: {broken} is incomplete: cannot read labels.json (FileNotFoundError)"
    )
