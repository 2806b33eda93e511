"""The `label-campaign` flow: plan a campaign, then label this rank's shards, one Prefect task per shard.

Thin wiring of `stages.label`: the stage plans, labels and commits shards (done markers, DESIGN §5) and caches
its models per process; this flow adds retries with exponential backoff, per-shard progress and a run summary.
Tasks exchange only paths, shard ids and config dicts.

Resuming: a shard whose done marker matches the campaign's Stage-1 config hash is a no-op, so rerunning the flow
after a crash or a kill labels only what is missing. Task-result caching is off on purpose: the done markers in
the campaign are the single source of truth, valid across flow runs, workers and machines.

Scale-out, two ways:
- `runner="local"` (default): shard tasks run one after another in this process. Run one flow per worker with
  `rank`/`world_size`; rank r labels the shards with `shard_id % world_size == r`, so no shard is labeled twice and
  none is skipped, whatever machine each rank runs on.
- `runner="ray"`: one flow run for the whole campaign; every not-yet-done shard is a Prefect task submitted to
  prefect-ray's `RayTaskRunner` (subflow `label-shards-ray`), each asking Ray for `gpus_per_shard` GPUs and
  `cpus_per_shard` CPUs, so Ray spreads the shards over every free GPU of the cluster as they finish
  (flows/ray_runner.py says how the cluster is found, and how dead workers are handled).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import time
from typing import Annotated, Any

from annotated_types import Ge

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.gpu import GPU_TAG
from flows.artifacts import ShardProgress, artifact_key, publish_label_summary, summarize_label_results
from flows.ray_runner import (Runner, check_runner, default_gpus_per_shard, ray_task_runner, shard_remote_options,
                              worker_info)
from fmbseg.presets import PresetName
from fmbseg.stage1_config import Stage1Overrides
from stages import models_cache
from stages.label import LabelConfig, build_stage1_config, label_shard, plan_campaign, shards_for_rank
from storage.campaign import read_manifest
from storage.fs import CampaignRoot
from storage.layout import DONE_DIR, done_path, parse_shard_file
from storage.markers import CorruptMarker, parse_marker

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
    stage1: Stage1Overrides | dict | None = None,
    overwrite: bool = False,
    allow_outside_root: bool = False,
    relabel_store: bool = False,
) -> dict:
    """The `stages.label.LabelConfig` fields as a plain dict (what tasks receive). The Stage-1 overrides are
    validated on top of the preset's (`build_stage1_config`), so a bad setting fails here, before any work."""
    overrides = Stage1Overrides.dict_of(stage1)
    build_stage1_config(preset, overrides)
    cfg = LabelConfig(
        images=images, vocab=vocab, campaign=campaign, preset=preset, shard_size=shard_size, seed=seed,
        device=device, image_root=image_root, stage1=overrides, overwrite=overwrite,
        allow_outside_root=allow_outside_root, relabel_store=relabel_store,
    )
    return dataclasses.asdict(cfg)


@task(name="plan-campaign", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(5),
      retry_jitter_factor=0.5, retry_condition_fn=retry_unless_permanent)
def plan_task(config: dict) -> list[int]:
    """Write or validate campaign.json, append shards for new images; -> every shard id of the campaign."""
    return [int(s) for s in plan_campaign(LabelConfig(**config))]


@task(name="label-shard", tags=[GPU_TAG], task_run_name="label-shard-{shard_id}", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(10), retry_jitter_factor=0.5, retry_condition_fn=retry_unless_permanent)
def label_shard_task(campaign: str, shard_id: int, device: str = "auto", retry_failed: bool = False) -> dict:
    """Label one shard (a no-op returning `skipped=True` when it is already done). The result also names the
    host and process that ran it, how many model loads that process has done so far (`model_loads`), and the
    wall-clock `started`/`finished` times (epoch seconds) of the stage call (scripts/bench_scaleout.py reads the
    gaps between a worker's shards: the per-shard cost of Prefect and Ray)."""
    started = time.time()
    result = label_shard(campaign, shard_id, device=device, retry_failed=retry_failed)
    log_shard_result(get_run_logger(), result)
    return {**result, **worker_info(), "model_loads": models_cache.load_count(), "started": started,
            "finished": time.time()}


