"""The `evaluate` flow: benchmarks x segmenters, around `stages.evaluate` (DESIGN §2).

The stage writes (and merges into) `<out>/results.json`, `<out>/results.md` and a per-class IoU figure, so several
runs into one `out` accumulate one models x datasets table; this flow publishes that table as a markdown
artifact.

`runner="local"` evaluates in this process (Stage 1 runs once per image for all the `stage1*` segmenters);
`runner="ray"` submits one task per (benchmark, segmenter) to prefect-ray's `RayTaskRunner` (subflow
`evaluate-on-ray`, sized and connected as in flows/ray_runner.py) and merges their results into the same
reports in `out` once all are back.
"""

from __future__ import annotations

import os
from typing import Annotated

from annotated_types import Ge
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.gpu import GPU_TAG
from flows.artifacts import artifact_key, publish_markdown
from flows.label_flow import retry_unless_permanent
from flows.ray_runner import (Runner, check_runner, default_gpus_per_shard, ray_task_runner, shard_remote_options,
                              worker_info)
from fmbseg.datasets import DatasetName
from fmbseg.presets import PresetName
from fmbseg.stage1_config import Stage1Overrides
from stages.evaluate import evaluate, evaluate_one, merge_evaluations, report_key, resolve_models


@task(name="evaluate", tags=[GPU_TAG], cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_permanent)
def evaluate_task(dataset: str, data_root: str, models: str | list[str], out: str, checkpoint: str | None,
                  preset: str | None, device: str, stage1: dict) -> dict:
    """-> `{model: {"mIoU", "mAcc", "aAcc", "IoU": {...}, ...}}`; reports merged into `out`."""
    return evaluate(dataset, data_root, models, out, checkpoint=checkpoint, preset=preset, device=device,
                    stage1=stage1, progress=False)


@task(name="evaluate-one", tags=[GPU_TAG], task_run_name="evaluate-{model}-{dataset}", cache_policy=NO_CACHE, retries=1,
      retry_delay_seconds=10, retry_condition_fn=retry_unless_permanent)
def evaluate_one_task(dataset: str, data_root: str, model: str, checkpoint: str | None, preset: str | None,
                      device: str, stage1: dict) -> dict:
    """One (benchmark, segmenter) pair, no report written -> `{"dataset", "results", "host", "pid"}`."""
    return {**evaluate_one(dataset, data_root, model, checkpoint=checkpoint, preset=preset, device=device,
                           stage1=stage1), **worker_info()}


@flow(name="evaluate-on-ray")
def evaluate_on_ray(pairs: list[dict], checkpoint: str | None, preset: str | None, device: str, stage1: dict,
                    gpus_per_task: float | None = None, cpus_per_task: float = 1.0,
                    worker_restarts: int = 3) -> list[dict]:
    """Submit one `evaluate-one` task per `{"dataset", "data_root", "model"}` of `pairs` to this flow's task runner
    (a `RayTaskRunner`); -> their results, in the order of `pairs`. Fails when any pair fails.

    Args:
        pairs: The (benchmark, data root, segmenter) triples to evaluate, as dicts.
        checkpoint: Alignment checkpoint the fmbseg segmenter needs.
        preset: CLIP/SAM preset of the other segmenters (default: the checkpoint's).
        device: auto, cpu or cuda[:N], on each worker.
        stage1: Stage-1 overrides of the stage1* segmenters (a plain dict of Stage1Config fields).
        gpus_per_task: GPUs per task (empty: 1 when the cluster has GPUs, else 0).
        cpus_per_task: CPUs per task.
        worker_restarts: How often Ray re-runs a task whose worker process or node died.
    """
    from prefect_ray.context import remote_options

    options = shard_remote_options(default_gpus_per_shard(gpus_per_task), cpus_per_task, worker_restarts)
    get_run_logger().info("submitting %d (benchmark, segmenter) tasks to Ray, %s GPU and %s CPU each",
                          len(pairs), options["num_gpus"], options["num_cpus"])
    with remote_options(**options):
        futures = [evaluate_one_task.submit(p["dataset"], p["data_root"], p["model"], checkpoint, preset, device,
                                            stage1) for p in pairs]
    return [f.result() for f in futures]


