"""A finished run folder, read back: its backbone, its labels and how it turns features into probabilities.

`predict`, `export` and `fine-tune` all start here. A head run classifies the cached features of
its backbone; a fine-tuned run holds a whole network (pixels in, probabilities out), whose
outputs are cached like features under their own fingerprint, so both kinds share one pipeline.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck.backbones.spec import BackboneSpec, spec_from_record, spec_from_store_attrs
from bottleneck.errors import BottleneckError

#: config.json "kind" of a run written by `fine-tune`.
FINE_TUNED = "fine-tune"


class RunError(BottleneckError):
    """A run folder is missing, incomplete, or no longer matches what it was trained with."""


@dataclass
class LoadedRun:
    """A run folder and what using it needs."""

    folder: Path
    config: dict
    spec: BackboneSpec  # the network whose outputs are cached: the backbone, or the fine-tuned network
    fingerprint: str  # of `spec`, computed once (it hashes model and weights files)
    cache_dir: Path
    labels: list[str]
    classify: Callable[[np.ndarray], np.ndarray]  # (n, d) cached outputs -> (n, len(labels)) probabilities

    @property
    def fine_tuned(self) -> bool:
        return self.config.get("kind") == FINE_TUNED

    @property
    def run_id(self) -> str:
        return self.folder.name


def read_run_files(run_dir: str | Path) -> tuple[Path, dict]:
    """The run folder and its config, or a one-line `RunError` saying what is missing."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise RunError(f"run folder not found: {folder}")
    try:
        config = json.loads((folder / "config.json").read_text())
        json.loads((folder / "metrics.json").read_text())
    except FileNotFoundError as exc:
        raise RunError(f"{folder} is not a finished run folder ({Path(exc.filename).name} is missing)") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{folder} is not a readable run folder ({exc})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise RunError(f"{folder}/config.json does not describe a run (no 'model')")
    if not (folder / config["model"]).is_file():
        raise RunError(f"{folder} is incomplete: its model file {config['model']} is missing")
    return folder, config


def run_backbone(folder: Path, config: dict) -> tuple[BackboneSpec, str]:
    """The exact backbone a head run was trained on, and its fingerprint; a `RunError` if it changed since."""
    try:
        record = config.get("backbone_spec")
        spec = spec_from_record(record) if record else spec_from_store_attrs(config.get("backbone") or {})
    except KeyError as exc:
        raise RunError(f"{folder}/config.json does not say which backbone it used (no {exc})") from None
    except BottleneckError as exc:
        raise RunError(f"the backbone of run {folder.name} cannot be rebuilt: {exc}") from None
    recorded, fingerprint = config.get("fingerprint"), spec.fingerprint()
    if recorded and fingerprint != recorded:
        raise RunError(
            f"the backbone of run {folder.name} has changed since training ({fingerprint} now, {recorded} "
            "then): its model or weights file was edited or replaced"
        )
    return spec, fingerprint


def _logreg_classifier(folder: Path, config: dict) -> tuple[list[str], Callable]:
    import joblib

    pipeline = joblib.load(folder / config["model"])
    return [str(c) for c in pipeline.classes_], pipeline.predict_proba


def _keras_classifier(path: Path) -> tuple[list[str], Callable]:
    from bottleneck.backbones.backend import import_keras

    keras = import_keras()  # a Dense head: any backend loads it
    labels = _labels(path.parent)
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    return labels, lambda X: np.asarray(model.predict(np.asarray(X, np.float32), batch_size=1024, verbose=0), np.float64)


def _labels(folder: Path) -> list[str]:
    try:
        labels = json.loads((folder / "labels.json").read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{folder} is incomplete: cannot read labels.json ({exc.__class__.__name__})") from None
    if not isinstance(labels, list) or not labels:
        raise RunError(f"{folder}/labels.json does not list the labels")
    return [str(label) for label in labels]


def _normalised(outputs: np.ndarray) -> np.ndarray:
    outputs = np.asarray(outputs, np.float64)
    return outputs / outputs.sum(axis=1, keepdims=True)


def load_run(run_dir: str | Path, cache_dir: str | Path | None = None) -> LoadedRun:
    """Read a run folder; `cache_dir` overrides where its cached features live (default: where it was trained)."""
    folder, config = read_run_files(run_dir)
    if config.get("kind") == FINE_TUNED:
        network = folder / config["model"]
        spec = BackboneSpec(architecture=str(network.absolute()), layer=config["output_layer"], preprocess="none")
        fingerprint = spec.fingerprint()
        labels = _labels(folder)
        classify: Callable = _normalised
        default_cache = Path(config["cache"])
    else:
        spec, fingerprint = run_backbone(folder, config)
        head = config.get("head")
        if head == "logreg":
            labels, classify = _logreg_classifier(folder, config)
        elif head == "keras":
            labels, classify = _keras_classifier(folder / config["model"])
        else:
            raise RunError(f"{folder}/config.json names an unknown head {head!r}")
        default_cache = Path(config["store"]).parent
    return LoadedRun(folder, config, spec, fingerprint, Path(cache_dir) if cache_dir else default_cache, labels, classify)
