"""Which Keras backend runs the network (TensorFlow, JAX or PyTorch), on which device, at which precision.

Keras 3 runs one model on any of three backends, chosen once per process before Keras is imported
(`KERAS_BACKEND`). `use_backend` makes that choice for a command (`--backend`), with one line when
the backend is not installed or Keras already runs on another one in this process. Nothing here
imports a backend until a network is needed, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from functools import cache

from bottleneck.backbones.spec import PRECISIONS
from bottleneck.errors import BackboneError

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_BACKEND = "tensorflow"

#: The pip extra that brings each backend (`pip install 'bottleneck-transfer[jax]'`).
EXTRAS = {"tensorflow": "cpu' (or '[gpu]' on a CUDA machine", "jax": "jax", "torch": "torch"}
#: The module whose presence says a backend is installed.
_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}

#: Keras' dtype policy for `--precision mixed`: float16 compute, float32 variables (Keras' GPU recipe).
MIXED_POLICY = "mixed_float16"


def requested_backend(name: str | None = None) -> str:
    """`name`, else `KERAS_BACKEND`, else TensorFlow; one line if it is not one of `BACKENDS`."""
    chosen = name or os.environ.get("KERAS_BACKEND") or DEFAULT_BACKEND
    if chosen not in BACKENDS:
        where = "--backend" if name else "KERAS_BACKEND"
        raise BackboneError(f"unknown {where} {chosen!r}; choose one of: {', '.join(BACKENDS)}")
    return chosen


def is_installed(backend: str) -> bool:
    return importlib.util.find_spec(_MODULES[backend]) is not None


def missing_backend_message(backend: str) -> str:
    return (
        f"the {backend} backend is not installed: pip install 'bottleneck-transfer[{EXTRAS[backend]}]' "
        "(or choose another --backend)"
    )


def use_backend(name: str | None = None) -> str:
    """Make `name` (or `KERAS_BACKEND`, else TensorFlow) the Keras backend of this process; return it.

    Must run before Keras is imported; afterwards it only checks that Keras runs on `name`.
    """
    backend = requested_backend(name)
    if not is_installed(backend):
        raise BackboneError(missing_backend_message(backend))
    if "keras" in sys.modules:
        running = active_backend()
        if running != backend:
            raise BackboneError(
                f"Keras already runs on {running} in this process and cannot switch to {backend}; "
                f"run the command in a new process (--backend {backend} or KERAS_BACKEND={backend})"
            )
        return backend
    os.environ["KERAS_BACKEND"] = backend
    return backend


def active_backend() -> str:
    """The backend Keras runs on in this process (importing Keras if it is not yet imported)."""
    return import_keras().config.backend()


#: Settings under which a library may compute float32 in a narrower type: oneDNN (TensorFlow, PyTorch and
#: OpenVINO's CPU kernels) in bf16 on CPUs with AVX512_BF16 or AMX, TensorFlow's own switch for it.
FPMATH_ENV = {"ONEDNN_DEFAULT_FPMATH_MODE": "STRICT", "TF_SET_ONEDNN_FPMATH_MODE": "STRICT"}


def strict_float32_environment() -> None:
    """Make float32 mean float32 arithmetic in the libraries loaded after this (oneDNN reads it once).

    `--precision bf16` and `int8` are separate stores computed by OpenVINO with an explicit hint, so
    nothing of ours needs an implicit down-conversion; one set by the user for other work is overridden,
    with a line saying so, since it would store bf16 features under a float32 name.
    """
    for name, strict in FPMATH_ENV.items():
        given = os.environ.get(name)
        if given and given.upper() != strict:
            print(
                f"bottleneck: {name}={given} would compute float32 features in a narrower type; "
                f"set to {strict} for this process",
                file=sys.stderr,
                flush=True,
            )
        os.environ[name] = strict


def strict_float32_backend(keras) -> None:
    """No TensorFloat-32 (10-bit mantissa) in float32 matrix products and convolutions, on any backend.

    TensorFlow and PyTorch's cuDNN use TF32 by default on Ampere and later GPUs, JAX's default matmul
    precision may too: float32 features would then differ from the CPU's by ~1e-3, in one store.
    """
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


def float32_settings(keras) -> dict[str, object]:
    """What each library says about float32 arithmetic in this process (tests read it on any CPU)."""
    settings: dict[str, object] = {name: os.environ.get(name) for name in FPMATH_ENV}
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        settings["tensorflow_tf32"] = tf.config.experimental.tensor_float_32_execution_enabled()
    elif backend == "jax":
        import jax

        settings["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
    elif backend == "torch":
        import torch

        settings["torch_cuda_matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
        settings["torch_cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        settings["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return settings


@contextlib.contextmanager
def _jax_kept_out(keep_out: bool):
    """While TensorFlow loads for the TensorFlow backend, `import jax` fails.

    TensorFlow's TFLite helpers import JAX whenever it is installed (and tolerate its absence): a
    second runtime loaded for nothing, whose garbage-collection callbacks once swallowed a SIGTERM.
    An explicit `import jax` later (the JAX backend, in another step) still works.
    """
    if not keep_out or "tensorflow" in sys.modules or "jax" in sys.modules:
        yield
        return
    # typeshed types sys.modules' values as modules only; None is documented and is what we mean.
    sys.modules["jax"] = None  # type: ignore[assignment]  # the import system's own marker for "cannot be imported"
    try:
        importlib.import_module("tensorflow")  # loaded here, without JAX
        yield
    finally:
        if sys.modules.get("jax", 0) is None:
            del sys.modules["jax"]


def quiet_startup():
    """A context keeping a backend's native start-up lines off the terminal while it is imported (or first asked
    about its devices): TensorFlow's absl preamble and oneDNN notice come from C++ before TF_CPP_MIN_LOG_LEVEL
    applies. They go to a log file (`bottleneck.quiet.native_log_path`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ chatter once logging is set up
    from bottleneck.quiet import native_startup_quiet

    return native_startup_quiet()


def import_keras():
    """Keras on the selected backend, quietly, in strict float32; one line if Keras or its backend is not installed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter is not for users
    first = "keras" not in sys.modules
    if first:
        strict_float32_environment()
    backend = os.environ.get("KERAS_BACKEND", DEFAULT_BACKEND)
    if "keras" not in sys.modules and backend in BACKENDS and not is_installed(backend):
        raise BackboneError(missing_backend_message(backend))
    try:
        with quiet_startup(), _jax_kept_out(backend == "tensorflow"):
            import keras
    except ImportError as exc:
        if "keras" in str(exc).lower() and "No module named" in str(exc):
            raise BackboneError("Keras is not installed: pip install 'bottleneck-transfer[cpu]'") from None
        raise BackboneError(f"Keras cannot start on the {backend} backend ({exc})") from None
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # retracing notes and the like; errors still raise
    if first:
        strict_float32_backend(keras)
    return keras


def backend_versions(keras) -> dict[str, str]:
    """{'keras': ..., '<backend>': ...}: what computed a feature, as the store records it."""
    backend = keras.config.backend()
    module = sys.modules.get(_MODULES.get(backend, backend))
    # str(): torch's __version__ is a str subclass that h5py cannot store as an attribute.
    return {"keras": str(keras.__version__), backend: str(getattr(module, "__version__", "unknown"))}


# ---------------------------------------------------------------------------------------------
# Devices


@cache
def accelerators(backend: str) -> tuple[str, ...]:
    """The GPUs (or TPUs) `backend` can run on here, by name; () on a CPU-only machine."""
    with quiet_startup():  # the first import of the backend may happen here (CUDA libraries say a lot)
        return _accelerators(backend)


def _accelerators(backend: str) -> tuple[str, ...]:
    if backend == "tensorflow":
        import tensorflow as tf

        return tuple(d.name for d in tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        try:
            return tuple(str(d) for d in jax.devices() if d.platform != "cpu")
        except RuntimeError:
            return ()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return ()
    return ()


def check_precision(precision: str, backend: str) -> None:
    """`--precision mixed` needs a GPU: on a CPU float16 is slower and still changes the features."""
    if precision not in PRECISIONS:
        raise BackboneError(f"unknown --precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "mixed" and not accelerators(backend):
        raise BackboneError(
            f"--precision mixed needs a GPU, and {backend} sees none here: on a CPU float16 "
            "is slower than float32; drop --precision (or use --precision float32)"
        )
