"""int8 features: the OpenVINO conversion quantized by NNCF on calibration images, kept in the cache, reused.

The first `--precision int8` run in a cache calibrates: up to 300 images (a seeded choice over the
files sorted by path, a bad file replaced by the next) of its own DATA, or of `--calibration DIR`,
decoded by the one image pipeline, feed NNCF's post-training quantization of the float32
conversion. The quantized model is kept beside the float32 one as
`<float32 fingerprint>.int8-<digest>.openvino/`, with a record of the calibration (which images by
content hash, how many, how long quantizing took, NNCF's version) and of its files' hashes. The
digest of the calibration set is part of the int8 fingerprint: another calibration is another
store. Later runs, on any folder, reuse the first calibration made in the cache
(`default_calibration`), so the same image in two folders hits one store; `--calibration DIR`
picks another set on purpose.

Nothing here imports OpenVINO or NNCF until a model is quantized, so commands that only look up
the calibration answer at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck import naming
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import BackboneError, CacheError

DEFAULT_CALIBRATION_IMAGES = 300
CALIBRATION_SEED = 0
#: Part of the calibration digest: bump when the quantization recipe changes what it makes of the same images.
METHOD = "nncf-ptq-performance-fastbias-v1"
CALIBRATION_FILE = "calibration.json"
#: How many calibration images the quantized model is compared with float32 on, after quantizing.
CHECK_IMAGES = 32


@dataclass
class CalibrationSet:
    """The decoded images a quantization is calibrated on, and the digest that names the set."""

    digest: str
    hashes: list[str]
    pixels: np.ndarray  # (n, size, size, 3) uint8
    source: str


def float_folder(spec: BackboneSpec, cache_dir: str | os.PathLike) -> Path:
    """Where the float32 OpenVINO conversion of `spec`'s network lives in the cache."""
    return naming.openvino_folder(Path(cache_dir), spec.float32_spec.fingerprint()).resolve()


