"""Engines: the same store from the local engine and from Ray at any shard size; faults; bad input; tar shards and
augmented views on Ray.

One local Ray instance (3 logical CPUs on this 2-core machine: two actors and room for Ray Data's
own tasks) is shared by the tests of this module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import main
from bottleneck.features.discover import discover_images
from bottleneck.features.engines import FAULT_ENV, ShardRunner, make_job, plan_shards
from bottleneck.features.extract import ExtractOptions, extract_features, open_store
from bottleneck.features.hashing import HashIndex

from .conftest import TEST_SIZE, make_dataset
from .test_shards import write_shards

INCEPTION = BackboneSpec(weights="none", image_size=TEST_SIZE)
PIXELS = BackboneSpec(architecture="pixels", image_size=8)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    from bottleneck.features.engines.ray import import_ray

    import_ray()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def stored(cache: Path, spec: BackboneSpec):
    return open_store(cache, spec, HashIndex(cache)).load()


def leftovers(cache: Path) -> list[str]:
    """Temporary files and try counters anywhere in the cache."""
    return sorted(p.name for p in cache.rglob("*") if p.name.endswith((".tmp", ".tries")))


def ray_options(**values) -> ExtractOptions:
    return ExtractOptions(engine="ray", **values)


@pytest.mark.slow
def test_the_same_images_give_the_same_store_under_every_engine_and_shard_size(tmp_path, ray_session):
    """Ray's workers against the local engine: a real network over four shards on two workers (each worker process
    imports Keras and builds it: the cost of this test), and one shard on one worker with the `pixels` backbone (the
    shard plan and the store's rows, without a third network build)."""
    data = tmp_path / "data"
    make_dataset(data, per_class=4)
    (data / "red" / "copy.png").write_bytes((data / "blue" / "blue_001.png").read_bytes())  # one content twice
    (data / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a picture")
    local, reference = {}, {}
    for spec in (INCEPTION, PIXELS):
        local[spec] = extract_features(data, tmp_path / f"local-{spec.architecture}", spec, batch_size=4)
        assert (local[spec].computed, local[spec].reused, local[spec].failed) == (12, 1, 1)
        reference[spec] = stored(tmp_path / f"local-{spec.architecture}", spec)

    for name, spec, options in [
        ("two-workers", INCEPTION, ray_options(workers=2, shard_size=4, batch_size=3)),
        ("one-worker", PIXELS, ray_options(workers=1, shard_size=100)),
    ]:
        run = extract_features(data, tmp_path / name, spec, options)
        assert (run.computed, run.reused, run.failed, run.failed_shards) == (12, 1, 1, []), name
        assert run.shards == (4 if name == "two-workers" else 1)
        assert run.failures[0].reason == local[spec].failures[0].reason
        got = stored(tmp_path / name, spec)
        assert sorted(got.content_hash) == sorted(reference[spec].content_hash)
        rows = got.rows_by_hash()
        np.testing.assert_allclose(
            got.features[[rows[h] for h in reference[spec].content_hash]],
            reference[spec].features,
            rtol=1e-5,
            atol=1e-6,
        )
        assert [f.reason for f in got.failures] == [f.reason for f in reference[spec].failures]
        assert leftovers(tmp_path / name) == []

    again = extract_features(data, tmp_path / "two-workers", INCEPTION, ray_options(workers=2, shard_size=4))
    assert (again.computed, again.reused, again.shards) == (0, 13, 0)  # settled from the hash index: Ray not needed


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise-once", "kill-once"])
def test_a_shard_whose_worker_fails_once_is_retried_and_the_store_is_complete(
    tmp_path, ray_session, monkeypatch, fault
):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=4)
    monkeypatch.setenv(FAULT_ENV, f"{fault}:{tmp_path}")
    run = extract_features(data, cache, PIXELS, ray_options(workers=1, shard_size=4, batch_size=1))
    assert (tmp_path / "fault-once").exists()  # the fault did happen
    assert (run.computed, run.failed, run.failed_shards) == (12, 0, [])
    assert len(set(stored(cache, PIXELS).content_hash)) == 12
    assert leftovers(cache) == []


@pytest.mark.slow
def test_a_shard_failing_every_try_is_reported_and_the_others_are_kept(tmp_path, ray_session, monkeypatch, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=4)
    monkeypatch.setenv(FAULT_ENV, f"raise-always:{tmp_path}")
    argv = [
        "features",
        str(data),
        "--cache",
        str(cache),
        "--backbone",
        "pixels",
        "--image-size",
        "8",
        "--engine",
        "ray",
        "--workers",
        "1",
        "--shard-size",
        "5",
        "--no-progress",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    err = out + err
    assert "computed 7, reused 0, failed 5" in err
    assert "engine ray: 3 shards, 1 failed" in err
    assert "shard 0 (5 images from " in err and "failed after 3 tries: RuntimeError: injected failure of shard 0" in err
    assert len(stored(cache, PIXELS).content_hash) == 7 and stored(cache, PIXELS).failures == []
    assert leftovers(cache) == []

    monkeypatch.delenv(FAULT_ENV)
    rerun = extract_features(data, cache, PIXELS)  # any engine: only the failed shard's images are missing
    assert (rerun.computed, rerun.reused, rerun.failed) == (5, 7, 0)


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_resumed_job_computes_only_the_shards_without_a_segment(tmp_path, engine, request):
    """A driver killed after two shards wrote their segments: those are kept (and counted as reused), the rest is
    computed."""
    options = (
        ExtractOptions()
        if engine == "local"
        else (request.getfixturevalue("ray_session"), ray_options(workers=1, shard_size=4))[1]
    )
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=4)
    images = discover_images(data).images
    cache.mkdir()
    index = HashIndex(cache)
    store = open_store(cache, PIXELS, index)
    with store.writer() as writer:
        shards = plan_shards([(image, None) for image in images], store.fingerprint, 4)
        runner = ShardRunner(make_job(writer, PIXELS, ExtractOptions()))
        first = [runner.run(shard) for shard in shards[:2]]
    index.close()
    assert [len(r.rows) for r in first] == [4, 4]
    assert runner.run(shards[0]).resumed  # a retried shard finds its segment and computes nothing
    resumed = extract_features(data, cache, PIXELS, options)
    assert (resumed.computed, resumed.reused) == (4, 8)
    assert len(stored(cache, PIXELS).content_hash) == 12


# The Ray tests of tar shards and of augmented views live here, on this module's one Ray instance: each Ray start
# costs seconds.
@pytest.mark.slow
def test_ray_reads_shards_in_parallel_and_writes_a_segment_per_shard(tmp_path, ray_session):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_shards(data, per_shard=5, shards=3)
    result = extract_features(data, cache, PIXELS, engine="ray", workers=2)
    assert (result.computed, result.shards, result.failed) == (15, 3, 0)
    segments = list((cache / f"{result.store.stem}.segments").glob("seg-*.h5"))
    assert len(segments) == 3


@pytest.mark.slow
def test_features_augment_on_ray_writes_the_views_a_segment_per_shard(tmp_path, ray_session, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=2)
    assert (
        main(
            [
                "features",
                str(data),
                "--cache",
                str(cache),
                "--backbone",
                "pixels",
                "--image-size",
                "8",
                "--engine",
                "ray",
                "--workers",
                "2",
                "--shard-size",
                "3",
                "--augment",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "augmented views (2 per image): computed 12, reused 0" in capsys.readouterr().out
    [view_segments] = [p for p in cache.glob("*-aug-*.segments")]
    assert len(list(view_segments.glob("seg-*.h5"))) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shard-size", "10"], "bottleneck: error: --shard-size applies to --engine ray only"),
        (
            ["--engine", "ray", "--ray-address", "127.0.0.1:1"],
            "bottleneck: error: cannot reach the Ray cluster at 127.0.0.1:1: Connection refused",
        ),
        pytest.param(  # asks a running Ray for its GPUs: starting one takes the fast suite 8 s
            ["--engine", "ray", "--gpus-per-worker", "1"],
            "bottleneck: error: --gpus-per-worker 1: this machine has no GPUs",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["shard-size-local", "unreachable", "no-gpu"],
)
def test_bad_engine_input_is_one_line_and_exit_code_2(capsys, tmp_path, request, argv, message):
    if "--gpus-per-worker" in argv:
        request.getfixturevalue("ray_session")
    data = tmp_path / "data"
    make_dataset(data, per_class=1)
    code = main(["features", str(data), "--cache", str(tmp_path / "cache"), "--backbone", "pixels", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and err.strip() == message and out == ""


def test_the_cli_and_the_local_engine_never_import_ray(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, per_class=1)
    probe = (
        "import sys, contextlib, io\n"
        "from bottleneck.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['features', '--help'])\n"
        "    except SystemExit: pass\n"
        f"assert main(['features', {str(data)!r}, '--cache', {str(tmp_path / 'cache')!r}, '--backbone', 'pixels']) == 0\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "ok", done.stderr
