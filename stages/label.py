"""Stage 1 at campaign scale: plan shards, label them image by image, commit them (DESIGN §1, §5).

`run_label` = `plan_campaign` + `label_shard` for each of this worker's shards. Rules kept here:
- every input image ends as exactly one `images` row; an exception in one image (undecodable file or a bug in
  the per-image algorithm) makes that image's row `failed` with the reason and never stops the shard;
- a shard is skipped when its done marker carries the campaign's Stage-1 config hash; a changed Stage-1 config
  is refused with the differing fields named, unless `overwrite` (then every shard is relabelled);
- `retry_failed` recomputes done shards that have failed images (the whole shard, so its files stay consistent);
- workers split shards by `shard_id % world_size == rank`; outputs do not depend on the split.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import fmbseg
from fmbseg.images import ImageDecodeError, load_image
from fmbseg.vocab import Vocabulary, parse_vocab
from stages import models_cache
from storage.campaign import CampaignManifest, differing_fields, read_manifest, write_manifest
from storage.fs import CampaignRoot
from storage.labels import PackedLabels
from storage.markers import read_done, remove_done
from storage.planning import append_shards, list_inputs, planned_shards, read_shard
from storage.reader import CampaignReader
from storage.shard_writer import commit_shard
from storage.tables import encode_masks, images_table, masks_table

log = logging.getLogger(__name__)

TIMING_KEYS = ("decode", "clip", "sam_encoder", "sam_decoder", "labeling", "storage")


@dataclass
class LabelConfig:
    """One labeling run. `stage1` overrides `Stage1Config` fields, on top of the preset's own overrides."""

    images: str
    vocab: str
    campaign: str
    preset: str = "base"
    shard_size: int = 256
    seed: int = 0
    device: str = "auto"
    image_root: str | None = None
    stage1: dict = field(default_factory=dict)
    overwrite: bool = False


# -- Stage-1 config ---------------------------------------------------------------------------------------------
def build_stage1_config(preset: str, overrides: dict | None = None):
    """`Stage1Config` with the preset's overrides, then the user's (an unknown field is an error naming it)."""
    from fmbseg.presets import stage1_overrides
    from fmbseg.stage1 import Stage1Config

    return Stage1Config.from_dict({**dict(stage1_overrides(preset)), **dict(overrides or {})})


def stage1_config_from_manifest(manifest: CampaignManifest):
    """The Stage-1 config a campaign was labelled with; fields its campaign.json predates keep their old meaning
    (`Stage1Config.from_stored`), so an old campaign's remaining shards are labelled as its first ones were."""
    from fmbseg.stage1 import Stage1Config

    return Stage1Config.from_stored(manifest.stage1)


def _model_record(clip, sam) -> dict:
    return {
        "clip": {"id": clip.model_id, "weights_sha256": clip.weights_sha256},
        "sam": {"id": sam.model_id, "weights_sha256": sam.weights_sha256},
    }


# -- planning ---------------------------------------------------------------------------------------------------
def _known_presets() -> list[str]:
    from fmbseg.presets import PRESETS

    return sorted(PRESETS)


