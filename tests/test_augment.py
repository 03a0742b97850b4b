"""Augmented views are computed once, cached beside the features, used for training images only, and
averaged by `predict --tta`."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from bottleneck.cli import main
from bottleneck.features.augment import DEFAULT_RECIPE, AugmentRecipe, make_view, view_key
from tests.conftest import make_dataset

PIXELS = ["--backbone", "pixels", "--image-size", "8"]
VIEWS = 3


@pytest.fixture(scope="module")
def augmented(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("augment")
    data, cache = root / "data", root / "cache"
    make_dataset(data, per_class=8)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--augment", str(VIEWS), "--no-progress"]) == 0
    (plain,) = [p for p in cache.glob("*.h5") if "-aug-" not in p.name]
    (views,) = cache.glob("*-aug-*.h5")
    return {"root": root, "data": data, "cache": cache, "plain": plain, "views": views}


def test_a_view_depends_only_on_recipe_content_and_number():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    first = make_view(pixels, "ab" * 32, DEFAULT_RECIPE, 0)
    assert first.shape == pixels.shape and first.dtype == np.uint8
    assert np.array_equal(first, make_view(pixels, "ab" * 32, DEFAULT_RECIPE, 0))
    assert not np.array_equal(first, pixels)
    assert not np.array_equal(first, make_view(pixels, "ab" * 32, DEFAULT_RECIPE, 1))
    assert not np.array_equal(first, make_view(pixels, "cd" * 32, DEFAULT_RECIPE, 0))
    other = AugmentRecipe(seed=1)
    assert other.digest() != DEFAULT_RECIPE.digest() and view_key("ab" * 32, other, 0) != view_key(
        "ab" * 32, DEFAULT_RECIPE, 0
    )


def test_views_are_cached_beside_the_features_and_a_rerun_computes_none(augmented, capsys):
    with h5py.File(augmented["plain"], "r") as plain, h5py.File(augmented["views"], "r") as views:
        plain_rows = plain["features"][()]
        view_rows = views["features"][()]
        assert view_rows.shape == (VIEWS * len(plain_rows), plain_rows.shape[1])
        assert views.attrs["views_per_image"] == VIEWS and views.attrs["architecture"] == "pixels"
        assert json.loads(views.attrs["augment_recipe"])["seed"] == 0
    assert not any(np.allclose(row, plain_row) for row in view_rows for plain_row in plain_rows)  # views are new rows
    assert len(np.unique(view_rows.round(5), axis=0)) == len(view_rows)
    assert (
        main(
            [
                "features",
                str(augmented["data"]),
                "--cache",
                str(augmented["cache"]),
                *PIXELS,
                "--augment",
                str(VIEWS),
                "--no-progress",
            ]
        )
        == 0
    )
    assert f"augmented views ({VIEWS} per image): computed 0, reused {len(view_rows)}" in capsys.readouterr().out


def test_train_head_adds_views_of_training_images_only(augmented, capsys):
    runs = augmented["root"] / "runs"
    assert (
        main(
            [
                "train-head",
                "--data",
                str(augmented["data"]),
                "--cache",
                str(augmented["cache"]),
                *PIXELS,
                "--runs",
                str(runs),
                "--augment",
                "--val-pct",
                "20",
                "--test-pct",
                "20",
            ]
        )
        == 0
    )
    (run,) = runs.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "split.csv", newline="") as handle:
        splits = [row["split"] for row in csv.DictReader(handle)]
    assert splits.count("validation") and splits.count("test")
    assert metrics["augment"]["rows_added"] == VIEWS * splits.count("train")  # none for validation or test
    assert metrics["augment"]["views_per_image"] == VIEWS
    assert json.loads((run / "config.json").read_text())["augment"]["digest"] == DEFAULT_RECIPE.digest()
    assert "cached augmented views of the training images" in capsys.readouterr().out


def test_the_views_used_are_exactly_those_of_training_images(augmented):
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.learn.dataset import content_hashes, load_labelled_features
    from bottleneck.learn.runs import augmented_training_rows

    data = load_labelled_features(augmented["data"], augmented["cache"], BackboneSpec("pixels", image_size=8))
    train = np.zeros(len(data.relpaths), bool)
    train[::3] = True
    rows, labels, record = augmented_training_rows(data, train, 2, augmented["data"], print)
    hashes = content_hashes(augmented["data"], augmented["cache"], data.relpaths)
    with h5py.File(augmented["views"], "r") as views:
        by_key = dict(zip((h.decode() for h in views["content_hash"][()]), views["features"][()]))
    expected = [by_key[view_key(hashes[i], DEFAULT_RECIPE, k)] for i in np.flatnonzero(train) for k in range(2)]
    np.testing.assert_array_equal(rows, np.stack(expected))
    assert list(labels) == [data.labels[i] for i in np.flatnonzero(train) for _ in range(2)]


def test_predict_tta_averages_the_image_and_its_views(augmented, capsys):
    runs = augmented["root"] / "tta-runs"
    assert (
        main(
            [
                "train-head",
                "--data",
                str(augmented["data"]),
                "--cache",
                str(augmented["cache"]),
                *PIXELS,
                "--runs",
                str(runs),
            ]
        )
        == 0
    )
    (run,) = runs.iterdir()
    image = next((augmented["data"] / "red").iterdir())
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(image), "--json", "--top", "3", "--tta", "2"]) == 0
    tta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["predict", "--run", str(run), str(image), "--json", "--top", "3"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    from bottleneck.features.hashing import sha256_file
    from bottleneck.features.maintenance import store_of
    from bottleneck.learn.run_folder import load_run

    loaded = load_run(run)
    views = store_of(augmented["cache"], augmented["views"].stem)
    content = sha256_file(image)
    rows = views.read_rows([view_key(content, DEFAULT_RECIPE, k) for k in range(2)])
    plain_p = {t["label"]: t["probability"] for t in plain["top"]}
    expected = (np.array([plain_p[label] for label in loaded.labels]) + loaded.classify(rows).sum(axis=0)) / 3
    got = {t["label"]: t["probability"] for t in tta["top"]}
    for label, p in zip(loaded.labels, expected):
        assert got[label] == pytest.approx(p, abs=1e-6)


def test_train_head_augment_without_views_is_one_line(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=3)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(cache),
                *PIXELS,
                "--runs",
                str(tmp_path / "r"),
                "--augment",
                "2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no augmented views" in err and "--augment 2" in err


def test_another_flip_probability_is_another_set_of_views_and_runs_record_it(augmented, capsys):
    args = ["--data", str(augmented["data"]), "--cache", str(augmented["cache"]), *PIXELS]
    assert (
        main(
            [
                "features",
                str(augmented["data"]),
                "--cache",
                str(augmented["cache"]),
                *PIXELS,
                "--augment",
                "2",
                "--augment-flip",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    stores = sorted(augmented["cache"].glob("*-aug-*.h5"))
    assert len(stores) == 2 and AugmentRecipe(flip=0.0).digest() in " ".join(p.name for p in stores)
    runs = augmented["root"] / "flip-runs"
    assert main(["train-head", *args, "--runs", str(runs), "--augment", "--augment-flip", "0"]) == 0
    (run,) = runs.iterdir()
    record = json.loads((run / "config.json").read_text())["augment"]
    assert record["recipe"]["flip"] == 0 and record["views_per_image"] == 2
    capsys.readouterr()
    assert main(["train-head", *args, "--runs", str(runs), "--augment", "--augment-flip", "0.3"]) == 2
    assert "--augment 4 --augment-flip 0.3` with the same backbone flags first" in capsys.readouterr().err


def test_cache_gc_keeps_the_views_a_run_trained_on(augmented, capsys):
    runs = augmented["root"] / "gc-runs"
    assert (
        main(
            [
                "train-head",
                "--data",
                str(augmented["data"]),
                "--cache",
                str(augmented["cache"]),
                *PIXELS,
                "--runs",
                str(runs),
                "--augment",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["cache", "gc", "--cache", str(augmented["cache"]), "--runs", str(runs)]) == 0  # a dry run
    out = capsys.readouterr().out
    used, other = (
        augmented["views"].name,
        [p.name for p in augmented["cache"].glob("*-aug-*.h5") if p != augmented["views"]],
    )
    assert used not in out
    assert all(name in out for name in other)  # views no run trained on are collectable, like any unused store


def test_views_take_the_max_pixels_of_features(tmp_path):
    """`features --max-pixels` reaches the views too: an image over it gets a warning and no views."""
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.features.augment import compute_views
    from bottleneck.features.discover import discover_images
    from bottleneck.features.extract import extract_features, open_store
    from bottleneck.features.hashing import HashIndex
    from bottleneck.learn.dataset import content_hashes

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=1)
    spec = BackboneSpec(architecture="pixels", image_size=8)
    extract_features(data, cache, spec)
    plain = open_store(cache, spec, HashIndex(cache))
    images = discover_images(data).images
    todo = list(zip((str(im.path) for im in images), content_hashes(data, cache, [im.relpath for im in images])))
    said: list[str] = []
    made = compute_views(todo, cache, spec, plain, 1, log=said.append, max_pixels=100)  # the images are 96x80
    assert made.computed == 0 and len(said) == 3 and all("no views of" in line for line in said), said
    assert compute_views(todo, cache, spec, plain, 1).computed == 3


def _views_by_key(store_path) -> dict[str, np.ndarray]:
    with h5py.File(store_path, "r") as handle:
        keys = [k.decode() for k in handle["content_hash"][()]]
        return dict(zip(keys, handle["features"][()]))


def test_a_sharded_engine_computes_the_same_views_and_resumes_a_written_shard(tmp_path):
    """The engine seam with `ViewPlan`: views equal to the local ones, bit for bit; a shard whose segment an
    earlier (killed) run wrote is taken as it is, not computed again."""
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.features.augment import compute_views, view_store
    from bottleneck.features.discover import discover_images
    from bottleneck.features.engines import ShardedEngine, ShardRunner, Tally, ViewPlan
    from bottleneck.features.extract import ExtractOptions, extract_features, open_store
    from bottleneck.features.hashing import HashIndex
    from bottleneck.learn.dataset import content_hashes

    class InProcessEngine(ShardedEngine):
        """The sharded steps one shard after another in this process: the seam's reference."""

        def map_shards(self, job, shards, log):
            runner = ShardRunner(job)
            for shard in shards:
                yield runner.run(shard)

    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    spec = BackboneSpec(architecture="pixels", image_size=8)
    results = {}
    for name in ("local", "sharded"):
        cache = tmp_path / name
        extract_features(data, cache, spec)
        index = HashIndex(cache)
        plain = open_store(cache, spec, index)
        images = discover_images(data).images
        hashes = content_hashes(data, cache, [im.relpath for im in images])
        if name == "local":
            results[name] = _views_by_key(
                compute_views(list(zip((str(im.path) for im in images), hashes)), cache, spec, plain, 2).store
            )
            continue
        store = view_store(cache, plain, DEFAULT_RECIPE)
        engine = InProcessEngine(ExtractOptions())
        for finish in (False, True):  # the first run is killed before it brings its segments in
            tally = Tally(todo=[(image, h) for image, h in zip(images, hashes)])
            with store.writer() as writer:
                engine.run(tally, writer, index, spec, lambda line: None, views=ViewPlan(DEFAULT_RECIPE, 2))
                if finish:
                    writer.finish()
            counts = (tally.computed, tally.reused)
            assert counts == ((12, 0) if not finish else (0, 12)), counts
        index.close()
        results[name] = _views_by_key(store.path)
    assert sorted(results["local"]) == sorted(results["sharded"]) and len(results["local"]) == 12
    for key, row in results["local"].items():
        np.testing.assert_array_equal(row, results["sharded"][key])