def log_shard_result(logger, r: dict) -> None:
    """One line per shard in the task's log: what it labelled, what failed and why, how long it took."""
    if r.get("skipped"):
        logger.info("shard %06d already done: %d images (%d ok, %d failed), %d masks; skipped", r["shard_id"],
                    r["images"], r["ok"], r["failed"], r["masks"])
        return
    reasons = ", ".join(f"{k} x{n}" for k, n in sorted(r.get("failure_reasons", {}).items(), key=lambda kv: -kv[1]))
    seconds = float(r.get("seconds") or 0.0)
    logger.info("shard %06d labelled: %d images (%d ok, %d failed%s), %d masks, %.1f s (%.2f images/s)",
                r["shard_id"], r["images"], r["ok"], r["failed"], f": {reasons}" if reasons else "", r["masks"],
                seconds, r["images"] / seconds if seconds > 0 else 0.0)


def pending_shards(campaign: str, shard_ids: list[int], retry_failed: bool = False) -> list[int]:
    """The shards of `shard_ids` not done under the campaign's Stage-1 hash (with `retry_failed`: also those
    done with failed images) -- what a run still has to submit."""
    root = CampaignRoot(campaign)
    stage1_hash = read_manifest(root).stage1_hash()
    # One listing of done/, then the existing markers fetched in one batch (s3fs fetches a list concurrently): a
    # rerun of a 40 000-shard campaign on S3 must not cost 80 000 sequential requests before submitting anything.
    have = {parse_shard_file(name) for name in root.listdir(DONE_DIR)}
    with_marker = [int(s) for s in shard_ids if int(s) in have]
    paths = [root.full(done_path(s)) for s in with_marker]
    blobs = root.fs.cat(paths, on_error="omit") if paths else {}
    ok = set()
    for path, blob in blobs.items():
        sid = parse_shard_file(posixpath.basename(path.replace(os.sep, "/")))
        try:
            marker = parse_marker(done_path(sid), blob, sid)
        except CorruptMarker:
            continue  # unreadable: label_shard decides what to do with it
        if marker.stage1_hash == stage1_hash and not (retry_failed and marker.failed):
            ok.add(sid)
    return [int(s) for s in shard_ids if int(s) not in ok]


@flow(name="label-shards-ray")
def label_shards_ray(
    campaign: str,
    shard_ids: list[int],
    device: str = "auto",
    retry_failed: bool = False,
    gpus_per_shard: float | None = None,
    cpus_per_shard: float = 1.0,
    shard_retries: int = 3,
    retry_delay_seconds: float = 10.0,
    worker_restarts: int = 3,
    progress_key: str | None = None,
) -> dict:
    """Submit one `label-shard` task per shard to this flow's task runner (a `RayTaskRunner`, see
    `label_campaign`); -> `{"results": [shard results], "failed": [shard ids], "gpus_per_shard": float}`.

    Args:
        campaign: Campaign directory (local path or fsspec URL every Ray node reads).
        shard_ids: The shards to label.
        device: auto, cpu or cuda[:N], on each worker.
        retry_failed: Relabel done shards that have failed images.
        gpus_per_shard: GPUs each shard task asks for (empty: 1 when the cluster has GPUs, else 0).
        cpus_per_shard: CPUs each shard task asks for.
        shard_retries: Prefect retries of a shard that raised.
        retry_delay_seconds: Delay before a shard's first retry; doubles with each retry.
        worker_restarts: How often Ray re-runs a shard whose worker process or node died.
        progress_key: Key of the progress artifact to update after each shard (empty: none).
    """
    from prefect_ray.context import remote_options

    logger = get_run_logger()
    gpus = default_gpus_per_shard(gpus_per_shard)
    options = shard_remote_options(gpus, cpus_per_shard, worker_restarts)
    logger.info("submitting %d shards to Ray, %s GPU and %s CPU each", len(shard_ids), options["num_gpus"],
                options["num_cpus"])
    shard_task = label_shard_task.with_options(
        retries=shard_retries, retry_delay_seconds=exponential_backoff(retry_delay_seconds)
    )
    with remote_options(**options):
        futures = [(sid, shard_task.submit(campaign, sid, device=device, retry_failed=retry_failed))
                   for sid in shard_ids]
    progress = ShardProgress(progress_key, len(shard_ids), f"Labeling {campaign} on Ray") if progress_key else None
    results: list[dict] = []
    failed: list[int] = []
    for sid, future in futures:
        future.wait()
        state = future.state
        if state.is_completed():
            results.append(future.result())
        else:
            failed.append(sid)
            logger.error("shard %06d failed: %s", sid, state.message)
        if progress is not None:
            progress.advance()
    return {"results": results, "failed": failed, "gpus_per_shard": gpus}


