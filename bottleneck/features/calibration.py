"""Which images calibrate `--precision int8`: a seeded choice of DATA's images (or `--calibration DIR`'s),
decoded by the one decoder, and the spec settled on the cache's calibration, quantizing once if it has none
(`bottleneck.backbones.quantize` quantizes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck.backbones.openvino import int8_folder
from bottleneck.backbones.quantize import (
    CALIBRATION_SEED,
    DEFAULT_CALIBRATION_IMAGES,
    CalibrationSet,
    calibration_digest,
    float_folder,
    quantized_spec,
    with_default_calibration,
)
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import BackboneError, CacheError
from bottleneck.features.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, too_large
from bottleneck.fs import sha256_bytes


def choose_calibration(
    paths: list[Path],
    size: int,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    max_pixels: int | None = None,
    source: str = "",
) -> CalibrationSet:
    """Up to `count` images of `paths`, in a seeded order over the sorted paths, decoded to `size`.

    A file that cannot be decoded is passed over for the next one, so the set has `count` images
    whenever `paths` holds that many good ones.
    """
    ordered = sorted(paths, key=str)
    order = np.random.default_rng(CALIBRATION_SEED).permutation(len(ordered))
    pixels: list[np.ndarray] = []
    hashes: list[str] = []
    seen: set[str] = set()
    for position in order:
        if len(pixels) >= count:
            break
        path = ordered[int(position)]
        try:
            if too_large(path.stat().st_size, max_pixels or DEFAULT_MAX_PIXELS):
                continue
            data = path.read_bytes()
            content_hash = sha256_bytes(data)
            if content_hash in seen:
                continue
            pixels.append(decode_image(data, size, max_pixels or DEFAULT_MAX_PIXELS))
        except (OSError, ImageDecodeError):
            continue
        hashes.append(content_hash)
        seen.add(content_hash)
    if not pixels:
        raise BackboneError(
            f"--precision int8 needs calibration images, and none of the {len(paths)} files of "
            f"{source or 'DATA'} could be decoded"
        )
    return CalibrationSet(calibration_digest(hashes, size), hashes, np.stack(pixels), source)


def calibration_paths(folder: str | os.PathLike) -> list[Path]:
    """Every file under `folder` (hidden ones left out): `--calibration DIR` needs no class sub-folders."""
    root = Path(folder)
    if not root.is_dir():
        raise BackboneError(f"--calibration {folder}: not a folder of images")
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]


def settle_calibration(
    spec: BackboneSpec,
    cache_dir: str | os.PathLike,
    candidates: list[Path] | None = None,
    calibration_dir: str | None = None,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    max_pixels: int | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> BackboneSpec:
    """`spec` with the calibration its int8 features come from, quantizing once if the cache has none.

    `--calibration DIR` picks (or makes) the calibration on DIR's images; otherwise the cache's first
    calibration is reused; otherwise `candidates` (the run's own images) are calibrated on. Without
    candidates (`predict`, `train-head`) a missing int8 model is one line.
    """
    if spec.precision != "int8":
        return spec
    from bottleneck.backbones.openvino import check_cpu_precision

    float_model = float_folder(spec, cache_dir)
    note = check_cpu_precision("int8")
    if note:
        log(f"note: {note}")
    if calibration_dir is not None:
        chosen = choose_calibration(
            calibration_paths(calibration_dir), spec.input_size, count, max_pixels, source=str(calibration_dir)
        )
        return quantized_spec(spec, chosen, float_model, log)
    spec = with_default_calibration(spec, cache_dir)
    if spec.calibration is not None:
        if not int8_folder(float_model, spec.calibration).exists():
            raise CacheError(
                f"the int8 model of calibration {spec.calibration} is not in {cache_dir}: run "
                f"`bottleneck features DATA --cache {cache_dir} --precision int8 --calibration DIR` "
                "with the images it was calibrated on, or use a cache that holds it"
            )
        return spec
    if not candidates:
        raise CacheError(
            f"no int8 model in {cache_dir} yet: run `bottleneck features DATA --cache {cache_dir} "
            "--precision int8` first (it calibrates on DATA's images, or on --calibration DIR)"
        )
    chosen = choose_calibration(candidates, spec.input_size, count, max_pixels, source="DATA")
    return quantized_spec(spec, chosen, float_model, log)
