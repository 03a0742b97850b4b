"""Shared fixtures: small synthetic image folders, made fresh by each test that needs one."""

from __future__ import annotations

import io
import os
from pathlib import Path


def _one_thread_pool_per_worker() -> None:
    """Under `pytest -n N` (N > 1), give each worker's native libraries one thread per pool.

    `make test` runs two workers on two cores; TensorFlow, oneDNN and OpenBLAS each sizing their pools to the
    whole machine in both made them fight: the fast suite took 207 s of CPU (125 s) against 170 s (108 s) with
    one thread each. Set before NumPy and TensorFlow load (they read these once); inherited by subprocesses.
    """
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        for name in (
            "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS",
            "TF_NUM_INTRAOP_THREADS",
            "TF_NUM_INTEROP_THREADS",
        ):
            os.environ.setdefault(name, "1")


_one_thread_pool_per_worker()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

# Keep TensorFlow quiet and single-process friendly in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `--runtime auto` picks Keras in tests: each test's fresh cache would otherwise convert its backbone to OpenVINO
# once more (minutes in all). tests/test_precision.py unsets it to test auto itself; OpenVINO has its own tests.
os.environ["BOTTLENECK_RUNTIME"] = "keras"

TEST_SIZE = 75  # the smallest input InceptionV3 takes: fast enough for tests on 2 cores
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (30, 60, 200)}


def synthetic_image(colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A colour field with a seeded pattern, so every image has distinct content."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = np.empty((height, width, 3), np.float64)
    base[:] = colour
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = 40 * np.sin((xx * (1 + seed % 5) + yy * (seed % 3)) / 6.0)
    pixels = base + stripes[..., None] + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_dataset(
    root: Path, per_class: int = 3, classes: dict = COLOURS, fmt: str = "PNG", start: int = 0
) -> list[Path]:
    """Write `per_class` images for each class into root/<class>/; return their paths."""
    paths = []
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for c, (label, colour) in enumerate(classes.items()):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            path = folder / f"{label}_{i:03d}.{ext}"
            synthetic_image(colour, seed=c * 1000 + i).save(path, fmt)
            paths.append(path)
    return paths


def image_bytes(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_dataset(root)
    return root


#: The `pixels` backbone at 8x8: features in milliseconds, no network, for tests of everything around them.
PIXELS = ["--backbone", "pixels", "--image-size", "8"]


@pytest.fixture
def pixels_extracted(tmp_path: Path) -> tuple[Path, Path]:
    """(DATA, CACHE): 12 images in 3 classes, their `pixels` features computed by the CLI."""
    from bottleneck.cli import main

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=4)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    return data, cache


#: The files that take longest (measured with --durations), started first: `make test` hands whole files to its two
#: workers (--dist loadfile), and a long file begun last would leave one worker alone at the end.
LONGEST_FIRST = (
    "test_foundation.py",
    "test_api.py",
    "test_demo.py",
    "test_backends.py",
    "test_export.py",
    "test_fine_tune.py",
    "test_engines.py",
    "test_applications.py",
    "test_extract.py",
    "test_quiet.py",
    "test_precision.py",
    "test_faults_disk.py",
    "test_backbone.py",
    "test_audit.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist: keep the collection's order of files (below)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
