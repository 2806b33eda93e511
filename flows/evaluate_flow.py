"""The `evaluate` flow: one benchmark, several segmenters, around `stages.evaluate` (DESIGN §2).

The stage writes (and merges into) `<out>/results.json`, `<out>/results.md` and a per-class IoU figure, so several
runs into one `out` accumulate one models x datasets table; this flow publishes that table as a markdown
artifact.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import artifact_key, publish_markdown
from flows.label_flow import retry_unless_permanent
from stages.evaluate import evaluate


@task(name="evaluate", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_permanent)
def evaluate_task(dataset: str, data_root: str, models: str | list[str], out: str, checkpoint: str | None,
                  preset: str | None, device: str, stage1: dict) -> dict:
    """-> `{model: {"mIoU", "mAcc", "aAcc", "IoU": {...}, ...}}`; reports merged into `out`."""
    return evaluate(dataset, data_root, models, out, checkpoint=checkpoint, preset=preset, device=device,
                    stage1=stage1, progress=False)


def results_markdown(out: str) -> str | None:
    """The stage's `results.md` under `out`, when it exists."""
    path = os.path.join(out, "results.md")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


@flow(name="evaluate")
def evaluate_flow(dataset: str, data_root: str, out: str, models: str | list[str] = "all",
                  checkpoint: str | None = None, preset: str | None = None, device: str = "auto",
                  stage1: dict | None = None) -> dict:
    """Evaluate `models` (comma-separated names, a list, or `all`) on `dataset` (a DESIGN §2 benchmark name,
    `custom` for a folder) read from `data_root`; `checkpoint` is the alignment checkpoint the `fmbseg`
    segmenter needs; `preset` names the CLIP/SAM of the other segmenters (default: the checkpoint's).
    Returns the stage's per-model results; the evaluation table is published as a markdown artifact."""
    result = evaluate_task(dataset, data_root, models, out, checkpoint, preset, device, dict(stage1 or {}))
    table = results_markdown(out)
    if table is None:
        table = f"```\n{result}\n```"
    publish_markdown(table, key=artifact_key("evaluation", out),
                     description=f"Evaluation of {', '.join(result)} on {dataset} ({data_root})")
    get_run_logger().info("evaluation table (%s):\n%s", out, table)
    return result
