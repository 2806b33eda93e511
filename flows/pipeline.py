"""The `fmbseg-pipeline` flow: label -> train -> evaluate (-> overlay pictures) as one DAG of subflows.

Each stage keeps its own config hash and its own notion of done (DESIGN §5), so rerunning the pipeline after a
crash recomputes only what is missing, and changing only a training setting retrains and re-evaluates without
touching Stage 1 (every shard task is then a no-op on its done marker).

Scale-out: with `runner="ray"` one pipeline run labels every shard on a Ray cluster (and evaluates one task per
segmenter there), see flows/ray_runner.py. With the local runner and `world_size > 1` every rank labels its share
of the shards; rank 0 then waits until the whole campaign is done (other ranks may run on other machines sharing
the campaign store) and trains and evaluates, the other ranks stop after labeling.

Demo mode (`demo_root`): a synthetic world (DESIGN §6) is written under `demo_root` when missing and fills in every
input and output path, so `prefect deployment run 'fmbseg-pipeline/demo'` needs no other parameter.
"""

from __future__ import annotations

import os
import posixpath
import time
from typing import Annotated

from annotated_types import Ge
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.demo import DemoLayout, write_demo_world
from flows.evaluate_flow import evaluate_flow
from flows.export_flow import publish_pseudo_label_sample
from flows.stats_flow import campaign_stats_flow
from flows.label_flow import label_campaign
from flows.ray_runner import Runner
from flows.train_flow import train_alignment_flow, train_config
from fmbseg.datasets import DatasetName
from fmbseg.presets import PresetName
from fmbseg.stage1_config import Stage1Overrides
from stages.label import campaign_status
from stages.predict import predict_folder
from stages.train_config import TrainOverrides


@task(name="synthetic-world", cache_policy=NO_CACHE)
def demo_world_task(root: str, train_images: int, eval_images: int, seed: int) -> dict:
    """Write the demo's synthetic train and evaluation worlds under `root` unless they are there already."""
    return write_demo_world(root, train_images, eval_images, seed).as_dict()