def plan_campaign(cfg: LabelConfig) -> list[int]:
    """Write or validate `campaign.json`, append shards for images not planned yet; returns every shard id.

    Raises ValueError naming the differing fields when the campaign was labelled with another Stage-1 config
    (unless `cfg.overwrite`), FileNotFoundError for missing inputs."""
    if cfg.preset not in _known_presets():
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {_known_presets()}")
    if not isinstance(cfg.shard_size, int) or cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be a positive integer, got {cfg.shard_size!r}")
    vocab = parse_vocab(cfg.vocab)
    stage1 = build_stage1_config(cfg.preset, cfg.stage1)
    entries = list_inputs(cfg.images, cfg.image_root)
    if not entries:
        raise ValueError(f"no image files (.jpg .jpeg .png .webp .bmp .tif .tiff) under {cfg.images}")
    clip, sam = models_cache.get_models(cfg.preset, cfg.device, stage1.dense_mode)
    local = "://" not in cfg.images
    manifest = CampaignManifest(
        stage1=stage1.to_dict(),
        vocabulary=vocab.to_json(),
        preset=cfg.preset,
        models=_model_record(clip, sam),
        seed=int(cfg.seed),
        code_version=fmbseg.__version__,
        inputs={
            "images": os.path.abspath(cfg.images) if local else cfg.images,
            "image_root": (os.path.abspath(cfg.image_root) if cfg.image_root and "://" not in cfg.image_root
                           else cfg.image_root),
        },
    )
    root = CampaignRoot(cfg.campaign)
    old = read_manifest(root)
    if old is not None and not cfg.overwrite:
        diff = differing_fields(old, manifest)
        if diff:
            raise ValueError(
                f"campaign {cfg.campaign} was labelled with another Stage-1 config ({'; '.join(diff)}); "
                "use another --campaign directory, or --overwrite to relabel every shard"
            )
        if old.inputs.get("images") != manifest.inputs["images"] or old.inputs.get("image_root") != manifest.inputs["image_root"]:
            raise ValueError(
                f"campaign {cfg.campaign} was planned from --images {old.inputs.get('images')} "
                f"(--image-root {old.inputs.get('image_root')}), not {manifest.inputs['images']} "
                f"(--image-root {manifest.inputs['image_root']}); use another --campaign directory, or --overwrite"
            )
    if old is None or old.to_json() != manifest.to_json():
        write_manifest(root, manifest)
    shard_ids, _ = append_shards(root, entries, cfg.shard_size)
    return shard_ids