def calibrations_made(float_model: Path) -> list[dict]:
    """The calibration records of the int8 models made from `float_model`, oldest first."""
    records = []
    for folder in float_model.parent.glob(naming.int8_folders_glob(float_model)):
        try:
            record = json.loads((folder / CALIBRATION_FILE).read_text())
            records.append(
                {"digest": str(record["calibration"]["digest"]), "created": float(record["created"]), "folder": folder}
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # cut short or damaged: not a calibration anyone can reuse
    return sorted(records, key=lambda record: (record["created"], record["digest"]))


def default_calibration(float_model: Path) -> str | None:
    """The first calibration made in this cache for this network, which int8 runs reuse; None if none."""
    made = calibrations_made(float_model)
    return made[0]["digest"] if made else None


def with_default_calibration(spec: BackboneSpec, cache_dir: str | os.PathLike) -> BackboneSpec:
    """`spec` with its cache's default calibration when it is int8 and has none yet (unchanged otherwise)."""
    if spec.precision != "int8" or spec.calibration is not None:
        return spec
    made = default_calibration(float_folder(spec, cache_dir))
    return replace(spec, calibration=made) if made else spec


def calibration_digest(hashes: Iterable[str], size: int) -> str:
    """16 hex digits naming a calibration set: its images' content hashes, the input size and the method."""
    identity = {"method": METHOD, "input_size": size, "images": sorted(hashes)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _import_nncf():
    try:
        import nncf
    except ImportError:
        raise BackboneError("--precision int8 needs NNCF: pip install 'bottleneck-transfer[openvino]'") from None
    logging.getLogger("nncf").setLevel(logging.ERROR)
    return nncf


def quantize(spec: BackboneSpec, calibration: CalibrationSet, float_model: Path, log: Callable[[str], None]) -> Path:
    """Quantize the float32 conversion in `float_model` on `calibration` into its int8 folder; return that folder.

    Made in a temporary folder (named with the process id, so a killed run's is cleared later) and
    renamed; the record of the calibration and of the files' hashes is written last.
    """
    import openvino as ov

    from bottleneck.backbones.openvino import (
        INT8_FORMAT,
        RECORD_FILE,
        _file_hashes,
        compile_on_cpu,
        conversion_problem,
        int8_folder,
        remove_leftovers,
    )

    nncf = _import_nncf()
    target = int8_folder(float_model, calibration.digest)
    remove_leftovers(target)
    count = len(calibration.pixels)
    log(
        f"int8: quantizing {spec.name} with NNCF on {count} calibration image{'s' if count != 1 else ''} of "
        f"{calibration.source} (seeded; once per cache, kept in {target.name})"
    )
    started = time.monotonic()
    model = ov.Core().read_model(str(float_model / "model.xml"))
    dataset = nncf.Dataset(range(count), lambda i: calibration.pixels[i : i + 1].astype(np.float32))
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars: never on our stdout (--json)
        quantized = nncf.quantize(model, dataset, subset_size=count, preset=nncf.QuantizationPreset.PERFORMANCE)
    seconds = time.monotonic() - started
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    except OSError as exc:
        raise CacheError(f"cannot write the int8 model into {target.parent} ({exc.strerror or exc})") from None
    try:
        ov.save_model(quantized, str(staging / "model.xml"), compress_to_fp16=False)
        check = _compare_with_float32(
            compile_on_cpu(str(float_model / "model.xml")),
            compile_on_cpu(str(staging / "model.xml"), "int8"),
            calibration.pixels,
        )
        (staging / "format.txt").write_text(INT8_FORMAT)
        record = {
            "format": INT8_FORMAT,
            "sha256": _file_hashes(staging),
            "created": time.time(),
            "calibration": {
                "digest": calibration.digest,
                "images": count,
                "seed": CALIBRATION_SEED,
                "source": calibration.source,
                "content_hashes": sorted(calibration.hashes),
                "method": METHOD,
            },
            "quantized_in_s": round(seconds, 1),
            "versions": {"nncf": str(nncf.__version__), "openvino": str(ov.__version__)},
            "against_float32": check,
        }
        for name in (CALIBRATION_FILE, RECORD_FILE):  # the record last: the folder is complete
            (staging / (name + ".tmp")).write_text(json.dumps(record, indent=1))
            os.replace(staging / (name + ".tmp"), staging / name)
        try:
            os.replace(staging, target)
        except OSError:
            if conversion_problem(target, INT8_FORMAT) is not None:  # not another run's finished quantization
                raise
    except OSError as exc:
        raise CacheError(f"cannot write the int8 model into {target.parent} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(
        f"int8: quantized in {seconds:.0f} s; on {check['images']} calibration images its features are within "
        f"{check['relative_error']:.3f} (relative) of float32's, cosine {check['cosine']:.4f}"
    )
    return target


def _compare_with_float32(float32, int8, pixels: np.ndarray) -> dict:
    """How far the int8 model's features are from float32's on the first calibration images."""
    batch = pixels[:CHECK_IMAGES].astype(np.float32)
    exact = np.asarray(float32(batch)[0], dtype=np.float64)
    approx = np.asarray(int8(batch)[0], dtype=np.float64)
    relative = np.linalg.norm(approx - exact, axis=1) / np.maximum(np.linalg.norm(exact, axis=1), 1e-12)
    cosine = np.sum(approx * exact, axis=1) / np.maximum(
        np.linalg.norm(approx, axis=1) * np.linalg.norm(exact, axis=1), 1e-12
    )
    return {"images": int(len(batch)), "relative_error": float(np.median(relative)), "cosine": float(np.median(cosine))}


def quantized_spec(spec: BackboneSpec, chosen: CalibrationSet, float_model: Path, log) -> BackboneSpec:
    """`spec` calibrated on `chosen`, its int8 model quantized first unless the cache holds a sound one."""
    from bottleneck.backbones.openvino import (
        INT8_FORMAT,
        _set_aside,
        conversion_problem,
        ensure_conversion,
        int8_folder,
    )

    target = int8_folder(float_model, chosen.digest)
    problem = conversion_problem(target, INT8_FORMAT)
    if problem is not None:
        if target.exists():
            log(f"int8: the model in {target} {problem}: quantizing it again")
            _set_aside(target)
        ensure_conversion(spec.float32_spec, float_model)
        quantize(spec, chosen, float_model, log)
    return replace(spec, calibration=chosen.digest)