@task(name="wait-for-campaign", cache_policy=NO_CACHE)
def wait_for_campaign_task(campaign: str, timeout_s: float, poll_s: float = 10.0) -> dict:
    """Block until every planned shard of the campaign is done (the other ranks' shards included)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = campaign_status(campaign)
        if status["shards_done"] >= status["shards_total"]:
            return status
        if time.monotonic() > deadline:
            # Not TimeoutError: Prefect would report that as the task's own timeout ("TimedOut").
            raise RuntimeError(
                f"campaign {campaign}: {status['shards_done']}/{status['shards_total']} shards done after "
                f"{timeout_s:.0f} s; are all ranks running?"
            )
        time.sleep(poll_s)


@task(name="overlays", cache_policy=NO_CACHE)
def overlays_task(checkpoint: str, images: str, vocab: str, out: str, device: str) -> list[str]:
    """Label maps and overlay pictures of the trained segmenter on `images` -> the label-map paths."""
    return [str(p) for p in predict_folder(checkpoint, images, vocab, out, device=device, progress=False)]


def default_eval_out(campaign: str, checkpoint: str) -> str:
    """`<campaign>/eval/<name of the checkpoint's folder>`: one report per trained model (the training hash)."""
    return posixpath.join(campaign.rstrip("/"), "eval", posixpath.basename(posixpath.dirname(checkpoint)))


@flow(name="fmbseg-pipeline")
def fmbseg_pipeline(
    images: str | None = None,
    vocab: str | None = None,
    campaign: str | None = None,
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
    train: TrainOverrides | None = None,
    train_out: str | None = None,
    eval_dataset: DatasetName | None = None,
    eval_data_root: str | None = None,
    eval_models: str | list[str] = "maskclip,fmbseg",
    eval_out: str | None = None,
    overlay_images: str | None = None,
    overlay_out: str | None = None,
    demo_root: str | None = None,
    demo_train_images: Annotated[int, Ge(1)] = 40,
    demo_eval_images: Annotated[int, Ge(1)] = 8,
    wait_timeout_s: Annotated[float, Ge(0)] = 7 * 24 * 3600.0,
    runner: Runner = "local",
    ray_address: str | None = None,
    gpus_per_shard: Annotated[float, Ge(0)] | None = None,
    cpus_per_shard: Annotated[float, Ge(0)] = 1.0,
    ray_init_kwargs: dict | None = None,
    shard_retries: Annotated[int, Ge(0)] = 3,
    retry_delay_seconds: Annotated[float, Ge(0)] = 10.0,
    allow_outside_root: bool = False,
) -> dict:
    """Label `images` into `campaign`, train the alignment module on it, evaluate it on `eval_dataset`
    (skipped when empty) and draw overlays on `overlay_images` (skipped when empty).

    With `runner="ray"` the evaluation also runs on Ray, one task per segmenter (training stays in this flow run's
    process). Returns the paths and summaries of every stage.

    Args:
        images: Folder of images (searched recursively) or a COCO JSON file; local path or fsspec URL. Needed
            unless demo_root is set.
        vocab: Class names: comma-separated names, a vocabulary file or a built-in vocabulary name. Needed unless
            demo_root is set.
        campaign: Campaign directory (local path or fsspec URL). Needed unless demo_root is set.
        preset: Model preset: paper, base, tiny or oracle (as in label-campaign).
        shard_size: Images per new shard.
        seed: Campaign seed (the seeded Stage-1.2 draw).
        device: auto, cpu or cuda[:N], for every stage.
        image_root: Folder the COCO JSON's file names are relative to (default: the JSON's own folder).
        stage1: Stage-1 settings to change; empty fields keep the preset's value (as in label-campaign).
        overwrite: Accept a changed Stage-1 config or input folder: the campaign is labelled afresh.
        rank: This worker's index with the local runner; rank 0 also trains and evaluates.
        world_size: Number of pipeline runs sharing the labeling; rank 0 waits for all shards before training.
        retry_failed: Relabel done shards that have failed images.
        train: Training settings to change; empty fields keep their default (as in train-alignment).
        train_out: Checkpoint path (default: <campaign>/train/<train hash>/model.pt).
        eval_dataset: Benchmark to evaluate on (empty: no evaluation); custom for a folder with images/,
            annotations/ and classes.txt.
        eval_data_root: The benchmark's folder (needed with eval_dataset).
        eval_models: Segmenters to evaluate: comma-separated names (maskclip, stage1.1, stage1.2, stage1,
            fmbseg), a list, or all.
        eval_out: Report folder (default: <campaign>/eval/<train hash>).
        overlay_images: Images to segment with the trained model and draw overlays of (empty: none).
        overlay_out: Folder of the overlays (default: an overlays folder beside the checkpoint).
        demo_root: Synthetic demo: a world written here when missing fills in every input and output path.
        demo_train_images: Demo: training images of the synthetic world.
        demo_eval_images: Demo: evaluation images (a disjoint synthetic world).
        wait_timeout_s: With world_size > 1: how long rank 0 waits for the other ranks' shards.
        runner: local or ray (labeling and evaluation as Ray tasks), as in label-campaign.
        ray_address: With runner ray: empty starts a local Ray instance, auto joins the running cluster, or an
            address.
        gpus_per_shard: With runner ray: GPUs per shard (and evaluation) task (empty: 1 when the cluster has GPUs).
        cpus_per_shard: With runner ray: CPUs per shard (and evaluation) task.
        ray_init_kwargs: With runner ray: more `ray.init` arguments, e.g. a runtime_env.
        shard_retries: Prefect retries of a shard that raised.
        retry_delay_seconds: Delay before a shard's first retry; doubles with each retry.
        allow_outside_root: Read COCO file names that leave the image root.
    """
    train_config(train, device)  # a bad training setting fails now, not after labeling
    logger = get_run_logger()
    if demo_root is not None:
        layout = DemoLayout(**demo_world_task(os.path.abspath(os.path.expanduser(demo_root)),
                                             demo_train_images, demo_eval_images, seed))
        images = images or layout.train_images
        vocab = vocab or layout.vocab
        campaign = campaign or layout.campaign
        eval_dataset = eval_dataset or "custom"
        eval_data_root = eval_data_root or layout.eval_root
        eval_out = eval_out or layout.report
        overlay_images = overlay_images or layout.eval_images
        overlay_out = overlay_out or layout.overlays
    missing = [n for n, v in (("images", images), ("vocab", vocab), ("campaign", campaign)) if not v]
    if missing:
        raise ValueError(f"fmbseg-pipeline needs {', '.join(missing)} (or demo_root for the synthetic demo)")
    if eval_dataset is not None and not eval_data_root:
        raise ValueError(f"eval_dataset={eval_dataset!r} needs eval_data_root")

    label = label_campaign(
        images=images, vocab=vocab, campaign=campaign, preset=preset, shard_size=shard_size, seed=seed,
        device=device, image_root=image_root, stage1=stage1, overwrite=overwrite, rank=rank,
        world_size=world_size, retry_failed=retry_failed, runner=runner, ray_address=ray_address,
        gpus_per_shard=gpus_per_shard, cpus_per_shard=cpus_per_shard, ray_init_kwargs=ray_init_kwargs,
        shard_retries=shard_retries, retry_delay_seconds=retry_delay_seconds, allow_outside_root=allow_outside_root,
    )
    result: dict = {"campaign": campaign, "label": label}
    if rank != 0:
        logger.info("rank %d/%d: labeling done; rank 0 trains and evaluates", rank, world_size)
        return result
    if world_size > 1:
        result["campaign_status"] = wait_for_campaign_task(campaign, wait_timeout_s)
    if "://" not in campaign:  # pictures of a few pseudo-labels as a UI artifact (local campaigns)
        result["pseudo_labels"] = publish_pseudo_label_sample(campaign)
    # Label quality without ground truth (Stage 1.1/1.2 agreement, coverage, ...), published as an artifact.
    try:
        result["stats"] = campaign_stats_flow(campaign=campaign, out=posixpath.join(campaign.rstrip("/"), "stats"))
    except Exception as e:  # noqa: BLE001 - a report is a convenience: the campaign itself is done
        logger.warning("label-quality stats of %s not published: %s", campaign, e)

    checkpoint = train_alignment_flow(campaign=campaign, train=train, out=train_out, device=device)
    result["checkpoint"] = checkpoint

    if eval_dataset is not None:
        eval_out = eval_out or default_eval_out(campaign, checkpoint)
        result["evaluation"] = evaluate_flow(
            dataset=eval_dataset, data_root=eval_data_root, out=eval_out, models=eval_models,
            checkpoint=checkpoint, preset=preset, device=device, stage1=stage1, runner=runner,
            ray_address=ray_address, gpus_per_task=gpus_per_shard, cpus_per_task=cpus_per_shard,
            ray_init_kwargs=ray_init_kwargs,
        )
        result["eval_out"] = eval_out
    if overlay_images is not None:
        overlay_out = overlay_out or posixpath.join(posixpath.dirname(checkpoint), "overlays")
        result["overlays"] = overlays_task(checkpoint, overlay_images, vocab, overlay_out, device)
        result["overlay_out"] = overlay_out
    logger.info("pipeline done: campaign %s, checkpoint %s", campaign, checkpoint)
    return result