def shards_for_rank(shard_ids: list[int], rank: int, world_size: int) -> list[int]:
    """This worker's shards: `shard_id % world_size == rank` (deterministic, no coordination needed)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"--rank must be in 0..{world_size - 1}, got {rank!r}")
    return [s for s in shard_ids if s % world_size == rank]


# -- one shard --------------------------------------------------------------------------------------------------
_MASK_COLUMNS = ("image_id", "mask_id", "stage", "class_id", "class_name", "score", "sam_score", "area", "bbox",
                 "height", "width", "rle", "selected")


def _failure(entry, reason: str, kind: str, hw: tuple[int, int] | None) -> dict:
    return {"image_id": entry.image_id, "path": entry.path, "status": "failed", "error": reason,
            "height": hw[0] if hw else None, "width": hw[1] if hw else None, "n_masks": 0, "_kind": kind}


def label_shard(
    campaign: str,
    shard_id: int,
    device: str = "auto",
    retry_failed: bool = False,
    *,
    on_image: Callable[[int, int], None] | None = None,
) -> dict:
    """Label one planned shard and commit it; a no-op (`{"skipped": True, ...}`) when it is already done.

    `on_image(masks, failed)`: called after each image with the shard's running totals (progress bars)."""
    root = CampaignRoot(campaign)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"no campaign at {campaign} (campaign.json missing): run plan_campaign first")
    stage1_hash = manifest.stage1_hash()
    marker = read_done(root, shard_id)
    if marker is not None and marker.stage1_hash == stage1_hash and not (retry_failed and marker.failed):
        return {"shard_id": shard_id, "images": marker.images, "ok": marker.ok, "failed": marker.failed,
                "masks": marker.masks, "seconds": 0.0, "skipped": True}
    entries = read_shard(root, shard_id)
    from fmbseg.stage1 import run_stage1

    config = stage1_config_from_manifest(manifest)
    clip, sam = models_cache.get_models(manifest.preset, device, config.dense_mode)
    if _model_record(clip, sam) != manifest.models:
        diff = "; ".join(differing_fields({"models": manifest.models}, {"models": _model_record(clip, sam)}))
        raise ValueError(
            f"campaign {campaign} was labelled with other models than preset {manifest.preset!r} builds now "
            f"({diff}); rerun `fmbseg label` with --overwrite, or use another --campaign directory"
        )
    vocab = Vocabulary.from_json(manifest.vocabulary)
    text = models_cache.text_embeddings(clip, vocab, config.templates)
    if marker is not None:
        remove_done(root, shard_id)  # readers must not see a committed shard while its files are rewritten

    t_start = time.perf_counter()
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    rows: list[dict] = []
    cols: dict[str, list] = {k: [] for k in _MASK_COLUMNS}
    labels = PackedLabels()
    n_masks = n_failed = 0
    for entry in entries:
        t0 = time.perf_counter()
        hw = None
        try:
            image = load_image(entry.path)
            hw = image.shape[:2]
            timings["decode"] += time.perf_counter() - t0
            result = run_stage1(image, clip, sam, text, config, manifest.seed, entry.image_id)
            for k, v in result.timings.items():
                if k in timings:
                    timings[k] += v
            t1 = time.perf_counter()
            if (result.height, result.width) != tuple(hw) or result.label.shape != tuple(hw):
                raise RuntimeError(f"Stage 1 returned a {result.label.shape} label map for a {hw} image")
            n = len(result.masks)
            enc = encode_masks(np.stack([m.mask for m in result.masks]) if n else np.zeros((0, *hw), bool))
            selected = np.asarray(result.selected, bool).reshape(-1)
            if selected.shape[0] != n:
                raise RuntimeError(f"Stage 1 returned {selected.shape[0]} selection flags for {n} masks")
            for j, m in enumerate(result.masks):
                cols["image_id"].append(entry.image_id)
                cols["mask_id"].append(j)
                cols["stage"].append(m.stage)
                cols["class_id"].append(int(m.class_id))
                cols["class_name"].append(vocab.names[m.class_id])
                cols["score"].append(float(m.score))
                cols["sam_score"].append(float(m.sam_score))
                cols["area"].append(int(enc.area[j]))
                cols["bbox"].append(enc.bbox[j])
                cols["height"].append(int(hw[0]))
                cols["width"].append(int(hw[1]))
                cols["rle"].append(enc.counts[j])
                cols["selected"].append(bool(selected[j]))
            labels.add(entry.image_id, np.asarray(result.label, np.uint16))
            rows.append({"image_id": entry.image_id, "path": entry.path, "status": "ok", "error": None,
                         "height": int(hw[0]), "width": int(hw[1]), "n_masks": n})
            n_masks += n
            timings["storage"] += time.perf_counter() - t1
        except ImageDecodeError as e:
            timings["decode"] += time.perf_counter() - t0
            rows.append(_failure(entry, str(e), e.kind, e.hw))
            n_failed += 1
        except Exception as e:  # a bug or resource error in one image must not kill the shard
            log.warning("image %s of shard %d failed", entry.image_id, shard_id, exc_info=True)
            # Drop any partial mask rows of this image so the tables stay consistent with its `failed` row.
            while cols["image_id"] and cols["image_id"][-1] == entry.image_id:
                for k in _MASK_COLUMNS:
                    cols[k].pop()
            rows.append(_failure(entry, f"{type(e).__name__}: {e}", type(e).__name__, hw))
            n_failed += 1
        if on_image is not None:
            on_image(n_masks, n_failed)
    t_store = time.perf_counter()
    failure_reasons = Counter(r.pop("_kind") for r in rows if "_kind" in r)
    names = list(vocab.names)
    marker = commit_shard(root, shard_id, stage1_hash, images_table(rows, names), masks_table(cols, names), labels,
                          failure_reasons=dict(failure_reasons), seconds=time.perf_counter() - t_start,
                          code_version=fmbseg.__version__)
    timings["storage"] += time.perf_counter() - t_store
    return {"shard_id": shard_id, "images": marker.images, "ok": marker.ok, "failed": marker.failed,
            "masks": marker.masks, "seconds": round(time.perf_counter() - t_start, 4), "skipped": False,
            "failure_reasons": dict(failure_reasons), "timings": timings}