@flow(name="label-campaign")
def label_campaign(
    images: str,
    vocab: str,
    campaign: str,
    preset: PresetName = "base",
    shard_size: Annotated[int, Ge(1)] = 256,
    seed: Annotated[int, Ge(0)] = 0,
    device: str = "auto",
    image_root: str | None = None,
    stage1: Stage1Overrides | None = None,
    overwrite: bool = False,
    rank: Annotated[int, Ge(0)] = 0,
    world_size: Annotated[int, Ge(1)] = 1,
    retry_failed: bool = False,
    shard_retries: Annotated[int, Ge(0)] = 3,
    retry_delay_seconds: Annotated[float, Ge(0)] = 10.0,
    runner: Runner = "local",
    ray_address: str | None = None,
    gpus_per_shard: Annotated[float, Ge(0)] | None = None,
    cpus_per_shard: Annotated[float, Ge(0)] = 1.0,
    ray_init_kwargs: dict | None = None,
    allow_outside_root: bool = False,
    relabel_store: bool = False,
) -> dict:
    """Label every shard of this rank's share of the campaign (Stage 1: CLIP + SAM pseudo-labels).

    Shards that fail after `shard_retries` retries do not stop the others; the flow fails at the end naming them,
    and a rerun labels just those (done shards are skipped). Returns the run summary (see
    `flows.artifacts.summarize_label_results`) with `shard_ids`, `labeled`, `skipped` and `failed` shard lists.

    Args:
        images: Folder of images (searched recursively) or a COCO JSON file; local path or fsspec URL.
        vocab: Class names: comma-separated names, a vocabulary file (`name: synonym, synonym` lines) or a
            built-in vocabulary name.
        campaign: Campaign directory (local path or fsspec URL such as s3://bucket/campaign).
        preset: Model preset: paper (CLIP ViT-L/14, SAM ViT-H, DINOv2 ViT-L/14), base (ViT-B models), tiny
            (random toy models) or oracle (synthetic-world stand-ins).
        shard_size: Images per new shard (the unit of work, retry and resume).
        seed: Campaign seed: the seeded draw of the Stage-1.2 masks (part of the config hash).
        device: auto, cpu or cuda[:N].
        image_root: Folder the COCO JSON's file names are relative to (default: the JSON's own folder).
        stage1: Stage-1 settings to change (every field has its description and bounds); empty fields keep the
            preset's value. Part of the campaign's config hash.
        overwrite: Accept a changed Stage-1 config or input folder: the campaign's Stage-1 outputs are removed and
            it is labelled afresh.
        rank: This worker's index, 0..world_size-1 (labels the shards with shard_id % world_size == rank).
        world_size: Number of workers (flow runs) sharing the campaign with the local runner.
        retry_failed: Relabel done shards that have failed images.
        shard_retries: Prefect retries of a shard that raised.
        retry_delay_seconds: Delay before the first retry; doubles with each retry.
        runner: local (shards one after another in this flow run) or ray (every not-yet-done shard a task on a
            Ray cluster; keep rank=0 and world_size=1, Ray spreads the shards itself).
        ray_address: With runner ray: empty starts a local Ray instance, auto joins the cluster running on this
            machine, or HOST:PORT / ray://HOST:10001.
        gpus_per_shard: With runner ray: GPUs each shard task asks for (empty: 1 when the cluster has GPUs, else
            0; 0.5 runs two shards per GPU).
        cpus_per_shard: With runner ray: CPUs each shard task asks for.
        ray_init_kwargs: With runner ray: more `ray.init` arguments, e.g. a runtime_env.
        allow_outside_root: Read COCO file names that leave the image root (../, absolute paths, symlinks out).
        relabel_store: Also keep, per shard, what relabel-campaign needs to relabel the campaign with another
            vocabulary without the image encoders (several MiB per image; docs/STORAGE.md "Relabel store").
    """
    logger = get_run_logger()
    check_runner(runner)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, "
                         f"world_size={world_size}")
    if runner == "ray" and world_size != 1:
        raise ValueError("runner='ray' labels the whole campaign from one flow run: leave rank=0, world_size=1 "
                         "(Ray places the shards on the cluster's workers)")
    config = label_config(images, vocab, campaign, preset, shard_size, seed, device, image_root, stage1, overwrite,
                          allow_outside_root, relabel_store=relabel_store)
    all_shards = plan_task(config)
    mine = [int(s) for s in shards_for_rank(all_shards, rank, world_size)]
    logger.info("campaign %s: %d shards planned, rank %d/%d labels %d of them",
                campaign, len(all_shards), rank, world_size, len(mine))

    results: list[dict] = []
    labeled: list[int] = []
    skipped: list[int] = []
    failed: list[int] = []
    t0 = time.perf_counter()
    if runner == "ray":
        todo = pending_shards(campaign, mine, retry_failed)
        pending = set(todo)
        done_already = [s for s in mine if s not in pending]
        skipped.extend(done_already)
        results.extend({"shard_id": s, "skipped": True} for s in done_already)
        if todo:
            on_ray = label_shards_ray.with_options(task_runner=ray_task_runner(ray_address, ray_init_kwargs))
            out = on_ray(campaign, todo, device=device, retry_failed=retry_failed, gpus_per_shard=gpus_per_shard,
                         cpus_per_shard=cpus_per_shard, shard_retries=shard_retries,
                         retry_delay_seconds=retry_delay_seconds,
                         progress_key=artifact_key("label-progress", campaign, rank))
            for r in out["results"]:
                results.append(r)
                (skipped if r.get("skipped") else labeled).append(int(r["shard_id"]))
            failed.extend(out["failed"])
            for sid in failed:
                logger.error("shard %06d failed after retries", sid)
        mine_iter: list[int] = []
    else:
        mine_iter = mine
    progress = ShardProgress(artifact_key("label-progress", campaign, rank), len(mine_iter),
                             f"Labeling {campaign} (rank {rank}/{world_size})") if runner == "local" else None
    shard_task = label_shard_task.with_options(
        retries=shard_retries, retry_delay_seconds=exponential_backoff(retry_delay_seconds)
    )
    for shard_id in mine_iter:
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
        failed=failed, runner=runner,
        workers=sorted({(r["host"], r["pid"]) for r in results if "pid" in r and not r.get("skipped")}),
        shard_results=[r for r in results if not r.get("skipped")],
    )
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(mine)} shards failed after retries: {failed}; "
                           "rerun the flow to label just those")
    return summary
