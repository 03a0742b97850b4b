"""End to end: a folder of images (odd files among them) into the store, reruns, a killed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import CacheError, DataError
from bottleneck.features.extract import extract_features, open_store
from bottleneck.features.hashing import HashIndex, sha256_file

from .conftest import TEST_SIZE, image_bytes, make_dataset, synthetic_image

SPEC = BackboneSpec(weights="none", image_size=TEST_SIZE)
#: For the tests of the store's bookkeeping (reuse, failures, locks), not of the network: features in milliseconds.
PIXELS = BackboneSpec(architecture="pixels", image_size=8)


def add_odd_files(root: Path) -> dict[str, str]:
    """Real-world oddities, good and bad; returns the bad ones with the start of their reason."""
    red, blue = root / "red", root / "blue"
    jpeg = image_bytes(synthetic_image((200, 30, 30), 77, size=(200, 150)), "JPEG")
    (red / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (red / "zero.jpg").write_bytes(b"")
    (red / "text.jpg").write_text("this is not a picture")
    synthetic_image((200, 30, 30), 78).convert("CMYK").save(red / "cmyk.jpg", "JPEG")
    Image.fromarray(np.full((40, 50), 40000, np.uint16)).save(blue / "sixteen.png")
    synthetic_image((30, 30, 200), 79).convert("P").save(blue / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6
    synthetic_image((30, 30, 200), 80).save(blue / "rotated.jpg", "JPEG", exif=exif.tobytes())
    synthetic_image((30, 30, 200), 81).save(blue / "actually_png.jpg", "PNG")
    return {"truncated.jpg": "truncated image", "zero.jpg": "empty file", "text.jpg": "not an image"}


def glorot_redrawn(model, seed: int = 0):
    """`model` with the documented random weights: each non-constant trainable variable redrawn Glorot-uniform
    with NumPy, seeded by (seed, its position), so every Keras backend builds the same network."""
    for position, variable in enumerate(model.trainable_weights):
        values = variable.numpy()
        if values.size == 0 or np.all(values == values.flat[0]):
            continue
        shape = values.shape
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in, fan_out = (shape[0], shape[0]) if len(shape) == 1 else (shape[-2] * receptive, shape[-1] * receptive)
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        variable.assign(np.random.default_rng([seed, position]).uniform(-limit, limit, shape).astype(values.dtype))
    return model


def independent_features(paths: list[Path]) -> np.ndarray:
    """Plain Pillow decode and resize, Keras' preprocess_input, the same seeded random network."""
    import keras

    pixels = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((TEST_SIZE, TEST_SIZE), Image.BILINEAR)) for p in paths]
    )
    model = glorot_redrawn(
        keras.applications.InceptionV3(
            include_top=False, weights=None, input_shape=(TEST_SIZE, TEST_SIZE, 3), pooling="avg"
        )
    )
    return model.predict(keras.applications.inception_v3.preprocess_input(pixels.astype("float32")), verbose=0)


def stored(cache: Path, spec: BackboneSpec = SPEC):
    return open_store(cache, spec, HashIndex(cache)).load()