def results_markdown(out: str) -> str | None:
    """The stage's `results.md` under `out`, when it exists."""
    path = os.path.join(out, "results.md")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _as_list(v: str | list[str]) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


@flow(name="evaluate")
def evaluate_flow(dataset: DatasetName | list[DatasetName], data_root: str | list[str], out: str,
                  models: str | list[str] = "all", checkpoint: str | None = None, preset: PresetName | None = None,
                  device: str = "auto", stage1: Stage1Overrides | None = None, runner: Runner = "local",
                  ray_address: str | None = None, gpus_per_task: Annotated[float, Ge(0)] | None = None,
                  cpus_per_task: Annotated[float, Ge(0)] = 1.0, ray_init_kwargs: dict | None = None) -> dict:
    """Evaluate segmenters on one benchmark (or several) with the TCL protocol (DESIGN §2).

    Reports (results.json, results.md, a per-class IoU figure) are merged into `out`, so several runs accumulate
    one models x datasets table, published as a markdown artifact. Returns the per-model results (one benchmark)
    or `{report key: per-model results}` (several).

    Args:
        dataset: Benchmark name (custom: a folder with images/, annotations/<stem>.png and classes.txt), or a
            list of names paired with a list of data roots.
        data_root: The benchmark's folder (or a list, one per dataset).
        out: Report folder; several runs into one folder accumulate.
        models: Segmenters: comma-separated names (maskclip, stage1.1, stage1.2, stage1, fmbseg), a list, or all
            (fmbseg only with a checkpoint).
        checkpoint: Alignment checkpoint (model.pt) the fmbseg segmenter needs.
        preset: CLIP/SAM preset of the maskclip and stage1* segmenters (default: the checkpoint's, else base).
        device: auto, cpu or cuda[:N].
        stage1: Stage-1 settings of the stage1* segmenters to change; empty fields keep the preset's value.
        runner: local (here) or ray (one Ray task per benchmark and segmenter).
        ray_address: With runner ray: empty starts a local Ray instance, auto joins the running cluster, or an
            address.
        gpus_per_task: With runner ray: GPUs per task (empty: 1 when the cluster has GPUs, else 0).
        cpus_per_task: With runner ray: CPUs per task.
        ray_init_kwargs: With runner ray: more `ray.init` arguments, e.g. a runtime_env.
    """
    check_runner(runner)
    datasets, roots = _as_list(dataset), _as_list(data_root)
    if len(datasets) != len(roots) or not datasets:
        raise ValueError(f"give one data_root per dataset: {len(datasets)} datasets, {len(roots)} data roots")
    stage1 = Stage1Overrides.dict_of(stage1)
    per_dataset: dict[str, dict] = {}
    if runner == "ray":
        names = resolve_models(models, checkpoint)
        pairs = [{"dataset": d, "data_root": r, "model": m} for d, r in zip(datasets, roots) for m in names]
        on_ray = evaluate_on_ray.with_options(task_runner=ray_task_runner(ray_address, ray_init_kwargs))
        parts = on_ray(pairs, checkpoint, preset, device, stage1, gpus_per_task=gpus_per_task,
                       cpus_per_task=cpus_per_task)
        merge_evaluations(out, parts)
        for part in parts:
            per_dataset.setdefault(part["dataset"], {}).update(part["results"])
    else:
        for d, r in zip(datasets, roots):
            per_dataset[report_key(d, r)] = evaluate_task(d, r, models, out, checkpoint, preset, device, stage1)
    result = next(iter(per_dataset.values())) if len(per_dataset) == 1 else per_dataset
    table = results_markdown(out)
    if table is None:
        table = f"```\n{result}\n```"
    publish_markdown(table, key=artifact_key("evaluation", out),
                     description=f"Evaluation of {', '.join(sorted({m for v in per_dataset.values() for m in v}))} "
                     f"on {', '.join(datasets)} ({', '.join(roots)})")
    get_run_logger().info("evaluation table (%s):\n%s", out, table)
    return result
