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
