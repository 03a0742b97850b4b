"""Faults in backbones and runtimes, and files too large to read: one line, never a traceback, nothing wrong stored."""

from __future__ import annotations

import json

from bottleneck.cli import main
from bottleneck.features.decode import DEFAULT_MAX_PIXELS, max_file_bytes

from .conftest import PIXELS, make_dataset


def test_a_64_gb_file_in_data_is_refused_unread_as_a_failure_of_that_file(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=2)
    huge = data / "red" / "huge.png"
    with open(huge, "wb") as handle:
        handle.truncate(64 * 2**30)  # sparse: no disk, but reading it would need 64 GiB of memory
    assert max_file_bytes(DEFAULT_MAX_PIXELS) < 2 * 2**30
    code = main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["computed"] == 6 and summary["failed"] == 1
    assert "Traceback" not in captured.err
    [line] = [line for line in captured.err.splitlines() if "huge.png" in line]
    assert "file of 64.0 GiB is larger than any image bottleneck decodes (limit 1.6 GiB" in line


def _tiny_model_file(path, *input_shapes):
    import keras

    inputs = [keras.Input(shape, name=f"image_{i}") for i, shape in enumerate(input_shapes)]
    x = inputs[0] if len(inputs) == 1 else keras.layers.Concatenate(name="join")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(x)).save(path)
    return path


def test_a_model_file_whose_input_is_not_rgb_is_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, per_class=1)
    gray = _tiny_model_file(tmp_path / "gray.keras", (16, 16, 1))
    two = _tiny_model_file(tmp_path / "two.keras", (16, 16, 3), (16, 16, 3))
    for model, expected in [
        (gray, f"bottleneck: error: {gray} takes 1-channel input; a backbone must take RGB (3-channel) images"),
        (two, f"bottleneck: error: {two} takes 2 inputs; a backbone must take one RGB (3-channel) image input"),
    ]:
        capsys.readouterr()
        code = main(
            [
                "features",
                str(data),
                "--cache",
                str(tmp_path / "cache"),
                "--backbone",
                str(model),
                "--layer",
                "gap",
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2
        [line] = err.strip().splitlines()
        assert line.startswith(expected)


def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_damaged_openvino_model_is_converted_again_and_killed_conversions_are_cleared(tmp_path, capsys):
    import os
    import time

    import numpy as np

    from bottleneck.backbones.build import FeatureModel
    from bottleneck.backbones.openvino import RECORD_FILE, OpenVinoFeatureModel, conversion_problem
    from bottleneck.backbones.spec import BackboneSpec

    spec = BackboneSpec(architecture=str(_tiny_model_file(tmp_path / "rgb.keras", (16, 16, 3))), layer="gap")
    folder = tmp_path / "cache" / f"{spec.fingerprint()}.openvino"
    batch = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    reference = FeatureModel(spec)(batch)
    OpenVinoFeatureModel(spec, folder)
    assert conversion_problem(folder) is None and (folder / RECORD_FILE).is_file()

    with open(folder / "model.bin", "r+b") as handle:  # some weights overwritten, the files still load
        handle.seek(64)
        handle.write(b"\x3f" * 256)
    killed = tmp_path / "cache" / f".{folder.name}.{_dead_pid()}.x1"  # a conversion killed half-way
    older = tmp_path / "cache" / f".{folder.name}.outdated.x2"  # named before process ids, hours old
    busy = tmp_path / "cache" / f".{folder.name}.{os.getppid()}.x3"  # a conversion running now
    for leftover in (killed, older, busy):
        leftover.mkdir()
        (leftover / "model.bin").write_bytes(b"\0" * 1_000_000)
    os.utime(older, (time.time() - 7200, time.time() - 7200))
    capsys.readouterr()

    model = OpenVinoFeatureModel(spec, folder)
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == [
        f"bottleneck: removed 1.9 MiB of OpenVINO conversion that a killed run left beside {folder}",
        f"bottleneck: the OpenVINO model in {folder} does not match the record of its files "
        "(model.bin changed: damaged?): converting it again",
        f"bottleneck: converting rgb to OpenVINO once (kept in {folder.parent})",
    ]
    assert len(err) == 4 and err[3].startswith("bottleneck: converted rgb to OpenVINO in ")
    np.testing.assert_allclose(model(batch), reference, rtol=1e-4, atol=1e-5)
    assert not killed.exists() and not older.exists() and busy.exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, busy.name])

    (folder / RECORD_FILE).unlink()  # killed before the record was written, or converted by an older version
    assert conversion_problem(folder).startswith("has no record of its files")
    (folder / RECORD_FILE).write_text("{not json")
    assert conversion_problem(folder).startswith("has an unreadable record of its files")


def test_an_openvino_conversion_that_does_not_compute_tensorflows_features_is_refused(tmp_path):
    import numpy as np
    import pytest

    from bottleneck.backbones.build import FeatureModel
    from bottleneck.backbones.openvino import _check_conversion_matches_keras
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.errors import BackboneError

    spec = BackboneSpec(architecture=str(_tiny_model_file(tmp_path / "rgb.keras", (16, 16, 3))), layer="gap")
    network = FeatureModel(spec).model
    assert _check_conversion_matches_keras(network, lambda x: [np.asarray(network(x))], 16) == 0.0
    with pytest.raises(
        BackboneError,
        match=r"^OpenVINO's conversion of rgb_features does not compute TensorFlow's "
        r"features \(off by up to .* on a check input.*use --runtime keras$",
    ):
        # 4% off, like a damaged .bin
        _check_conversion_matches_keras(network, lambda x: [np.asarray(network(x)) * 1.04], 16)


def test_a_weights_file_of_another_architecture_is_one_line_without_keras_warnings(tmp_path, capfd):
    import logging
    import warnings

    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    data = tmp_path / "data"
    make_dataset(data, per_class=1)
    other = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, name="Conv1"),
            keras.layers.BatchNormalization(name="bn_Conv1"),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )
    modern, legacy = tmp_path / "other.weights.h5", tmp_path / "other.h5"
    other.save_weights(modern)
    with h5py.File(legacy, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, other)

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    for weights in (modern, legacy):
        capfd.readouterr()
        logged = Records()
        logging.getLogger().addHandler(logged)
        try:
            with warnings.catch_warnings(record=True) as escaped:
                warnings.simplefilter("always")
                code = main(
                    [
                        "features",
                        str(data),
                        "--cache",
                        str(tmp_path / "cache"),
                        "--backbone",
                        "mobilenet_v2",
                        "--weights",
                        str(weights),
                        "--image-size",
                        "32",
                        "--no-progress",
                    ]
                )
        finally:
            logging.getLogger().removeHandler(logged)
        err = capfd.readouterr().err
        assert code == 2
        assert err.strip().splitlines() == [err.strip()]
        assert err.startswith(f"bottleneck: error: weights file {weights} does not fit mobilenet_v2 without its top (")
        assert [str(w.message) for w in escaped] == [] and logged.messages == []
