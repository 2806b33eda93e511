"""`fmbseg export`: a campaign's committed shards as COCO, mmseg/HF PNG folders or a Hugging Face dataset.

The work is `storage.export.export_campaign` (streaming, resumable, committed shards only); this stage adds the
class colours of `fmbseg.show.class_palette` (so the PNG label maps look like `fmbseg show`'s pictures), the
resolved config next to the output, and the optional push of the `hf` export to the Hugging Face Hub.
"""

from __future__ import annotations

import json
import os
import time

from fmbseg.show import class_palette
from storage.export import EXPORT_FORMATS, export_campaign
from storage.fs import write_file
from storage.reader import CampaignReader


def run_export(campaign: str, fmt: str, out: str, selected_only: bool = False, copy: bool = False,
               push_to_hub: str | None = None, progress: bool = True) -> dict:
    """Export `campaign` into `out` (see storage/export.py for the layouts) -> summary dict with `seconds` and
    `images_per_s` of this run. `push_to_hub` (hf only) uploads the saved dataset to that Hub repository: it needs
    network access and a Hugging Face token, and is not exercised by this repository's tests (offline)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if push_to_hub and fmt != "hf":
        raise ValueError("--push-to-hub needs --format hf")
    reader = CampaignReader(campaign)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(reader.done()), unit="shard", desc=f"export {fmt}")
    t0 = time.perf_counter()
    summary = export_campaign(reader, fmt, out, selected_only=selected_only, copy=copy,
                              palette=class_palette(len(reader.vocabulary)),
                              on_shard=(lambda sid, rec: bar.update(1)) if bar else None)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    summary["seconds"] = round(seconds, 3)
    summary["images_per_s"] = round(summary["images"] / seconds, 2) if seconds > 0 else 0.0
    write_file(os.path.join(out, "export.config.json"), (json.dumps(
        {"campaign": campaign, "format": fmt, "selected_only": selected_only, "copy": copy,
         "stage1_hash": reader.stage1_hash, "vocabulary": reader.vocabulary, "shards": summary["shards"],
         "images": summary["images"]}, indent=1, sort_keys=True) + "\n").encode())
    if push_to_hub:
        summary["pushed_to"] = push_hf(out, push_to_hub)
    return summary


def push_hf(out: str, repo: str) -> str:
    """Upload the `hf` export at `out` to the Hub repository `repo` (network and a token needed; untested here)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError("--push-to-hub needs network access, but HF_HUB_OFFLINE=1 is set")
    from datasets import load_from_disk

    load_from_disk(out).push_to_hub(repo)
    return repo


def format_export_summary(summary: dict) -> str:
    lines = [f"exported {summary['images']} images ({summary['masks']} masks) of {summary['shards']} committed "
             f"shards as {summary['format']} into {summary['out']} "
             f"({summary['shards_exported']} shards this run, {summary['shards_skipped']} already exported; "
             f"{summary['images_per_s']} images/s)"]
    lines += [f"  {f}" for f in summary["files"]]
    if summary.get("pushed_to"):
        lines.append(f"  pushed to https://huggingface.co/datasets/{summary['pushed_to']}")
    return "\n".join(lines)
