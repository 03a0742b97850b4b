"""Faults in backbones and runtimes, and files too large to read: one line, never a traceback, nothing wrong stored."""
from __future__ import annotations

import json

from bottleneck.cli import main
from bottleneck.features.decode import DEFAULT_MAX_PIXELS, max_file_bytes

from .conftest import make_dataset

PIXELS = ["--backbone", "pixels", "--image-size", "8"]


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
    for model, expected in [(gray, f"bottleneck: error: {gray} takes 1-channel input; a backbone must take RGB "
                                   "(3-channel) images"),
                            (two, f"bottleneck: error: {two} takes 2 inputs; a backbone must take one RGB (3-channel) "
                                  "image input")]:
        capsys.readouterr()
        code = main(["features", str(data), "--cache", str(tmp_path / "cache"), "--backbone", str(model),
                     "--layer", "gap", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2
        [line] = err.strip().splitlines()
        assert line.startswith(expected)
