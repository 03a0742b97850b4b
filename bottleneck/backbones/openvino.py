"""The OpenVINO runtime (`--runtime openvino`): the same network, converted once, run faster on CPUs.

The whole feature network (`build_feature_network`: preprocessing layers and frozen backbone) is
exported as a SavedModel, converted with `openvino.convert_model` and kept in the cache as
`<fingerprint>.openvino/model.xml` + `.bin`, so later runs load it without TensorFlow. It takes
float32 RGB pixels in 0..255, like the TensorFlow runtime after its cast, so both run one graph;
their features agree within float tolerance (a test checks this) and share one store.

Because they share one store, a conversion is trusted only as far as it is checked: at conversion its
features are compared with TensorFlow's on fixed inputs (refused if off), and the SHA-256 of its files
is recorded last in `verified.json`; a folder whose files do not match (damaged), without a record
(cut short, or older) or unreadable is converted again, with a line saying so. Conversions are made in
a temporary folder named with the process id and renamed; those left by killed runs are removed.

Every model is compiled with an explicit inference precision (`compile_on_cpu`) and the compiled
model's own reading of it is checked: on CPUs with bfloat16 (AVX512_BF16, AMX) OpenVINO's default
PERFORMANCE mode computes float32 models in bf16, which would put bf16 features under a float32
name. `--precision bf16` asks for bf16 on purpose (a store of its own) and is refused on CPUs that
lack it, where OpenVINO would quietly compute float32; `--precision int8` runs the NNCF-quantized
model of `bottleneck.backbones.quantize`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck import naming
from bottleneck.backbones.build import FeatureModel
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import BackboneError, CacheError
from bottleneck.fs import pid_named_folders, process_alive
from bottleneck.text import format_bytes

#: Written beside model.xml. Conversions without it predate the preprocessing being part of the
#: network (they expect preprocessed input), so they are converted again rather than fed raw pixels.
FORMAT_FILE = "format.txt"
FORMAT = "feature network v2: float32 RGB 0-255 pixels in, preprocessing included, float32 weights\n"

#: Written last, atomically, once the conversion computed TensorFlow's features: the format and the
#: SHA-256 of each model file. A folder whose files do not match it (damaged, half-copied) is
#: converted again, never run: its features would be stored under the fingerprint TensorFlow shares.
RECORD_FILE = "verified.json"
MODEL_FILES = ("model.xml", "model.bin")

#: How close OpenVINO's features must be to TensorFlow's on the check inputs (as tests/test_extract.py asks).
RTOL, ATOL = 1e-4, 1e-5
CHECK_INPUTS = 2

#: A temporary folder whose process is gone, or older than this without a process id, was left by a killed run.
LEFTOVER_AGE_S = 3600


#: The inference precision OpenVINO is asked for, per `--precision`. int8 models keep float32 for the
#: operations NNCF left unquantized, so their features do not depend on whether the CPU has bf16.
INFERENCE_PRECISION = {"float32": "f32", "bf16": "bf16", "int8": "f32"}


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackboneError(
            "--runtime openvino needs the openvino package: pip install 'bottleneck-transfer[openvino]'"
        ) from None
    return openvino


def _say(message: str) -> None:
    print(f"bottleneck: {message}", file=sys.stderr, flush=True)


def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin says this CPU can compute in ('FP32', 'BF16', 'INT8', ...)."""
    ov = _import_openvino()
    return tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


#: CPU flags that give int8 dot products; without them OpenVINO's int8 runs on plain AVX2, slower.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def check_cpu_precision(precision: str) -> str | None:
    """One line for `--precision bf16` on a CPU without bfloat16 (a `BackboneError`); a note for int8 without VNNI."""
    flags = cpu_flags()
    if precision == "bf16" and "BF16" not in cpu_capabilities():
        raise BackboneError(
            "--precision bf16: this CPU has no bfloat16 instructions (AVX512_BF16 or AMX"
            + ("" if not flags else ", absent from its flags")
            + "), so OpenVINO would compute "
            "float32 and store it under a bf16 name; use --precision float32 (exact) or int8 (faster)"
        )
    if precision == "int8" and flags and not any(flag in flags for flag in INT8_FLAGS):
        return (
            "this CPU has no VNNI (int8 dot products: AVX512_VNNI, AVX-VNNI or AMX): int8 runs, "
            "but slower than on CPUs that have it"
        )
    return None


def compile_on_cpu(model, precision: str = "float32"):
    """`model` (an ov.Model or a model.xml path) compiled for the CPU in `precision`'s inference precision.

    The hint is always given and the compiled model's own reading of it checked, so a float32 model is
    never computed in bf16 (OpenVINO's default on bfloat16 CPUs) and a bf16 one never silently in float32.
    """
    ov = _import_openvino()
    wanted = INFERENCE_PRECISION[precision]
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": wanted})
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    if got != getattr(ov.Type, wanted):
        raise BackboneError(
            f"OpenVINO computes in {got.get_type_name()} on this CPU where {precision} was asked for; "
            + (
                "this CPU has no bfloat16: use --precision float32 or int8"
                if precision == "bf16"
                else "use --runtime keras"
            )
        )
    return compiled