# -- a whole run ------------------------------------------------------------------------------------------------
def run_label(cfg: LabelConfig, rank: int = 0, world_size: int = 1, retry_failed: bool = False,
              progress: bool = True) -> dict:
    """Plan the campaign, then label every not-yet-done shard of this worker; returns the run's summary."""
    from tqdm.auto import tqdm

    mine = shards_for_rank(plan_campaign(cfg), rank, world_size)
    root = CampaignRoot(cfg.campaign)
    stage1_hash = read_manifest(root).stage1_hash()
    todo = []
    for sid in mine:
        marker = read_done(root, sid)
        if marker is None or marker.stage1_hash != stage1_hash or (retry_failed and marker.failed):
            todo.append(sid)
    n_todo = sum(len(read_shard(root, sid)) for sid in todo)
    t0 = time.perf_counter()
    bar = tqdm(total=n_todo, unit="img", desc=f"label rank {rank}/{world_size}", disable=not progress,
               dynamic_ncols=True)
    done_masks = done_failed = 0  # totals of this run's finished shards

    def on_image(masks: int, failed: int) -> None:
        bar.update(1)
        bar.set_postfix(masks=done_masks + masks, failed=done_failed + failed, refresh=False)

    results = []
    try:
        for sid in mine:
            r = label_shard(cfg.campaign, sid, cfg.device, retry_failed, on_image=on_image)
            results.append(r)
            if not r["skipped"]:
                done_masks += r["masks"]
                done_failed += r["failed"]
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    ran = [r for r in results if not r["skipped"]]
    reasons: Counter = Counter()
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    for r in ran:
        reasons.update(r["failure_reasons"])
        for k, v in r["timings"].items():
            timings[k] += v
    images = sum(r["images"] for r in ran)
    return {
        "campaign": cfg.campaign,
        "rank": rank,
        "world_size": world_size,
        "shards": len(mine),
        "shards_labelled": len(ran),
        "shards_skipped": len(results) - len(ran),
        "images": images,
        "ok": sum(r["ok"] for r in ran),
        "failed": sum(r["failed"] for r in ran),
        "masks": sum(r["masks"] for r in ran),
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 3) if seconds > 0 and images else 0.0,
        "failure_reasons": dict(reasons.most_common()),
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def format_label_summary(s: dict) -> str:
    """The one-screen summary `fmbseg label` prints."""
    lines = [
        f"campaign   {s['campaign']}  (rank {s['rank']} of {s['world_size']})",
        f"shards     {s['shards']} for this worker: {s['shards_labelled']} labelled, {s['shards_skipped']} already done",
        f"images     {s['images']} labelled: {s['ok']} ok, {s['failed']} failed",
        f"masks      {s['masks']}",
        f"time       {s['seconds']:.1f} s ({s['images_per_s']:.2f} images/s)",
    ]
    if s["failure_reasons"]:
        lines.append("failures   " + ", ".join(f"{k} x{n}" for k, n in list(s["failure_reasons"].items())[:5])
                     + "  (details: the `error` column of images/)")
    total = sum(s["timings"].values())
    if total > 0:
        lines.append("time split " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in s["timings"].items()))
    return "\n".join(lines)


# -- status -----------------------------------------------------------------------------------------------------
def campaign_status(campaign: str) -> dict:
    """Done/total shards, images ok/failed with the commonest failure kinds, masks per class (from done markers)."""
    reader = CampaignReader(campaign)
    planned = reader.shards()
    done = reader.done()
    reasons: Counter = Counter()
    per_class: Counter = Counter()
    selected: Counter = Counter()
    for m in done.values():
        reasons.update(m.failure_reasons)
        per_class.update(m.masks_per_class)
        selected.update(m.selected_per_class)
    return {
        "campaign": campaign,
        "preset": reader.manifest.preset,
        "classes": len(reader.vocabulary),
        "shards_total": len(planned),
        "shards_done": len(done),
        "images_planned": sum(len(reader.shard_images(s)) for s in planned),
        "images_done": sum(m.images for m in done.values()),
        "images_ok": sum(m.ok for m in done.values()),
        "images_failed": sum(m.failed for m in done.values()),
        "failure_reasons": dict(reasons.most_common(5)),
        "masks": sum(m.masks for m in done.values()),
        "masks_per_class": dict(per_class.most_common()),
        "selected_per_class": dict(selected.most_common()),
    }


def format_status(s: dict) -> str:
    """The screen `fmbseg status` prints."""
    lines = [
        f"campaign  {s['campaign']}  (preset {s['preset']}, {s['classes']} classes)",
        f"shards    {s['shards_done']}/{s['shards_total']} done",
        f"images    {s['images_done']}/{s['images_planned']} labelled: {s['images_ok']} ok, {s['images_failed']} failed",
    ]
    if s["failure_reasons"]:
        lines.append("failures  " + ", ".join(f"{k} x{n}" for k, n in s["failure_reasons"].items()))
    lines.append(f"masks     {s['masks']}")
    if s["masks_per_class"]:
        width = max(len(k) for k in s["masks_per_class"])
        for name, n in list(s["masks_per_class"].items())[:20]:
            lines.append(f"  {name:<{width}}  {n:>8}  ({s['selected_per_class'].get(name, 0)} in label maps)")
        if len(s["masks_per_class"]) > 20:
            lines.append(f"  ... {len(s['masks_per_class']) - 20} more classes")
    return "\n".join(lines)
