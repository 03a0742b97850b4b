"""The Ray engine (`--engine ray`): shards over a pool of Ray Data actors, on one machine or a cluster.

Ray Data runs `ShardWorker` as a fixed pool of `--workers` actors, each holding `--gpus-per-worker`
GPUs and loading the backbone once; each shard (one row of the dataset) is computed and written as
one segment by whichever actor is free (see `bottleneck.features.engines` for the steps). Faults:

- a Python error inside a shard is retried in the worker (`SHARD_TRIES` tries), then reported;
- a worker process that dies (killed, out of memory) is restarted by Ray Data, which sends its shard
  again; tries are counted on disk, so a shard that kills its worker every time is given up after
  `SHARD_TRIES` tries too; a shard whose segment an earlier try wrote is not computed again;
- a shard that fails every try is reported and its images counted as failed, while every other
  shard is kept (Ray Data's `max_errored_blocks`): a rerun computes only what is missing.

On a cluster, DATA and the cache must be on a file system every node sees at the same paths.
Ray is imported only here, and only in functions: `import bottleneck` never loads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import BottleneckError, DataError
from bottleneck.features.engines.sharded import FAULT_ENV, Shard, ShardedEngine, ShardJob, ShardResult, ShardRunner

#: pandas (which Ray Data imports) looks for the numerical library also called `bottleneck`, finds this
#: package and warns that its version is too old; it then does without it. Workers get the same filter.
PANDAS_WARNING = r"Pandas requires version .* of 'bottleneck'"
_PYTHONWARNINGS_PANDAS = "ignore:Pandas requires version:UserWarning"
CONNECT_TIMEOUT_S = 5.0
RAY_LOG = "ray-engine.log"  # in the cache: what Ray's native code printed during a run


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=PANDAS_WARNING, category=UserWarning)


def import_ray():
    """`ray` with Ray Data, quietly, or a one-line error if it is not installed."""
    _quiet()
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DataError("--engine ray needs Ray: pip install 'bottleneck-transfer[ray]'") from None
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # failures are reported per shard, by us
    return ray


def _check_reachable(address: str) -> None:
    """Refuse, in one line and within seconds, an address where nothing listens (Ray itself waits long)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise DataError(f"--ray-address must be HOST:PORT, ray://HOST:PORT, 'auto' or 'local'; got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise DataError(f"cannot reach the Ray cluster at {address}: {reason}") from None


@contextlib.contextmanager
def _native_stderr_to(path: Path) -> Iterator[None]:
    """Send what Ray's C++ core writes to file descriptor 2 into `path`; Python's stderr stays on the terminal.

    Ray Data makes Ray's core log a note about restartable actors on every run, for example.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        os.close(saved)
        yield
        return
    original = sys.stderr
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
    os.dup2(log_fd, 2)
    os.close(log_fd)
    if original is sys.__stderr__:  # not when a test harness captures stderr itself
        sys.stderr = terminal
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = original
        terminal.close()


class ShardWorker:
    """One Ray actor: loads the backbone once, then computes and writes the shards it is given."""

    def __init__(self, job: ShardJob):
        _quiet()
        self.runner = ShardRunner(job)
        self.runner.load_model()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [pickle.dumps(self.runner.run(pickle.loads(blob))) for blob in batch["shard"]]
        return {"result": np.array(results, dtype=object)}


class RayEngine(ShardedEngine):
    """Shards through `ray.data` `map_batches` over a fixed pool of model-holding actors."""

    name = "ray"

    def __init__(self, options):
        super().__init__(options)
        self._started_ray = False
        self._actors = 1
        self._ray = None

    def check(self) -> None:
        self._ray = import_ray()
        if self.options.ray_address:
            _check_reachable(self.options.ray_address)

    def start(self, spec: BackboneSpec, cache_dir: Path, log: Callable[[str], None]) -> None:
        ray = self._ray
        options = self.options
        if not ray.is_initialized():
            address = options.ray_address or "local"
            settings = dict(
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                runtime_env={"env_vars": self._worker_env()},
            )
            if address == "local":
                # One logical CPU more than the actors take, so Ray Data's own tasks are never starved.
                settings["num_cpus"] = max(os.cpu_count() or 1, (options.workers or 1) + 1)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ray.init(address=address, **settings)
            except (ConnectionError, TimeoutError, RuntimeError, ValueError, OSError) as exc:
                text = str(exc).strip().splitlines()
                raise DataError(
                    f"cannot connect to Ray at {address}: {text[0] if text else type(exc).__name__}"
                ) from None
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        want = options.gpus_per_worker or 0
        if want and gpus < want:
            where = "this machine has" if not options.ray_address else "the Ray cluster has"
            raise DataError(
                f"--gpus-per-worker {want:g}: {where} {'no' if not gpus else f'only {gpus:g}'} GPU"
                f"{'' if gpus == 1 else 's'}"
            )
        if options.workers:
            self._actors = options.workers
        elif want:
            self._actors = max(1, int(gpus // want))  # one actor per GPU (or group of GPUs)
        else:
            self._actors = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))  # one per machine
        from bottleneck.backbones.runtime import get_feature_model, resolve_runtime

        if resolve_runtime(options.runtime, spec) == "openvino":
            get_feature_model(spec, options.runtime, cache_dir)  # convert once here, not in every actor at once
        log(
            f"ray: {self._actors} worker{'s' if self._actors != 1 else ''}"
            + (f" with {want:g} GPU{'s' if want != 1 else ''} each" if want else "")
            + f" on {int(resources.get('CPU', 0))} CPUs"
        )

    @staticmethod
    def _worker_env() -> dict[str, str]:
        env = {
            "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), _PYTHONWARNINGS_PANDAS])),
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        }
        for name in (
            FAULT_ENV,
            "KERAS_BACKEND",
            "BOTTLENECK_RUNTIME",
        ):  # the workers run the backbone as this process does
            if os.environ.get(name):
                env[name] = os.environ[name]
        return env

    def quiet(self, cache_dir: Path) -> contextlib.AbstractContextManager:
        return _native_stderr_to(cache_dir / RAY_LOG)

    def stop(self) -> None:
        if self._started_ray and self._ray is not None:
            self._ray.shutdown()
            self._started_ray = False

    def map_shards(self, job: ShardJob, shards: list[Shard], log: Callable[[str], None]) -> Iterator[ShardResult]:
        ray = self._ray
        with warnings.catch_warnings():  # Ray Data's own deprecation notes about its defaults
            warnings.simplefilter("ignore", DeprecationWarning)
            context = ray.data.DataContext.get_current()
        context.max_errored_blocks = -1  # a shard that fails every try is reported; the others go on
        context.enable_progress_bars = False  # ours counts images
        context.print_on_execution_start = False
        want = self.options.gpus_per_worker or 0
        dataset = ray.data.from_items(
            [{"shard": pickle.dumps(shard)} for shard in shards], override_num_blocks=len(shards)
        )
        results = dataset.map_batches(
            ShardWorker,
            fn_constructor_kwargs={"job": job},
            batch_size=1,
            concurrency=self._actors,
            num_cpus=1,
            **({"num_gpus": want} if want else {}),
            zero_copy_batch=True,
            # Ray Data restarts a dead actor (which reloads the model) and sends its shard again, without
            # limit; `ShardRunner` counts the tries on disk and gives up on a shard after SHARD_TRIES.
            runtime_env={"env_vars": self._worker_env()},
        )
        try:
            for row in results.iter_rows():
                yield pickle.loads(row["result"])
        except BottleneckError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray's errors become one line
            text = str(exc).strip().splitlines()
            raise BottleneckError(f"the Ray engine failed: {text[-1] if text else type(exc).__name__}") from None
