"""What 0.1 no longer carries: the `tensorflow` runtime alias, TensorFlow as the one backend whose version a store
keeps; and what a run records instead: the version of every backend and runtime installed, none imported."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import h5py
import numpy as np
import pytest

from bottleneck.cli import main
from bottleneck.features.store import FeatureStore


def test_the_tensorflow_runtime_alias_is_refused_by_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["features", "data", "--runtime", "tensorflow"])
    assert (
        "argument --runtime: invalid choice: 'tensorflow' (choose from auto, keras, openvino)"
        in capsys.readouterr().err.replace("'auto', 'keras', 'openvino'", "auto, keras, openvino")
    )


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def test_a_run_records_every_installed_backend_and_runtime_without_importing_them():
    probe = (
        "import json, sys\nfrom bottleneck.learn.runs import versions\nfound = versions()\n"
        "print(json.dumps([found, sorted(m for m in ('jax', 'torch', 'openvino', 'tensorflow', 'nncf', 'keras_hub')"
        " if m in sys.modules)]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    found, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == []
    for package in ("jax", "torch", "openvino", "keras", "numpy"):
        assert found.get(package) == _installed(package), package
    assert any(_installed(package) for package in ("jax", "torch", "openvino"))  # this suite runs where one is


def test_a_store_keeps_the_version_of_every_backend_that_computed_its_rows(tmp_path):
    store = FeatureStore(tmp_path, "fp", 4, {"architecture": "test", "pretrained": False})
    for start, versions in (
        (0, {"jax_version": "0.4", "keras_version": "3.0"}),
        (2, {"torch_version": "2.5", "keras_version": "3.1"}),
    ):
        with store.writer() as writer:
            writer.commit([f"{i:064x}" for i in range(start, start + 2)], np.ones((2, 4), np.float32), ["a", "b"])
            assert writer.finish(versions)
    with h5py.File(store.path, "r") as handle:
        attrs = dict(handle.attrs)
    assert (attrs["jax_version"], attrs["torch_version"], attrs["keras_version"]) == ("0.4", "2.5", "3.1")
    assert "tensorflow_version" not in attrs  # no TensorFlow computed a row of it
