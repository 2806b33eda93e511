"""The `label-campaign` flow: plan a campaign, then label this rank's shards, one Prefect task per shard.

Thin wiring of `stages.label`: the stage plans, labels and commits shards (done markers, DESIGN §5) and caches
its models per process; this flow adds retries with exponential backoff, per-shard progress and a run summary.
Tasks exchange only paths, shard ids and config dicts.

Resuming: a shard whose done marker matches the campaign's Stage-1 config hash is a no-op, so rerunning the flow
after a crash or a kill labels only what is missing. Task-result caching is off on purpose: the done markers in
the campaign are the single source of truth, valid across flow runs, workers and machines.

Scale-out: run one flow per worker with `rank`/`world_size`; rank r labels the shards with `shard_id % world_size
== r`, so no shard is labeled twice and none is skipped, whatever machine each rank runs on.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.artifacts import ShardProgress, artifact_key, publish_label_summary, summarize_label_results
from stages.label import LabelConfig, label_shard, plan_campaign, shards_for_rank

# Errors that no retry can fix: bad arguments, a changed Stage-1 config, missing inputs.
_PERMANENT_ERRORS = (ValueError, TypeError, FileNotFoundError, KeyError)


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures (I/O, a lost GPU), never bad input."""
    return not isinstance(state.data, _PERMANENT_ERRORS)


def label_config(
    images: str,
    vocab: str,
    campaign: str,
    preset: str = "base",
    shard_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    image_root: str | None = None,
    stage1: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """The `stages.label.LabelConfig` fields as a plain dict (what tasks receive); validated by building it."""
    cfg = LabelConfig(
        images=images, vocab=vocab, campaign=campaign, preset=preset, shard_size=shard_size, seed=seed,
        device=device, image_root=image_root, stage1=dict(stage1 or {}), overwrite=overwrite,
    )
    return dataclasses.asdict(cfg)


@task(name="plan-campaign", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(5),
      retry_jitter_factor=0.5, retry_condition_fn=retry_unless_permanent)
def plan_task(config: dict) -> list[int]:
    """Write or validate campaign.json, append shards for new images; -> every shard id of the campaign."""
    return [int(s) for s in plan_campaign(LabelConfig(**config))]


@task(name="label-shard", task_run_name="label-shard-{shard_id}", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(10), retry_jitter_factor=0.5, retry_condition_fn=retry_unless_permanent)
def label_shard_task(campaign: str, shard_id: int, device: str = "auto", retry_failed: bool = False) -> dict:
    """Label one shard (a no-op returning `skipped=True` when it is already done)."""
    return label_shard(campaign, shard_id, device=device, retry_failed=retry_failed)


@flow(name="label-campaign")
def label_campaign(
    images: str,
    vocab: str,
    campaign: str,
    preset: str = "base",
    shard_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    image_root: str | None = None,
    stage1: dict | None = None,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    retry_failed: bool = False,
    shard_retries: int = 3,
    retry_delay_seconds: float = 10.0,
) -> dict:
    """Label every shard of this rank's share of the campaign at `campaign` (local path or fsspec URL).

    `images` is a folder or a COCO JSON (`image_root` for its files), `vocab` a comma list, a file or a built-in
    name, `stage1` overrides Stage-1 settings. Shards that fail after `shard_retries` retries (delays
    `retry_delay_seconds` x 1, 2, 4, ...) do not stop the others; the flow fails at the end naming them, and a
    rerun labels just those. Returns the run summary (see `flows.artifacts.summarize_label_results`) with
    `shard_ids`, `labeled`, `skipped` and `failed` shard lists."""
    logger = get_run_logger()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, "
                         f"world_size={world_size}")
    config = label_config(images, vocab, campaign, preset, shard_size, seed, device, image_root, stage1, overwrite)
    all_shards = plan_task(config)
    mine = [int(s) for s in shards_for_rank(all_shards, rank, world_size)]
    logger.info("campaign %s: %d shards planned, rank %d/%d labels %d of them",
                campaign, len(all_shards), rank, world_size, len(mine))

    progress = ShardProgress(artifact_key("label-progress", campaign, rank), len(mine),
                             f"Labeling {campaign} (rank {rank}/{world_size})")
    shard_task = label_shard_task.with_options(
        retries=shard_retries, retry_delay_seconds=exponential_backoff(retry_delay_seconds)
    )
    results: list[dict] = []
    labeled: list[int] = []
    skipped: list[int] = []
    failed: list[int] = []
    t0 = time.perf_counter()
    for shard_id in mine:
        state = shard_task(campaign, shard_id, device=device, retry_failed=retry_failed, return_state=True)
        if state.is_completed():
            result = state.result()
            results.append(result)
            (skipped if result.get("skipped") else labeled).append(shard_id)
        else:
            failed.append(shard_id)
            logger.error("shard %06d failed after retries: %s", shard_id, state.message)
        progress.advance()
    summary = summarize_label_results(results, failed, time.perf_counter() - t0)
    publish_label_summary(summary, artifact_key("label-summary", campaign, rank), campaign, rank, world_size)
    logger.info("labeling summary: %s", summary)
    summary.update(
        campaign=campaign, rank=rank, world_size=world_size, shard_ids=mine, labeled=labeled, skipped=skipped,
        failed=failed,
    )
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(mine)} shards failed after retries: {failed}; "
                           "rerun the flow to label just those")
    return summary
