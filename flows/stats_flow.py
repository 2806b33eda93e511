"""The `campaign-stats` flow: label-quality diagnostics of a campaign (stages/stats.py) as a Prefect task, its
`stats.md` published as a markdown artifact keyed by the campaign. It passes and returns small values only (paths
and a summary); the pipeline flow calls `campaign_stats_flow` after labeling."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import artifact_key, publish_markdown
from stages.stats import campaign_stats
from storage.fs import CampaignRoot


@task(name="campaign-stats", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def campaign_stats_task(campaign: str, out: str) -> dict:
    """-> the small summary of `stages.stats.campaign_stats` (coverage, agreement, files written)."""
    return campaign_stats(campaign, out)


@flow(name="campaign-stats")
def campaign_stats_flow(campaign: str, out: str) -> dict:
    """Label quality without ground truth: write `stats.md`, `stats.json` and PNG plots; publish `stats.md`.

    Args:
        campaign: Campaign directory (local path or fsspec URL).
        out: Folder (local path or fsspec URL) the report and plots are written to.
    """
    summary = campaign_stats_task(campaign, out)
    markdown = CampaignRoot(out).read_bytes("stats.md").decode("utf-8")
    publish_markdown(markdown, key=artifact_key("label-quality", campaign),
                     description=f"Label quality of {campaign} without ground truth (Stage 1.1/1.2 agreement)")
    get_run_logger().info("label quality of %s: coverage %s, Stage 1.1/1.2 agreement %s, never detected %s",
                          campaign, summary["coverage"], summary["overall_agreement"], summary["never_detected"])
    return summary
