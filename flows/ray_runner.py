"""Scale-out on Ray through Prefect's `RayTaskRunner` (prefect-ray): how flows pick, connect to and size Ray work.

`runner="ray"` in `label-campaign`, `fmbseg-pipeline` and `evaluate` runs a subflow whose task runner is a
`RayTaskRunner`; each unit of work (a not-yet-done shard, a (benchmark, segmenter) pair) is one Prefect task that
Ray places on a free slot of the cluster: `gpus_per_shard` GPUs and `cpus_per_shard` CPUs each. Nothing here
schedules: Ray queues the tasks and starts each one as soon as a node has the resources, so a slow or lost node
only delays the shards it holds, and the others go to whoever is free.

Where Ray comes from (`ray_address`):
- None (default): a new Ray instance on this machine for the duration of the run (`ray.init(address="local")`;
  an existing cluster is never joined by accident);
- "auto": join the cluster already running on this machine (`ray start --head` / `ray start --address ...`);
  an error when there is none;
- "HOST:PORT" or "ray://HOST:10001": that cluster's GCS or Ray Client address.
When this process already holds a Ray connection (`ray.init` done by the caller), it is used as is.

Worker processes: Ray reuses its worker processes across tasks, and `stages.models_cache` keeps the models loaded
per process, so a worker loads CLIP and SAM once and labels every shard it gets with them. Ray's default for
GPU tasks is one task per process (`max_calls=1`, to free GPU memory); that would reload the models for every
shard, so shard tasks set `max_calls=0` (unlimited).

Faults: a task whose worker process or node dies is re-run by Ray (`max_retries`) in another process, under the
same Prefect task run; exceptions inside a task are retried by Prefect (the task's `retries`). Both rely on
`label_shard` being idempotent: a shard is committed by its done marker, written last (DESIGN §5).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Literal

RUNNERS = ("local", "ray")
Runner = Literal[RUNNERS]


def check_runner(runner: str) -> str:
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    return runner


def ray_task_runner(address: str | None = None, init_kwargs: dict | None = None):
    """A `RayTaskRunner` for `address` (None: a new local instance; "auto": the running cluster, else an error)."""
    from prefect_ray import RayTaskRunner

    kwargs = dict(init_kwargs or {})
    if address is None:
        # RayTaskRunner() alone calls ray.init() with no address, which joins whatever cluster it finds
        # (RAY_ADDRESS, /tmp/ray's latest one): ask for a fresh local one explicitly.
        kwargs.setdefault("address", "local")
        return RayTaskRunner(init_kwargs=kwargs)
    if address == "auto":
        # RayTaskRunner maps address="auto" to ray.init() (which starts a local instance when no cluster is
        # found); passing it through init_kwargs keeps Ray's "auto" meaning: join the running cluster or fail.
        kwargs["address"] = "auto"
        return RayTaskRunner(init_kwargs=kwargs)
    return RayTaskRunner(address=address, init_kwargs=kwargs)


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster declares (0 when none or not connected)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def default_gpus_per_shard(gpus_per_shard: float | None) -> float:
    """`gpus_per_shard`, or 1 when the cluster has GPUs and 0 otherwise (call once connected)."""
    if gpus_per_shard is not None:
        if gpus_per_shard < 0:
            raise ValueError(f"gpus_per_shard must be >= 0, got {gpus_per_shard}")
        return float(gpus_per_shard)
    return 1.0 if cluster_gpus() > 0 else 0.0


def shard_remote_options(gpus: float, cpus: float, max_retries: int) -> dict[str, Any]:
    """Options for `prefect_ray.context.remote_options` around a shard task's `submit`."""
    if cpus < 0:
        raise ValueError(f"cpus_per_shard must be >= 0, got {cpus}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    gpus_int = int(gpus) if float(gpus).is_integer() else gpus
    cpus_int = int(cpus) if float(cpus).is_integer() else cpus
    # max_calls=0: keep the worker (and the models it loaded) for the next shard; retry_exceptions=False:
    # exceptions are the Prefect task's business (its retries), Ray retries only dead processes and nodes.
    return {"num_gpus": gpus_int, "num_cpus": cpus_int, "max_retries": int(max_retries), "max_calls": 0,
            "retry_exceptions": False}


def worker_info() -> dict[str, Any]:
    """Where this code runs: host name and process id (recorded in every shard result)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}
