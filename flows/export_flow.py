"""The `export-campaign` flow (around `stages.export`), and the pseudo-label picture sample the pipeline
publishes to the Prefect UI (around `stages.show`).

Export is resumable by itself (per-shard records in the output folder), so task-result caching is off: a rerun of
the flow exports only the shards committed since, then rebuilds the whole-campaign files.
"""

from __future__ import annotations

import base64
import io
import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import artifact_key, markdown_table, publish_markdown
from flows.label_flow import retry_unless_permanent
from stages.export import run_export
from storage.export import ExportFormat
from stages.show import show_campaign

THUMB_WIDTH = 640  # px: gallery pictures are embedded in the artifact as JPEG data URIs, kept small


def _local_campaign(campaign: str) -> str:
    if "://" in campaign and not campaign.startswith("file://"):
        raise ValueError(f"campaign {campaign} is not local: give `out`, a local folder")
    return campaign.removeprefix("file://")


def default_export_out(campaign: str, fmt: str) -> str:
    """`<campaign>/export/<format>` for a local campaign (exports are local folders)."""
    return os.path.join(_local_campaign(campaign), "export", fmt)


@task(name="export", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_permanent)
def export_task(campaign: str, fmt: str, out: str, selected_only: bool, copy: bool,
                push_to_hub: str | None) -> dict:
    return run_export(campaign, fmt, out, selected_only=selected_only, copy=copy, push_to_hub=push_to_hub,
                      progress=False)


@flow(name="export-campaign")
def export_campaign_flow(campaign: str, format: ExportFormat = "coco", out: str | None = None,
                         selected_only: bool = False, copy: bool = False, push_to_hub: str | None = None) -> dict:
    """Export the committed shards of a campaign (see `fmbseg export --help`); publishes a one-row summary artifact.

    Resumable: a rerun exports only the shards committed since, then rebuilds the whole-campaign files.

    Args:
        campaign: Campaign directory (local path or fsspec URL).
        format: coco (OUT/annotations.json, RLE masks), png (mmseg/HF PNG folders: img_dir, ann_dir, classes.txt)
            or hf (a `datasets` dataset saved with save_to_disk).
        out: Local output folder, one export per folder (default: <campaign>/export/<format>).
        selected_only: Only the masks that made the merged label maps (coco annotations, hf objects).
        copy: With format png: copy the images into img_dir (default: symlinks).
        push_to_hub: With format hf: also upload the dataset to this Hugging Face Hub repository (needs network
            access and a Hub token).
    """
    out = out or default_export_out(campaign, format)
    summary = export_task(campaign, format, out, selected_only, copy, push_to_hub)
    row = {k: summary[k] for k in ("format", "out", "shards", "shards_exported", "images", "masks", "images_per_s")}
    publish_markdown(markdown_table([row]), key=artifact_key(f"export-{format}", out),
                     description=f"Export of {campaign} as {format}")
    get_run_logger().info("exported %s images of %s into %s", summary["images"], campaign, out)
    return summary


def gallery_markdown(paths: list[str], campaign: str) -> str:
    """A markdown gallery: each picture embedded as a small JPEG data URI (the UI cannot read local files), with
    its full-size PNG's path below it."""
    from PIL import Image

    lines = [f"### Pseudo-labels of `{campaign}`", "",
             "Left: merged label map over the image. Right: every mask, Stage 1.1 orange, Stage 1.2 blue; "
             "selected masks solid, unselected dashed with the class name in parentheses.", ""]
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.width > THUMB_WIDTH:
                im = im.resize((THUMB_WIDTH, round(im.height * THUMB_WIDTH / im.width)), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        lines += [f"![{os.path.basename(p)}]({uri})", "", f"`{p}`", ""]
    return "\n".join(lines)


@task(name="show-pseudo-labels", cache_policy=NO_CACHE)
def show_sample_task(campaign: str, out: str, images: int) -> list[str]:
    return show_campaign(campaign, out, images=images)


def publish_pseudo_label_sample(campaign: str, images: int = 4, out: str | None = None) -> dict:
    """Draw the first `images` committed images of `campaign` (`fmbseg show`) into `out` (default
    `<campaign>/show`, local campaigns only) and publish them as a markdown gallery artifact. Called by the
    pipeline after labeling; a failure here is logged and never fails the pipeline."""
    logger = get_run_logger()
    try:
        out = out or os.path.join(_local_campaign(campaign), "show")
        paths = show_sample_task(campaign, out, images)
        key = artifact_key("pseudo-labels", campaign)
        publish_markdown(gallery_markdown(paths, campaign), key=key,
                         description=f"A sample of the pseudo-labels of {campaign}")
        return {"show_out": out, "pictures": paths, "artifact": key}
    except Exception as e:  # pictures are a convenience: the campaign itself is done
        logger.warning("pseudo-label pictures of %s not published: %s", campaign, e)
        return {"error": str(e)}
