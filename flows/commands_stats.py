"""`fmbseg stats`: label-quality diagnostics of a campaign without ground truth (stages/stats.py). It calls the
stage directly (no Prefect server needed); flows/stats_flow.py wires the same function as a task."""

from __future__ import annotations

import argparse
import os

from flows.cli import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "stats", help="label-quality diagnostics of a campaign, no ground truth needed",
        description="Per class: images detected, masks per stage, mask areas, score histograms, and the agreement "
        "of Stage 1.1 and Stage 1.2 (a label-noise proxy); classes never detected; coverage. Reads committed "
        "shards only. Writes stats.md, stats.json, agreement.png, scores_<n>.png and sam_scores_<n>.png.")
    p.add_argument("--campaign", required=True, metavar="DIR", help="campaign directory or fsspec URL")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder (local path or fsspec URL)")
    p.set_defaults(func=cmd_stats)


def cmd_stats(args: argparse.Namespace) -> int:
    from stages.stats import campaign_stats

    if "://" not in args.campaign and not os.path.isfile(os.path.join(args.campaign, "campaign.json")):
        raise UsageError(f"no campaign at {args.campaign} (campaign.json missing): run `fmbseg label` first")
    summary = campaign_stats(args.campaign, args.out)
    cov = summary["coverage"]
    agr = summary["overall_agreement"]
    print(f"{summary['images']} images ({summary['images_ok']} ok); coverage "
          f"{'-' if cov is None else f'{100 * cov:.1f} %'}; Stage 1.1/1.2 agreement "
          f"{'-' if agr is None else f'{100 * agr:.1f} %'}")
    if summary["never_detected"]:
        print(f"never detected: {', '.join(summary['never_detected'])}")
    if summary["lowest_agreement"]:
        print("lowest agreement: " + ", ".join(f"{n} {100 * a:.1f} %" for n, a in summary["lowest_agreement"]))
    print(f"report: {summary['files'][1]}")
    return 0