def is_current_conversion(folder: Path, fmt: str = FORMAT) -> bool:
    """True if `folder` holds a conversion of the whole feature network (format `fmt`); its files are not checked."""
    try:
        return (folder / "model.xml").is_file() and (folder / FORMAT_FILE).read_text() == fmt
    except OSError:
        return False


def _file_hashes(folder: Path) -> dict[str, str]:
    from bottleneck.fs import sha256_file

    return {name: sha256_file(folder / name) for name in MODEL_FILES}


def conversion_problem(folder: Path, fmt: str = FORMAT) -> str | None:
    """None if `folder` holds a verified conversion of format `fmt` whose files match its record; else what is wrong."""
    if not folder.exists():
        return "is missing"
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except FileNotFoundError:
        return f"has no record of its files ({RECORD_FILE}: converted by an older version, or the conversion was cut short)"
    except (OSError, ValueError) as exc:
        return f"has an unreadable record of its files ({getattr(exc, 'strerror', None) or exc})"
    if not isinstance(record, dict) or record.get("format") != fmt or not is_current_conversion(folder, fmt):
        return "is of an older format"
    try:
        hashes = _file_hashes(folder)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    changed = [name for name in MODEL_FILES if hashes[name] != record.get("sha256", {}).get(name)]
    if changed:
        return f"does not match the record of its files ({' and '.join(changed)} changed: damaged?)"
    return None


def _check_conversion_matches_keras(network, compiled, size: int) -> float:
    """Largest difference between the OpenVINO conversion's features and the Keras network's own on fixed inputs;
    a `BackboneError` if off by more than the tolerance."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (1, size, size, 3)).astype(np.float32)
    ramp = np.broadcast_to(
        np.linspace(0, 255, size * size * 3, dtype=np.float32).reshape(1, size, size, 3), (1, size, size, 3)
    )
    pixels = np.concatenate([noise, ramp])[:CHECK_INPUTS]
    expected = np.asarray(network(pixels, training=False), dtype=np.float32)
    got = np.asarray(compiled(pixels)[0], dtype=np.float32)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=RTOL, atol=ATOL, equal_nan=True):
        off = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
        raise BackboneError(
            f"OpenVINO's conversion of {network.name} does not compute TensorFlow's features "
            f"(off by up to {off:.3g} on a check input, tolerance {RTOL:g} relative); "
            "use --runtime keras"
        )
    finite = np.isfinite(expected)  # a network whose weights hold NaN computes NaN on both: a faithful conversion
    return float(np.max(np.abs(got - expected)[finite])) if finite.any() else 0.0


def _traced(network, size: int, staging: Path):
    """What OpenVINO converts: the network traced as one TensorFlow function (3x faster than through a
    SavedModel on disk), or, on another Keras backend, its SavedModel export."""
    from bottleneck.backbones.backend import import_keras

    if import_keras().config.backend() != "tensorflow":
        network.export(str(staging / "savedmodel"), verbose=False)
        return str(staging / "savedmodel")
    import tensorflow as tf

    signature = [tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")]
    return tf.function(
        lambda pixels: network(pixels, training=False), input_signature=signature
    ).get_concrete_function()


def convert_to_openvino(spec: BackboneSpec, target: Path, log: Callable[[str], None] | None = None) -> None:
    """Export `spec`'s feature network and write its OpenVINO model into the folder `target`, atomically.

    The conversion is checked against TensorFlow on fixed inputs and its files' hashes recorded. It is
    made in a temporary folder beside `target` (named with this process's id: a killed conversion leaves
    only that, which a later run removes) and renamed; a `target` that fails `conversion_problem` is replaced.
    """
    ov = _import_openvino()
    started = time.monotonic()
    network = FeatureModel(spec).model  # first: a network that cannot be built is its own one-line error
    (log or _say)(f"converting {spec.name} to OpenVINO once (kept in {target.parent})")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    except OSError as exc:
        raise CacheError(
            f"cannot write the OpenVINO model into {target.parent} ({exc.strerror or exc}); "
            "use --runtime keras or another --cache"
        ) from None
    try:
        try:
            # Full float32 weights: save_model's default fp16 compression costs ~1e-3 relative error,
            # and features must match TensorFlow's to share one store.
            ov.save_model(
                ov.convert_model(_traced(network, spec.input_size, staging)),
                str(staging / "model.xml"),
                compress_to_fp16=False,
            )
            compiled = compile_on_cpu(str(staging / "model.xml"))
        except OSError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise BackboneError(f"OpenVINO cannot convert {spec.name} ({first}); use --runtime keras") from None
        difference = _check_conversion_matches_keras(network, compiled, spec.input_size)
        del compiled
        shutil.rmtree(staging / "savedmodel", ignore_errors=True)
        (staging / FORMAT_FILE).write_text(FORMAT)
        record = {
            "format": FORMAT,
            "sha256": _file_hashes(staging),
            "checked_against_tensorflow": {"inputs": CHECK_INPUTS, "max_abs_difference": difference},
        }
        (staging / (RECORD_FILE + ".tmp")).write_text(json.dumps(record, indent=1))
        os.replace(staging / (RECORD_FILE + ".tmp"), staging / RECORD_FILE)  # last: the folder is complete
        if target.exists() and conversion_problem(target) is not None:
            _set_aside(target)
        _replace_folder(staging, target)
        (log or _say)(
            f"converted {spec.name} to OpenVINO in {time.monotonic() - started:.1f} s "
            f"(its features within {difference:.2g} of TensorFlow's on the check inputs)"
        )
    except OSError as exc:
        raise CacheError(
            f"cannot write the OpenVINO model into {target.parent} ({exc.strerror or exc}); "
            "use --runtime keras or another --cache"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _set_aside(target: Path) -> None:
    """Remove `target` by renaming it away first, so no reader sees it half-deleted."""
    outdated = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.outdated.", dir=target.parent))
    try:
        os.replace(target, outdated / "old")
    except OSError:
        pass  # another process moved it first
    shutil.rmtree(outdated, ignore_errors=True)


def _replace_folder(staging: Path, target: Path) -> None:
    """Move `staging` to `target`, setting aside an outdated `target`; another process's fresh one wins."""
    if target.exists() and not is_current_conversion(target):
        _set_aside(target)
    try:
        os.replace(staging, target)
    except OSError:
        if not is_current_conversion(target):  # not a concurrent conversion of the same network
            raise


