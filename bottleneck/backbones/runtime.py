"""The runtime seam: which runtime computes a backbone's features (`resolve_runtime`: `auto` picks OpenVINO on a
CPU, Keras on a GPU or another backend) and the feature model of a spec, built once per process
(`get_feature_model`). It sits above the network (`build`) and the OpenVINO runtime (`openvino`)."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from bottleneck.backbones.backend import import_keras
from bottleneck.backbones.build import FeatureModel
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import BackboneError

#: What runs the feature network: the fastest exact one here (auto), Keras on this process's backend, or a
#: conversion of it.
RUNTIMES = ("auto", "keras", "openvino")
DEFAULT_RUNTIME = "auto"
#: Set to keras or openvino to make `auto` pick that runtime (the test suite picks keras: each test's fresh
#: cache would otherwise convert its backbone to OpenVINO once more).
RUNTIME_ENV = "BOTTLENECK_RUNTIME"


def _gpu_present() -> bool:
    """True where a GPU may be: a CUDA or ROCm device node, then confirmed by the backend (which is imported)."""
    import glob

    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return False  # no device node: no need to import a backend to ask
    from bottleneck.backbones.backend import accelerators, requested_backend

    return bool(accelerators(requested_backend()))


def check_runtime(runtime: str, spec: BackboneSpec) -> None:
    """`resolve_runtime`'s refusals, without asking a backend for GPUs (which imports it): a rerun with nothing
    to compute imports no backend."""
    resolve_runtime(runtime, spec, probe_gpu=False)


def resolve_runtime(runtime: str, spec: BackboneSpec, probe_gpu: bool = True) -> str:
    """The runtime that computes `spec`'s features: 'keras' or 'openvino' (`auto` settled).

    auto: `$BOTTLENECK_RUNTIME` if set; else OpenVINO in float32 on a CPU where it is installed (faster
    than Keras, same features, same store), Keras on a GPU, with --backend jax/torch, or for
    --precision mixed. bf16 and int8 run on OpenVINO only.
    """
    import importlib.util

    if runtime not in RUNTIMES:
        raise BackboneError(f"unknown --runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    if spec.kind == "pixels":
        return "keras"  # no network: nothing to run
    if spec.precision in ("bf16", "int8"):
        if runtime == "keras":
            raise BackboneError(
                f"--precision {spec.precision} runs on the OpenVINO runtime: use --runtime auto or openvino"
            )
        if importlib.util.find_spec("openvino") is None:
            raise BackboneError(
                f"--precision {spec.precision} needs OpenVINO: pip install 'bottleneck-transfer[openvino]'"
            )
        return "openvino"
    if runtime == "auto" and os.environ.get(RUNTIME_ENV):
        chosen = os.environ[RUNTIME_ENV]
        if chosen not in ("keras", "openvino"):
            raise BackboneError(f"unknown {RUNTIME_ENV}={chosen!r}; choose keras or openvino (or unset it for auto)")
        return chosen
    if runtime != "auto":
        return runtime
    if spec.precision != "float32" or importlib.util.find_spec("openvino") is None:
        return "keras"
    if spec.kind == "foundation":
        return "keras"  # KerasHub's networks are not converted to OpenVINO unless asked for (--runtime openvino)
    if (os.environ.get("KERAS_BACKEND") or "tensorflow") != "tensorflow" or (probe_gpu and _gpu_present()):
        return "keras"
    return "openvino"


def get_feature_model(spec: BackboneSpec, runtime: str = DEFAULT_RUNTIME, cache_dir: Path | None = None):
    """A feature model for `spec`, built once per process (later runs in one process reuse it).

    `runtime='auto'` (the default) picks with `resolve_runtime`. `runtime='keras'` runs the Keras
    network on this process's backend (TensorFlow unless `--backend` or `KERAS_BACKEND` chose JAX
    or PyTorch). `runtime='openvino'` converts the network once per fingerprint into `cache_dir` and
    runs it with OpenVINO (an optional extra), which is faster on CPUs; `pixels` needs no runtime.
    Under auto, a network OpenVINO cannot convert runs on Keras, with one line saying so.
    """
    chosen = resolve_runtime(runtime, spec)
    if chosen == "openvino":
        from bottleneck.backbones.quantize import float_folder

        try:
            return _openvino_model(spec, float_folder(spec, cache_dir or "cache"))
        except BackboneError as exc:
            if runtime != "auto" or spec.precision != "float32":
                raise
            print(f"bottleneck: {exc}; computing with Keras instead", file=sys.stderr, flush=True)
    # Keyed by the weights' content too: a model file retrained at the same path is a new network, not the one held.
    return _keras_model(spec, import_keras().config.backend() if spec.kind != "pixels" else "numpy", spec.weights_id())


@lru_cache(maxsize=4)
def _keras_model(spec: BackboneSpec, backend: str, weights_id: str) -> FeatureModel:
    return FeatureModel(spec)


@lru_cache(maxsize=4)
def _openvino_model(spec: BackboneSpec, folder: Path):
    from bottleneck.backbones.openvino import OpenVinoFeatureModel

    return OpenVinoFeatureModel(spec, folder)
