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

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.gpu import GPU_TAG
from flows.artifacts import artifact_key, publish_markdown
from flows.label_flow import retry_unless_permanent
from flows.ray_runner import check_runner, default_gpus_per_shard, ray_task_runner, shard_remote_options, worker_info
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
    (a `RayTaskRunner`); -> their results, in the order of `pairs`. Fails when any pair fails."""
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
def evaluate_flow(dataset: str | list[str], data_root: str | list[str], out: str, models: str | list[str] = "all",
                  checkpoint: str | None = None, preset: str | None = None, device: str = "auto",
                  stage1: dict | None = None, runner: str = "local", ray_address: str | None = None,
                  gpus_per_task: float | None = None, cpus_per_task: float = 1.0,
                  ray_init_kwargs: dict | None = None) -> dict:
    """Evaluate `models` (comma-separated names, a list, or `all`) on `dataset` (a DESIGN §2 benchmark name,
    `custom` for a folder) read from `data_root` (or on several: lists of names and of roots, paired);
    `checkpoint` is the alignment checkpoint the `fmbseg` segmenter needs; `preset` names the CLIP/SAM of the
    other segmenters (default: the checkpoint's). `runner="ray"`: one Ray task per (benchmark, segmenter), each
    asking for `gpus_per_task` GPUs (default: 1 when the cluster has GPUs) and `cpus_per_task` CPUs on the
    cluster at `ray_address` (see flows/ray_runner.py).
    Returns the per-model results (one benchmark) or `{report key: per-model results}` (several); the
    evaluation table is published as a markdown artifact."""
    check_runner(runner)
    datasets, roots = _as_list(dataset), _as_list(data_root)
    if len(datasets) != len(roots) or not datasets:
        raise ValueError(f"give one data_root per dataset: {len(datasets)} datasets, {len(roots)} data roots")
    stage1 = dict(stage1 or {})
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