@pytest.mark.slow
def test_features_match_an_independent_computation_and_bad_files_are_recorded(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    plain = make_dataset(data, per_class=2)
    bad = add_odd_files(data)
    result = extract_features(data, cache, SPEC, batch_size=4)
    assert (result.images, result.computed, result.reused, result.failed) == (14, 11, 0, 3)
    assert sorted(Path(f.path).name for f in result.failures) == sorted(bad)
    for failure in result.failures:
        assert failure.reason.startswith(bad[Path(failure.path).name]) and "\n" not in failure.reason

    contents = stored(cache)
    rows = contents.rows_by_hash()
    mine = contents.features[[rows[sha256_file(p)] for p in plain]]
    np.testing.assert_allclose(mine, independent_features(plain), rtol=1e-4, atol=1e-5)
    assert {Path(f.path).name for f in contents.failures} == set(bad)
    with h5py.File(result.store, "r") as handle:
        assert handle.attrs["pretrained"] == False  # noqa: E712 (numpy bool)
        assert "RANDOM WEIGHTS" in handle.attrs["warning"]
        assert handle.attrs["tensorflow_version"] and handle.attrs["keras_version"]


def test_rerun_computes_nothing_and_new_images_only_are_computed(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=3)
    first = extract_features(data, cache, PIXELS)
    assert (first.computed, first.reused) == (9, 0)
    again = extract_features(data, cache, PIXELS)
    assert (again.computed, again.reused, again.failed) == (0, 9, 0)

    make_dataset(data, per_class=1, start=50)  # three new images
    duplicate = data / "red" / "copy_of_red_000.png"
    duplicate.write_bytes((data / "red" / "red_000.png").read_bytes())
    os.utime(data / "blue" / "blue_000.png")  # touched, content unchanged
    more = extract_features(data, cache, PIXELS)
    assert (more.images, more.computed, more.reused) == (13, 3, 10)
    assert len(stored(cache, PIXELS).content_hash) == 12


def test_identical_images_in_two_places_are_computed_once(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    for label in ("red", "green"):
        (data / label / "same.png").write_bytes(image_bytes(synthetic_image((9, 9, 9), 5), "PNG"))
    result = extract_features(data, tmp_path / "cache", PIXELS)
    assert (result.images, result.computed, result.reused) == (8, 7, 1)


def test_unreadable_file_is_a_failure_not_a_crash(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    locked = data / "red" / "red_000.png"
    real_open = open

    def guarded_open(path, *args, **kwargs):  # root ignores chmod 000, so refuse the read here
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    real_os_open = os.open

    def guarded_os_open(path, *args, **kwargs):  # images are opened with os.open (non-blocking: a FIFO never hangs)
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    result = extract_features(data, tmp_path / "cache", PIXELS)
    assert result.failed == 1 and result.failures[0].reason == "cannot read file: Permission denied"


def test_all_images_failing_is_an_error(tmp_path):
    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        (data / label / "x.jpg").write_text("text")
    with pytest.raises(DataError, match=r"^no image could be used: all 2 failed \(first: .*x.jpg: not an image"):
        extract_features(data, tmp_path / "cache", PIXELS)


def test_unwritable_cache_is_a_clear_error(tmp_path, dataset):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match=r"^cannot write to cache folder .*file/cache: Not a directory$"):
        extract_features(dataset, blocker / "cache", PIXELS)


def test_busy_store_makes_the_second_run_refuse(tmp_path, dataset):
    cache = tmp_path / "cache"
    extract_features(dataset, cache, PIXELS)
    store = open_store(cache, PIXELS, HashIndex(cache))
    with store.writer():
        with pytest.raises(CacheError, match="^another bottleneck run"):
            extract_features(dataset, cache, PIXELS, lock_timeout=0.2)


def _features_command(data: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bottleneck",
        "features",
        str(data),
        "--cache",
        str(cache),
        "--weights",
        "none",
        "--no-progress",
        *extra,
    ]


# Ctrl-C and SIGTERM are tested the same way, on the pixels backbone, in test_faults.py.
@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL], ids=["kill-9"])
def test_killed_run_resumes_where_it_stopped(tmp_path, stop):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=6)  # 9 batches: 6 still to go when the third is committed
    spec = BackboneSpec(weights="none", image_size=299)  # slow batches: the run is killed in the middle
    parts = cache / f"{spec.fingerprint()}.parts"
    run = subprocess.Popen(_features_command(data, cache, "--batch-size", "2"), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(list(parts.glob("part-*.h5"))) < 3:
        assert run.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    run.send_signal(stop)
    err = run.communicate(timeout=60)[1]
    if stop == signal.SIGINT:
        assert run.returncode == 130
        assert err.strip().splitlines()[-1] == (
            "bottleneck: interrupted; committed batches are kept, run the same command again to resume"
        )
    store = open_store(cache, spec, HashIndex(cache))
    committed = len(store.load().content_hash)  # parts left by a killed run read correctly
    assert committed >= 6
    resumed = extract_features(data, cache, spec, batch_size=8)
    assert (resumed.computed, resumed.reused) == (18 - committed, committed)
    assert not store.parts_dir.exists()
    with h5py.File(store.path, "r") as handle:
        assert handle["features"].shape == (18, 2048)
        assert len(set(handle["content_hash"][()])) == 18


@pytest.mark.slow
def test_two_runs_at_once_share_the_work_and_never_corrupt(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=6)
    command = _features_command(data, cache, "--image-size", str(TEST_SIZE), "--json")
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    import json

    reports = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert sorted(r["computed"] for r in reports) == [0, 18]
    assert len(stored(cache).content_hash) == 18


def test_file_names_that_are_not_utf8_are_stored(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, per_class=1)
    odd = os.fsdecode(b"caf\xe9 latin-1.png")  # a name written by an old Windows tool
    synthetic_image((1, 2, 3), 99).save(data / "red" / odd, "PNG")
    (data / "blue" / os.fsdecode(b"broken \xff.jpg")).write_text("not an image")
    result = extract_features(data, tmp_path / "cache", PIXELS)
    assert (result.computed, result.failed) == (4, 1)
    again = extract_features(data, tmp_path / "cache", PIXELS)
    assert (again.computed, again.reused) == (0, 4)
    assert any("caf" in p for p in stored(tmp_path / "cache", PIXELS).source_path)  # paths live in the segments


@pytest.mark.slow
def test_openvino_runtime_gives_tensorflows_features(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    tf_run = extract_features(data, tmp_path / "tf-cache", SPEC)
    ov_run = extract_features(data, tmp_path / "ov-cache", SPEC, runtime="openvino")
    assert ov_run.computed == tf_run.computed == 6
    assert (tmp_path / "ov-cache" / f"{SPEC.fingerprint()}.openvino" / "model.xml").exists()
    reference, converted = stored(tmp_path / "tf-cache"), stored(tmp_path / "ov-cache")
    rows = converted.rows_by_hash()
    order = [rows[h] for h in reference.content_hash]
    np.testing.assert_allclose(converted.features[order], reference.features, rtol=1e-4, atol=1e-5)
