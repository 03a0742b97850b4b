"""Engines: who computes the images a run still needs, behind one small seam.

`compute_into_store` settles every image it can from the hash index, then hands the rest (the
todo list) to an engine:

- `local` (the default): one process; threads read, hash and decode ahead while the backbone
  computes, and each batch is committed as a part as soon as it is computed (`engines/local.py`).
- `ray`: Ray Data spreads shards over a pool of actors that each load the model once, on one
  machine or a cluster (`engines/ray.py`, imported only when asked for).

A sharded engine follows three steps, so another scheduler (Spark, Slurm, ...) plugs in by
implementing `ShardedEngine.map_shards` alone:

1. `plan_shards`: the driver cuts the todo list into `Shard`s of `--shard-size` images (the
   members of a tar shard make one of their own), each named from its content (backbone
   fingerprint + every file's path, size and mtime), so a retried or resumed shard finds its own work;
2. `ShardRunner.compute`: a worker reads, hashes, decodes and computes one shard;
3. `ShardRunner.write`: it writes the shard's rows (and its failed images) as one store segment,
   under a temporary name and a rename. A shard whose segment exists is not computed again.

The driver holds the store's lock all along; it adds each shard's hashes to the hash index as
results arrive and, at the end, `finish` brings every segment into the store.
"""

from __future__ import annotations

from bottleneck.features.engines.base import DEFAULT_BATCH_SIZE, NON_FINITE, Engine, Tally, computed_by, non_finite_rows
from bottleneck.features.engines.sharded import (
    DEFAULT_SHARD_SIZE,
    FAULT_ENV,
    SHARD_TRIES,
    Shard,
    ShardedEngine,
    ShardJob,
    ShardResult,
    ShardRunner,
    ViewPlan,
    make_job,
    plan_shards,
)

ENGINES = ("local", "ray")


def get_engine(options) -> Engine:
    """The engine `options.engine` names; Ray is imported only for `ray`."""
    if options.engine == "ray":
        from bottleneck.features.engines.ray import RayEngine

        return RayEngine(options)
    from bottleneck.features.engines.local import LocalEngine

    return LocalEngine(options)


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SHARD_SIZE",
    "ENGINES",
    "FAULT_ENV",
    "NON_FINITE",
    "SHARD_TRIES",
    "Engine",
    "Shard",
    "ShardJob",
    "ShardResult",
    "ShardRunner",
    "ShardedEngine",
    "Tally",
    "ViewPlan",
    "computed_by",
    "get_engine",
    "make_job",
    "non_finite_rows",
    "plan_shards",
]
