"""Runs that travel: a `.keras` backbone kept by content in the cache, paths found relative to the run folder.

A run predicts and exports the same after the project folder moves, after `base.keras` is retrained
in place, and when only the run folder and the cache's `backbones/` reach a colleague.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from bottleneck.cli import main
from bottleneck.features.decode import decode_image
from bottleneck.features.hashing import sha256_file
from bottleneck.learn.run_folder import PREDICTIONS_FILE, PROBABILITY_PREFIX

from .conftest import make_dataset

SIZE = 16


def save_base(path, seed: int) -> None:
    """A small conv base with seeded random weights, saved the way Keras saves (the same file rewritten in place)."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(
        6, 3, activation="relu", name="conv", kernel_initializer=keras.initializers.GlorotUniform(seed=seed)
    )(x)
    features = keras.layers.GlobalAveragePooling2D(name="features")(x)
    outputs = keras.layers.Dense(2, activation="softmax")(features)
    keras.Model(inputs, outputs).save(path)


def train_run(project, capsys) -> object:
    """features + train-head on project/base.keras; the new run folder."""
    flags = ["--cache", str(project / "cache"), "--backbone", str(project / "base.keras"), "--layer", "features"]
    assert main(["features", str(project / "data"), *flags, "--no-progress"]) == 0
    before = set((project / "runs").iterdir()) if (project / "runs").is_dir() else set()
    assert (
        main(
            [
                "train-head",
                "--data",
                str(project / "data"),
                *flags,
                "--runs",
                str(project / "runs"),
                "--val-pct",
                "20",
                "--test-pct",
                "30",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    (run,) = set((project / "runs").iterdir()) - before
    return run


@pytest.fixture
def project(tmp_path, capsys):
    project = tmp_path / "project"
    make_dataset(project / "data", per_class=6)
    save_base(project / "base.keras", seed=1)
    return project, train_run(project, capsys)


def recorded(run) -> tuple[list[str], np.ndarray]:
    """The run's test images (relative to DATA) and the probabilities it recorded for them, in label order."""
    with open(run / PREDICTIONS_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = json.loads((run / "config.json").read_text())["labels"]
    return [row["path"] for row in rows], np.array(
        [[float(row[PROBABILITY_PREFIX + label]) for label in labels] for row in rows]
    )


def predicted(run, images: list, capsys, *flags: str) -> tuple[np.ndarray, str]:
    """`bottleneck predict --json` on `images`: every label's probability in the run's label order, and what it said."""
    labels = json.loads((run / "config.json").read_text())["labels"]
    assert main(["predict", "--run", str(run), *map(str, images), "--json", "--top", str(len(labels)), *flags]) == 0
    said = capsys.readouterr()
    lines = [json.loads(line) for line in said.out.splitlines()]
    assert [line["path"] for line in lines] == [str(image) for image in images]
    return np.array(
        [[{t["label"]: t["probability"] for t in line["top"]}[label] for label in labels] for line in lines]
    ), said.err


@pytest.mark.slow
def test_a_moved_project_predicts_and_exports_the_same(project, tmp_path, capsys):
    project, run = project
    config = json.loads((run / "config.json").read_text())
    kept = config["backbone_file"]
    assert kept["sha256"] == sha256_file(project / "base.keras") and kept["name"] == "base"
    assert (run / kept["path"]).resolve() == (project / "cache" / "backbones" / f"{kept['sha256']}.keras").resolve()
    assert config["relative"] == {"store": f"../../cache/{config['fingerprint']}.h5", "data": "../../data"}
    relpaths, expected = recorded(run)

    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    shutil.move(str(project), str(moved))
    moved_run = moved / "runs" / run.name
    got, said = predicted(moved_run, [moved / "data" / path for path in relpaths], capsys)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert f"(computed 0, from the cache {len(relpaths)}, failed 0)" in said  # the moved cache, found from the run

    import keras

    assert main(["export", "--run", str(moved_run), "--out", str(tmp_path / "exported")]) == 0
    summary = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert summary["parity"]["model.keras"]["png"]["images"] >= 5  # the training images found relative to the run
    model = keras.saving.load_model(tmp_path / "exported" / "model.keras")
    pixels = np.stack([decode_image((moved / "data" / path).read_bytes(), SIZE) for path in relpaths]).astype(
        np.float32
    )
    np.testing.assert_allclose(model.predict(pixels, verbose=0), expected, rtol=0, atol=1e-6)


def test_a_retrained_base_leaves_the_old_run_its_own_and_a_new_run_takes_the_new(project, capsys):
    project, run = project
    relpaths, expected = recorded(run)
    images = [project / "data" / path for path in relpaths]
    old_sha = sha256_file(project / "base.keras")
    save_base(project / "base.keras", seed=2)  # Keras rewrites the same file in place: a hard link would follow it
    assert sha256_file(project / "base.keras") != old_sha

    got, _ = predicted(run, images, capsys)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    new_run = train_run(project, capsys)
    new = json.loads((new_run / "config.json").read_text())
    assert new["backbone_file"]["sha256"] == sha256_file(project / "base.keras")
    assert new["fingerprint"] != json.loads((run / "config.json").read_text())["fingerprint"]
    assert sorted(p.name for p in (project / "cache" / "backbones").glob("*.keras")) == sorted(
        [f"{old_sha}.keras", f"{new['backbone_file']['sha256']}.keras"]
    )
    new_got, _ = predicted(new_run, images, capsys)
    assert not np.allclose(new_got, got, atol=1e-6)


def test_the_run_folder_alone_works_with_the_caches_backbones(project, tmp_path, capsys):
    project, run = project
    relpaths, expected = recorded(run)
    kept = json.loads((run / "config.json").read_text())["backbone_file"]
    colleague = tmp_path / "colleague"
    shutil.copytree(run, colleague / "inbox" / "from-alice" / run.name)
    shutil.copytree(project / "cache" / "backbones", colleague / "cache" / "backbones")
    images = colleague / "images"
    images.mkdir()
    for index, path in enumerate(relpaths):
        shutil.copyfile(project / "data" / path, images / f"{index:02d}.png")
    shutil.rmtree(project)  # nothing of the project is left: not base.keras, not its cache

    got, said = predicted(
        colleague / "inbox" / "from-alice" / run.name,
        sorted(images.iterdir()),
        capsys,
        "--cache",
        str(colleague / "cache"),
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert f"(computed {len(relpaths)}, from the cache 0, failed 0)" in said  # the kept backbone computed them
    assert (colleague / "cache" / "backbones" / f"{kept['sha256']}.keras").is_file()


def test_a_run_whose_backbone_is_nowhere_fails_in_one_line_naming_where_it_looked(project, tmp_path, capsys):
    project, run = project
    kept = json.loads((run / "config.json").read_text())["backbone_file"]
    shutil.rmtree(project / "cache" / "backbones")
    save_base(project / "base.keras", seed=3)  # a file at the old path, with other content, is not taken
    image = next((project / "data").rglob("*.png"))
    assert main(["predict", "--run", str(run), str(image)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(
        f"bottleneck: error: the backbone of run {run.name} (base.keras, "
        f"sha256 {kept['sha256'][:12]}) is found nowhere: looked at "
    )
    for looked in (project / "cache" / "backbones" / f"{kept['sha256']}.keras", project / "base.keras"):
        assert str(looked) in error
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exported")]) == 2
    assert "is found nowhere" in capsys.readouterr().err and not (tmp_path / "exported").exists()


@pytest.mark.slow
def test_named_backbones_are_recorded_by_name_and_never_copied(tmp_path, capsys):
    make_dataset(tmp_path / "data", per_class=3)
    cache = tmp_path / "cache"
    for backbone in (
        ["--backbone", "pixels", "--image-size", "4"],
        ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32"],
    ):
        assert main(["features", str(tmp_path / "data"), "--cache", str(cache), *backbone, "--no-progress"]) == 0
        assert (
            main(
                [
                    "train-head",
                    "--data",
                    str(tmp_path / "data"),
                    "--cache",
                    str(cache),
                    "--runs",
                    str(tmp_path / "runs"),
                    *backbone,
                ]
            )
            == 0
        )
    capsys.readouterr()
    configs = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*/config.json")]
    assert sorted(config["backbone_spec"]["architecture"] for config in configs) == ["mobilenet_v2", "pixels"]
    assert all(config["backbone_file"] is None for config in configs)
    assert not (cache / "backbones").exists()


def test_a_fine_tuned_runs_backbone_is_an_explicit_field_and_old_runs_still_read(tmp_path):
    from bottleneck.learn.run_folder import backbone_fingerprint, referenced_fingerprints

    new = {
        "kind": "fine-tune",
        "fingerprint": "base-16-features-aaa",
        "store": None,
        "fine_tuned_from": {"run": "parent", "fingerprint": "base-16-features-aaa"},
    }
    old = {"kind": "fine-tune", "fingerprint": "base-16-features-bbb fine-tuned"}
    head = {"fingerprint": "pixels-4-raw-ccc", "store": "/gone/cache/pixels-4-raw-ccc.h5"}
    assert [backbone_fingerprint(config) for config in (new, old, head)] == [
        "base-16-features-aaa",
        "base-16-features-bbb",
        "pixels-4-raw-ccc",
    ]
    for name, config in {"new": new, "old": old, "head": head}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert referenced_fingerprints([tmp_path]) == {"base-16-features-aaa", "base-16-features-bbb", "pixels-4-raw-ccc"}


def save_weights(path, seed: int) -> None:
    """A no-top MobileNetV3Small's seeded random weights, saved as Keras saves weights files (in place)."""
    import keras

    keras.utils.set_random_seed(seed)
    keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    ).save_weights(path)


@pytest.mark.slow
def test_an_application_keeps_its_weights_file_by_content(tmp_path, capsys):
    """`--weights FILE` of an application is kept like a `.keras` backbone: rewriting the file leaves the run its own."""
    project = tmp_path / "project"
    make_dataset(project / "data", per_class=6)
    save_weights(project / "mine.weights.h5", seed=1)
    flags = [
        "--cache",
        str(project / "cache"),
        "--backbone",
        "mobilenet_v3_small",
        "--weights",
        str(project / "mine.weights.h5"),
        "--image-size",
        "32",
    ]
    assert main(["features", str(project / "data"), *flags, "--no-progress"]) == 0
    assert (
        main(
            [
                "train-head",
                "--data",
                str(project / "data"),
                *flags,
                "--runs",
                str(project / "runs"),
                "--test-pct",
                "30",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    (run,) = (project / "runs").iterdir()
    kept = json.loads((run / "config.json").read_text())["backbone_file"]
    assert kept["role"] == "weights" and kept["sha256"] == sha256_file(project / "mine.weights.h5")
    assert (project / "cache" / "backbones" / f"{kept['sha256']}.weights.h5").is_file()
    relpaths, expected = recorded(run)
    save_weights(project / "mine.weights.h5", seed=2)  # retrained in place: the old run keeps its own weights
    # a new cache, so every feature is computed again, with the weights the run kept
    got, said = predicted(run, [project / "data" / path for path in relpaths], capsys, "--cache", str(tmp_path / "new"))
    assert f"(computed {len(relpaths)}, from the cache 0, failed 0)" in said
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
