"""Compile the feature network the way each Keras backend runs it fastest.

Each function takes the frozen `keras.Model` and returns `run(uint8 batch) -> features`, with the
cast to float32 inside the compiled code, so only uint8 pixels (a quarter of the bytes) cross from
NumPy into the backend and onto its device:

- TensorFlow: one `tf.function` with a fixed input signature (traced once);
- JAX: `jax.jit` over the model's stateless call, weights passed as arguments (not baked into the
  program as constants, which would make compiling slow); batches are padded to the size compiled
  for, so the last, shorter batch does not compile the network again;
- PyTorch: eager under `torch.inference_mode`. `torch.compile` made InceptionV3 2.5x faster on this
  2-core CPU (75 px) but took 3 minutes to compile, once per process: a win only past ~20,000
  images, so it is opt-in (`BOTTLENECK_TORCH_COMPILE=1`).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

#: Set to 1 to run the PyTorch backend through `torch.compile` (minutes to compile, then faster).
TORCH_COMPILE_ENV = "BOTTLENECK_TORCH_COMPILE"

Runner = Callable[[np.ndarray], np.ndarray]


def compile_feature_network(network, size: int, backend: str) -> Runner:
    """`run(batch)`: (n, size, size, 3) uint8 -> (n, dim) features, on `backend`."""
    if backend == "tensorflow":
        return _tensorflow_runner(network, size)
    if backend == "jax":
        return _jax_runner(network)
    if backend == "torch":
        return _torch_runner(network)
    raise ValueError(f"no runner for the {backend} backend")


def _tensorflow_runner(network, size: int) -> Runner:
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def features(batch):
        return network(tf.cast(batch, tf.float32), training=False)

    return lambda batch: features(batch).numpy()


def _jax_runner(network) -> Runner:
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in network.trainable_variables]
    fixed = [v.value for v in network.non_trainable_variables]

    @jax.jit
    def features(trainable, fixed, batch):
        outputs, _ = network.stateless_call(trainable, fixed, batch.astype(jnp.float32), training=False)
        return outputs

    compiled: set[int] = set()  # batch sizes compiled so far

    def run(batch: np.ndarray) -> np.ndarray:
        rows = len(batch)
        fits = [size for size in compiled if size >= rows]
        if rows and fits and rows not in compiled:  # pad to a compiled shape: cheaper than compiling again
            batch = np.concatenate([batch, np.zeros((min(fits) - rows, *batch.shape[1:]), batch.dtype)])
        compiled.add(len(batch))
        return np.asarray(features(trainable, fixed, batch))[:rows]

    return run


def _torch_runner(network) -> Runner:
    import torch

    weights = network.weights
    device = weights[0].value.device if weights else torch.device("cpu")

    def features(pixels):
        return network(pixels, training=False)

    if os.environ.get(TORCH_COMPILE_ENV) == "1":
        features = torch.compile(features)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            pixels = torch.from_numpy(batch).to(device, non_blocking=True).float()
            return features(pixels).float().cpu().numpy()

    return run


# ---------------------------------------------------------------------------------------------
# --batch-size auto

#: Batch sizes tried on a GPU, smallest first; the probe stops at the first that does not fit or gains little.
GPU_BATCH_SIZES = (32, 64, 128, 256, 512)
#: A larger batch must be this much faster per image to be chosen.
MIN_GAIN = 1.05


def auto_batch_size(model, cpu_default: int, log: Callable[[str], None] = lambda message: None) -> int:
    """The batch size for `model` on this machine: `cpu_default` without a GPU, else the fastest that fits.

    On a GPU each candidate runs a few batches of noise (after one to compile); the probe stops when
    a batch does not fit in memory or is less than 5% faster per image than the best so far.
    """
    from bottleneck.backbones.backend import accelerators

    backend = getattr(model, "backend", None)
    if backend not in ("tensorflow", "jax", "torch") or not accelerators(backend):
        return cpu_default
    size = model.spec.input_size
    best, best_rate = cpu_default, 0.0
    for batch_size in GPU_BATCH_SIZES:
        try:
            rate = _images_per_second(model, batch_size, size)
        except Exception as exc:  # noqa: BLE001 - out of memory, in each backend's own words
            if not _is_out_of_memory(exc):
                raise
            break
        if rate < best_rate * MIN_GAIN:
            break
        best, best_rate = batch_size, rate
    log(f"--batch-size auto: {best} ({best_rate:.0f} images/s on {', '.join(accelerators(backend))})")
    return best


def _images_per_second(model, batch_size: int, size: int, repeats: int = 3) -> float:
    import time

    batch = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    model(batch)  # compiles, and warms the allocator
    started = time.perf_counter()
    for _ in range(repeats):
        model(batch)
    return batch_size * repeats / (time.perf_counter() - started)


def _is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(words in text for words in ("out of memory", "resource_exhausted", "resourceexhausted", "oom"))