def remove_leftovers(target: Path) -> int:
    """Remove the temporary folders that killed conversions of `target` left beside it; their size in bytes."""
    removed = 0
    for entry, pid in pid_named_folders(target):
        try:
            age = time.time() - entry.stat().st_mtime
        except OSError:
            continue
        if pid == os.getpid() or (pid is None and age < LEFTOVER_AGE_S):
            continue  # this process's own, or an unnamed one that may still be in use
        if pid is not None and process_alive(pid) and age < 24 * 3600:
            continue  # another process is converting now
        try:
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        except OSError:  # removed under us by another run's clean-up
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed += size
    return removed


def ensure_conversion(spec: BackboneSpec, folder: Path) -> None:
    """Make `folder` hold a verified float32 conversion of `spec`'s network, converting (again) if needed."""
    left = remove_leftovers(folder)
    if left:
        _say(f"removed {format_bytes(left)} of OpenVINO conversion that a killed run left beside {folder}")
    problem = conversion_problem(folder)
    if problem is not None:
        if folder.exists():
            _say(f"the OpenVINO model in {folder} {problem}: converting it again")
        convert_to_openvino(spec, folder)


#: What the int8 model folder quantize writes holds (its `format.txt`).
INT8_FORMAT = "int8 feature network v1: float32 RGB 0-255 pixels in, NNCF post-training quantization\n"


def int8_folder(float_model: Path, calibration: str) -> Path:
    """The folder of the int8 model quantized from `float_model` on the calibration set `calibration`."""
    return float_model.parent / naming.int8_folder_name(float_model, calibration)


def int8_model_file(spec: BackboneSpec, float_model: Path) -> Path:
    """The int8 model.xml of `spec` (whose calibration is settled); one line if it is missing or damaged."""
    if spec.calibration is None:
        raise BackboneError("--precision int8: no calibration chosen (run `bottleneck features` first)")
    folder = int8_folder(float_model, spec.calibration)
    problem = conversion_problem(folder, INT8_FORMAT)
    if problem is not None:
        raise CacheError(
            f"the int8 model in {folder} {problem}: delete that folder and run `bottleneck features "
            "DATA --precision int8` again (it quantizes anew; another calibration set is another store)"
        )
    return folder / "model.xml"


class OpenVinoFeatureModel:
    """Runs a converted feature network with OpenVINO on uint8 RGB batches; converts it into `folder` first if needed.

    `folder` holds the float32 conversion (`spec.float32_spec`'s); float32 and bf16 run it, int8 runs the
    quantized model `bottleneck.backbones.quantize` made beside it for `spec.calibration`.
    """

    def __init__(self, spec: BackboneSpec, folder: Path):
        ov = _import_openvino()
        self.spec = spec
        if spec.precision not in INFERENCE_PRECISION:
            raise BackboneError(f"--precision {spec.precision} does not run on OpenVINO; use --runtime keras")
        check_cpu_precision(spec.precision)
        if spec.precision == "int8":  # runs its own files, checked against their record; not the float32 ones
            model_xml = int8_model_file(spec, folder)
        else:
            ensure_conversion(spec.float32_spec, folder)
            model_xml = folder / "model.xml"
        self._compiled = compile_on_cpu(str(model_xml), spec.precision)
        self.feature_dim = int(self._compiled.outputs[0].get_partial_shape()[-1].get_length())
        self.versions = {"openvino": ov.__version__}
        if spec.precision != "float32":
            self.versions["precision"] = spec.precision

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 -> (n, feature_dim) float32."""
        return np.asarray(self._compiled(batch.astype(np.float32))[0], dtype=np.float32)
