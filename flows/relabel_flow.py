"""The `relabel-campaign` flow: a campaign with a new vocabulary, without the image encoders (stages/relabel.py),
one Prefect task per shard. Thin wiring: the stage plans the new campaign, relabels and commits shards (done
markers make reruns skip what is done); tasks exchange only paths, shard ids and small summaries."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.gpu import GPU_TAG
from flows.label_flow import retry_unless_permanent
from stages.relabel import RelabelConfig, plan_relabel, relabel_shard, summarize_relabel


@task(name="plan-relabel", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(5),
      retry_condition_fn=retry_unless_permanent)
def plan_relabel_task(campaign: str, vocab: str, out: str) -> list[int]:
    """Write or validate the new campaign's campaign.json and shard lists; -> every shard id."""
    return [int(s) for s in plan_relabel(RelabelConfig(campaign=campaign, vocab=vocab, out=out))]


@task(name="relabel-shard", tags=[GPU_TAG], task_run_name="relabel-shard-{shard_id}", cache_policy=NO_CACHE,
      retries=3, retry_delay_seconds=exponential_backoff(10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_unless_permanent)
def relabel_shard_task(campaign: str, out: str, shard_id: int, device: str = "auto") -> dict:
    """Relabel one shard (a no-op returning `skipped=True` when the new campaign has it done)."""
    return relabel_shard(campaign, out, shard_id, device)


@flow(name="relabel-campaign")
def relabel_campaign(campaign: str, vocab: str, out: str, device: str = "auto") -> dict:
    """Relabel `campaign` (labelled with `relabel_store=True`) with the vocabulary `vocab` into the new campaign
    `out`: identical to a full label-campaign run with `vocab`, reading the kept features instead of running the
    image encoders. Shards that fail after retries do not stop the others; the flow then fails naming them and a
    rerun relabels just those. Returns the summary of `stages.relabel.summarize_relabel` (+ `failed_shards`).

    Args:
        campaign: The campaign to relabel (local path or fsspec URL), labelled with relabel_store=True.
        vocab: The new class names: comma-separated names, a vocabulary file or a built-in vocabulary name.
        out: The new campaign's directory (local path or fsspec URL); a rerun continues it.
        device: auto, cpu or cuda[:N] (the CLIP text encoder and the SAM decoder run there).
    """
    logger = get_run_logger()
    cfg = RelabelConfig(campaign=campaign, vocab=vocab, out=out, device=device)
    shard_ids = plan_relabel_task(campaign, vocab, out)
    t0 = time.perf_counter()
    results, failed = [], []
    for sid in shard_ids:
        state = relabel_shard_task(campaign, out, sid, device=device, return_state=True)
        if state.is_completed():
            results.append(state.result())
        else:
            failed.append(sid)
            logger.error("shard %06d failed after retries: %s", sid, state.message)
    summary = summarize_relabel(cfg, results, time.perf_counter() - t0)
    summary["failed_shards"] = failed
    logger.info("relabel summary: %s", summary)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(shard_ids)} shards failed after retries: {failed}; rerun the "
                           "flow to relabel just those")
    return summary
