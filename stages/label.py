"""Stage 1 at campaign scale: plan shards, label them image by image, commit them (DESIGN §1, §5).

`run_label` = `plan_campaign` + `label_shard` for each of this worker's shards. Rules kept here:
- every input image ends as exactly one `images` row; an exception in one image (undecodable file or a bug in
  the per-image algorithm) makes that image's row `failed` with the reason and never stops the shard;
- a shard is skipped when its done marker carries the campaign's Stage-1 config hash; a changed Stage-1 config
  (or another input folder) is refused with the differing fields named, unless `overwrite`: then the campaign's
  Stage-1 outputs are removed and it is planned afresh, exactly as a new campaign would be;
- shards commit through the attempt protocol of storage/shard_writer.py (docs/STORAGE.md): any number of
  concurrent writers of one shard end with one complete shard; a read-only campaign fails before compute;
- image paths outside the image root (COCO `../`, absolute names, symlinks leading out) are refused per image
  (a `failed` row) unless the campaign allows them (`allow_outside_root`);
- `retry_failed` recomputes done shards that have failed images (the whole shard, so its files stay consistent);
- workers split shards by `shard_id % world_size == rank`; outputs do not depend on the split.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import fmbseg
from fmbseg.images import ImageDecodeError, load_image
from fmbseg.kept import kept_to_arrays
from fmbseg.vocab import Vocabulary, parse_vocab
from stages import models_cache
from stages.label_pipeline import ExecutionConfig, ShardRows, failure_of, failure_row, label_entries
from stages.latest_checkpoint import LATEST
from storage import faults
from storage.campaign import CampaignManifest, differing_fields, read_manifest, write_manifest
from storage.fs import CampaignRoot
from storage.maintenance import reset_stage1_outputs
from storage.markers import CorruptMarker, read_done, read_done_or_none, scan_markers
from storage.planning import (PlanDamaged, append_shards, damaged_lists, input_root, list_inputs, outside_root,
                              planned_shards, read_shard)
from storage.reader import CampaignReader
from storage.relabel_store import build_relabel_group
from storage.shard_writer import ShardDamaged, commit_shard, needs_publish, publish, uncommit
from storage.tables import images_table, masks_table

log = logging.getLogger(__name__)

TIMING_KEYS = ("decode", "prepare", "clip", "sam_encoder", "sam_decoder", "labeling", "storage")


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
    # How images run (pipelined or serial, prefetch depth, SAM batch): never recorded, never changes outputs.
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    allow_outside_root: bool = False  # read COCO file names that leave the image root (`../`, absolute, symlinks)
    # Keep, per shard, what `fmbseg relabel` needs (relabel.zarr/, docs/STORAGE.md "Relabel store"); recorded in
    # campaign.json, so every shard of the campaign keeps it.
    relabel_store: bool = False

    def __post_init__(self):
        if isinstance(self.execution, dict):  # a config that travelled as JSON (flows pass plain dicts)
            self.execution = ExecutionConfig(**self.execution)


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


def check_models(clip, sam, manifest: CampaignManifest, campaign: str, remedy: str) -> None:
    """ValueError (naming the differing fields and `remedy`) when `clip`/`sam` are not the models `campaign` was
    labelled with."""
    built = _model_record(clip, sam)
    if built != manifest.models:
        diff = "; ".join(differing_fields({"models": manifest.models}, {"models": built}))
        raise ValueError(f"campaign {campaign} was labelled with other models than preset {manifest.preset!r} "
                         f"builds now ({diff}); {remedy}")


def committed_or_redo(root: CampaignRoot, shard_id: int, stage1_hash: str, redo_failed: bool = False):
    """Whether shard `shard_id` is already committed with `stage1_hash` -> `(marker, corrupt, done)`.

    `done`: committed and its public files are (now) complete — an interrupted publish is rolled forward here.
    Otherwise the shard must be (re)computed: `marker` is the commit to take out of the committed view first
    (`uncommit`), `corrupt` says a marker or committed file was damaged (logged). `redo_failed`: a committed
    shard with failed images counts as not done (`--retry-failed`)."""
    corrupt = False
    try:
        marker = read_done(root, shard_id)
    except CorruptMarker as e:  # commits nothing: relabel the shard (its marker is replaced at commit)
        log.warning("%s; relabelling shard %d", e, shard_id)
        marker, corrupt = None, True
    if marker is not None and marker.stage1_hash == stage1_hash and not (redo_failed and marker.failed):
        try:
            if needs_publish(root, marker):
                publish(root, marker)  # roll forward a publish that a crash interrupted
            return marker, corrupt, True
        except ShardDamaged as e:  # committed, but neither public nor staged files match: relabel it
            log.warning("%s; relabelling shard %d", e, shard_id)
            corrupt = True
    return marker, corrupt, False


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
    image_root = input_root(cfg.images, cfg.image_root)
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
            "root": image_root,  # shard lists store paths relative to this
            "allow_outside_root": bool(cfg.allow_outside_root),
        },
        relabel_store=bool(cfg.relabel_store),
    )
    root = CampaignRoot(cfg.campaign)
    old = read_manifest(root)
    if old is not None:
        # Compare what the stored config means (fields it predates read as they were labelled), so an old campaign
        # can be extended with the settings it was labelled with.
        diff = differing_fields(dataclasses.replace(old, stage1=stage1_config_from_manifest(old).to_dict()),
                                manifest)
        if manifest.relabel_store and not old.relabel_store:
            # Every shard keeps the store or none does: the shards labelled so far have none.
            diff.append("relabel_store: false -> true (the shards labelled so far kept no relabel store)")
        moved = (old.inputs.get("images") != manifest.inputs["images"]
                 or old.inputs.get("image_root") != manifest.inputs["image_root"])
        if (diff or moved) and cfg.overwrite:
            # Exactly what a fresh campaign would be: no shard list, part or marker of the old run survives
            # (a list's image ids could collide with the new inputs'; old parts have the old vocabulary).
            reset_stage1_outputs(root)
            old = None
        elif diff:
            raise ValueError(
                f"campaign {cfg.campaign} was labelled with another Stage-1 config ({'; '.join(diff)}); "
                "use another --campaign directory, or --overwrite to relabel it from scratch"
            )
        elif moved:
            raise ValueError(
                f"campaign {cfg.campaign} was planned from --images {old.inputs.get('images')} "
                f"(--image-root {old.inputs.get('image_root')}), not {manifest.inputs['images']} "
                f"(--image-root {manifest.inputs['image_root']}); if the same images moved, repoint the campaign "
                f"with `fmbseg label --campaign {cfg.campaign} --relocate NEW_ROOT`; otherwise use another "
                "--campaign directory, or --overwrite to relabel it from scratch"
            )
        elif old.inputs.get("root") is None:
            manifest.inputs["root"] = None  # planned before relative paths: its lists hold absolute paths
        if old is not None:
            manifest.stage1 = old.stage1  # the same meaning: keep the stored dict, and so the campaign's hash
            manifest.relabel_store = old.relabel_store  # once a campaign keeps the store, its later shards do too
    if old is None or old.to_json() != manifest.to_json():
        write_manifest(root, manifest)
    try:
        shard_ids, _ = append_shards(root, entries, cfg.shard_size, manifest.inputs["root"])
    except PlanDamaged as e:
        # Not a reason to stop the campaign: label the shards that are planned; new images wait for the repair
        # (appending now could give an image of the lost list a second shard). `run_label` reports it.
        log.warning("%s", e)
        shard_ids = planned_shards(root)
    return shard_ids


def shards_for_rank(shard_ids: list[int], rank: int, world_size: int) -> list[int]:
    """This worker's shards: `shard_id % world_size == rank` (deterministic, no coordination needed)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"--rank must be in 0..{world_size - 1}, got {rank!r}")
    return [s for s in shard_ids if s % world_size == rank]


# -- one shard --------------------------------------------------------------------------------------------------
def _refuse_outside_root(entries, manifest: CampaignManifest) -> dict[str, dict]:
    """image_id -> the `failed` row of every entry whose path leaves the campaign's image root."""
    inputs = manifest.inputs
    if inputs.get("allow_outside_root"):
        return {}
    base = inputs.get("root")
    if not base and inputs.get("images"):  # planned before relative paths
        base = input_root(inputs["images"], inputs.get("image_root"))
    if not base:
        return {}
    out = {}
    for e in entries:
        why = outside_root(e.path, base)
        if why:
            out[e.image_id] = failure_row(e, f"refused: {why} ({base}); relabel with --allow-outside-root to read it",
                                          "outside image root", None)
    return out


def label_shard(
    campaign: str,
    shard_id: int,
    device: str = "auto",
    retry_failed: bool = False,
    *,
    on_image: Callable[[int, int], None] | None = None,
    execution: ExecutionConfig | None = None,
) -> dict:
    """Label one planned shard and commit it; a no-op (`{"skipped": True, ...}`) when it is already done.

    `on_image(masks, failed)`: called after each image with the shard's running totals (progress bars; from the
    pipeline's writer thread when `execution.pipeline`). `execution`: how the images run (stages/label_pipeline.py;
    default: pipelined), never what they produce."""
    root = CampaignRoot(campaign)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"no campaign at {campaign} (campaign.json missing): run plan_campaign first")
    stage1_hash = manifest.stage1_hash()
    marker, corrupt, done = committed_or_redo(root, shard_id, stage1_hash, redo_failed=retry_failed)
    if done:
        return {"shard_id": shard_id, "images": marker.images, "ok": marker.ok, "failed": marker.failed,
                "masks": marker.masks, "seconds": 0.0, "skipped": True}
    root.check_writable()  # a read-only campaign fails here, not after the shard's compute
    faults.checkpoint("computing")
    entries = read_shard(root, shard_id)
    # Paths that leave the image root are refused per image (a failed row) unless the campaign allows them.
    order = {e.image_id: i for i, e in enumerate(entries)}
    refused = _refuse_outside_root(entries, manifest)
    entries = [e for e in entries if e.image_id not in refused]
    from fmbseg.stage1 import run_stage1

    config = stage1_config_from_manifest(manifest)
    clip, sam = models_cache.get_models(manifest.preset, device, config.dense_mode)
    check_models(clip, sam, manifest, campaign,
                 "rerun `fmbseg label` with --overwrite, or use another --campaign directory")
    vocab = Vocabulary.from_json(manifest.vocabulary)
    text = models_cache.text_embeddings(clip, vocab, config.templates)
    keep = manifest.relabel_store
    if marker is not None or corrupt:
        # A deliberate relabel (retry, another config, a corrupt marker or shard): out of the committed view first.
        uncommit(root, shard_id, expect=marker)

    t_start = time.perf_counter()
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    execution = execution or ExecutionConfig()
    acc = ShardRows(vocab.names, keep=functools.partial(kept_to_arrays, sam=sam) if keep else None)
    stats = None
    if execution.pipeline:
        # Decode/prepare ahead and merge/RLE behind the model work, same rows in the same order.
        stats = label_entries(entries, clip, sam, text, config, manifest.seed, acc, execution, timings, on_image,
                              shard_id)
    else:
        for entry in entries:
            t0 = time.perf_counter()
            hw = None
            try:
                image = load_image(entry.path)
                hw = image.shape[:2]
                timings["decode"] += time.perf_counter() - t0
                result = run_stage1(image, clip, sam, text, config, manifest.seed, entry.image_id, keep=keep)
                for k, v in result.timings.items():
                    if k in timings:
                        timings[k] += v
                t1 = time.perf_counter()
                if (result.height, result.width) != tuple(hw):
                    raise RuntimeError(f"Stage 1 returned a {result.label.shape} label map for a {hw} image")
                acc.add_ok(entry, hw, result.masks, result.selected, result.label, result.kept)
                timings["storage"] += time.perf_counter() - t1
            except ImageDecodeError as e:
                timings["decode"] += time.perf_counter() - t0
                acc.add_failure(entry, str(e), e.kind, e.hw)
            except Exception as e:  # a bug or resource error in one image must not kill the shard
                acc.add_failure(entry, *failure_of(e, entry, shard_id), hw)
            if on_image is not None:
                on_image(acc.n_masks, acc.n_failed)
    rows, cols, labels = acc.rows, acc.cols, acc.labels
    t_store = time.perf_counter()
    if refused:
        rows = sorted([*rows, *refused.values()], key=lambda r: order[r["image_id"]])
    failure_reasons = Counter(r.pop("_kind") for r in rows if "_kind" in r)
    names = list(vocab.names)
    marker = commit_shard(root, shard_id, stage1_hash, images_table(rows, names), masks_table(cols, names), labels,
                          failure_reasons=dict(failure_reasons), seconds=time.perf_counter() - t_start,
                          code_version=fmbseg.__version__,
                          relabel_files=build_relabel_group(acc.kept_ids, acc.kept, shard_id) if keep else None)
    timings["storage"] += time.perf_counter() - t_store
    return {"shard_id": shard_id, "images": marker.images, "ok": marker.ok, "failed": marker.failed,
            "masks": marker.masks, "seconds": round(time.perf_counter() - t_start, 4), "skipped": False,
            "failure_reasons": dict(failure_reasons), "timings": timings,
            "pipeline": stats.to_dict() if stats is not None else None}


# -- a whole run ------------------------------------------------------------------------------------------------
def run_label(cfg: LabelConfig, rank: int = 0, world_size: int = 1, retry_failed: bool = False,
              progress: bool = True) -> dict:
    """Plan the campaign, then label every not-yet-done shard of this worker; returns the run's summary."""
    from tqdm.auto import tqdm

    mine = shards_for_rank(plan_campaign(cfg), rank, world_size)
    root = CampaignRoot(cfg.campaign)
    lost = damaged_lists(root)
    stage1_hash = read_manifest(root).stage1_hash()
    todo = []
    for sid in mine:
        marker = read_done_or_none(root, sid)
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
            r = label_shard(cfg.campaign, sid, cfg.device, retry_failed, on_image=on_image, execution=cfg.execution)
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
    pipe: dict[str, float] = {}
    for r in ran:
        for k, v in (r.get("pipeline") or {}).items():
            pipe[k] = v if k == "host_workers" else pipe.get(k, 0.0) + v
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
        "pipeline": pipe or None,
        "problems": [f"shards/{sid:06d}.json is {why}: new images were not planned; run `fmbseg verify --campaign "
                     f"{cfg.campaign} --repair`, then label again" for sid, why in lost.items()],
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
    for p in s.get("problems", []):
        lines.append(f"problem    {p}")
    total = sum(s["timings"].values())
    if total > 0:
        lines.append("time split " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in s["timings"].items()))
    return "\n".join(lines)


def format_profile(s: dict) -> str:
    """`fmbseg label --profile`: seconds per image of each part (summed over the pipeline's lanes, so parts that
    overlap add up to more than the wall time) and the pipeline's idle fractions of its wall time."""
    n = max(s["images"], 1)
    lines = [f"profile    {s['images']} images, {s['seconds']:.2f} s wall ({1e3 * s['seconds'] / n:.1f} ms/image)"]
    names = {"decode": "decode + EXIF", "prepare": "CLIP upscale + SAM resize", "clip": "CLIP crops + detection",
             "sam_encoder": "SAM encoder", "sam_decoder": "SAM decoder (1.1 points + 1.2 auto)",
             "labeling": "mask pooling + merge", "storage": "RLE, rows, commit"}
    for k, v in s["timings"].items():
        lines.append(f"  {names.get(k, k):38} {1e3 * v / n:9.1f} ms/image")
    p = s.get("pipeline")
    if p and p.get("wall"):
        w = p["wall"]
        lines.append(f"pipeline   GPU waiting for host {p['model_wait_host'] / w:.0%}, host waiting for GPU "
                     f"{p['writer_wait_model'] / w:.0%} (writer idle), model lane busy {p['model_busy'] / w:.0%}, "
                     f"prefetch threads busy {p['prefetch_busy'] / (w * max(p.get('host_workers', 1), 1)):.0%}")
    else:
        lines.append("pipeline   off (serial loop)" if s["images"] else "pipeline   no image labelled in this run")
    return "\n".join(lines)


# -- status -----------------------------------------------------------------------------------------------------
def campaign_status(campaign: str) -> dict:
    """Done/total shards, images ok/failed with the commonest failure kinds, masks per class (from done markers),
    and the damage a cheap look can see (corrupt markers or shard lists, lost lists, markers of another config,
    unfinished publishes), each with its repair. File hashes are checked by `fmbseg verify`."""
    reader = CampaignReader(campaign)
    root = reader.root
    planned = reader.shards()
    good, corrupt = scan_markers(root)
    done = {sid: m for sid, m in good.items() if m.stage1_hash == reader.stage1_hash}
    reasons: Counter = Counter()
    per_class: Counter = Counter()
    selected: Counter = Counter()
    for m in done.values():
        reasons.update(m.failure_reasons)
        per_class.update(m.masks_per_class)
        selected.update(m.selected_per_class)
    problems = [f"{e.rel}: {e.reason}" for e in corrupt.values()]
    lost = damaged_lists(root)
    problems += [f"shards/{sid:06d}.json: {why}" for sid, why in lost.items()]
    stale = [sid for sid, m in good.items() if m.stage1_hash != reader.stage1_hash]
    if stale:
        problems.append(f"{len(stale)} done marker(s) of another Stage-1 config (shards {stale[:5]})")
    unpublished = [sid for sid, m in done.items() if needs_publish(root, m)]
    if unpublished:
        problems.append(f"{len(unpublished)} committed shard(s) not fully published (shards {unpublished[:5]}); "
                        "readers use the staged copy")
    images_planned = 0
    for sid in planned:
        try:
            images_planned += len(reader.shard_images(sid))
        except (PlanDamaged, ValueError):
            pass
    return {
        "campaign": campaign,
        "preset": reader.manifest.preset,
        "classes": len(reader.vocabulary),
        "shards_total": len(set(planned) | set(lost)),  # a lost list still counts: its shard is not done
        "shards_done": len(done),
        "images_planned": images_planned,
        "images_done": sum(m.images for m in done.values()),
        "images_ok": sum(m.ok for m in done.values()),
        "images_failed": sum(m.failed for m in done.values()),
        "failure_reasons": dict(reasons.most_common(5)),
        "masks": sum(m.masks for m in done.values()),
        "masks_per_class": dict(per_class.most_common()),
        "selected_per_class": dict(selected.most_common()),
        "problems": problems,
        "failed_images": _failed_images(reader, done),
        "outputs": _stage2_outputs(root),
    }


FAILED_SHOWN = 10


def _failed_images(reader: CampaignReader, done: dict, limit: int = FAILED_SHOWN) -> list[dict]:
    """The first `limit` failed images ({image_id, path, error}) of the committed shards, in shard order; reads only
    the `images` tables of shards whose marker counts failures."""
    out: list[dict] = []
    for sid, m in done.items():
        if not m.failed:
            continue
        try:
            rows = reader.images([sid]).to_pylist()
        except Exception as e:  # noqa: BLE001 - a damaged shard is reported by `problems`/verify, not here
            log.warning("cannot read the images table of shard %d: %s", sid, e)
            continue
        out += [{"image_id": r["image_id"], "path": r["path"], "error": r["error"]} for r in rows
                if r["status"] == "failed"]
        if len(out) >= limit:
            return out[:limit]
    return out


def _stage2_outputs(root: CampaignRoot) -> dict[str, list[str]]:
    """What was made from the campaign under its root: checkpoints (`train/*/model.pt`) and the newest one
    (`train/latest.json`, what `--checkpoint CAMPAIGN` uses), evaluation reports
    (`eval/*/results.md`), label-quality reports (`stats/stats.md`) and pseudo-label pictures (`show/`), as
    campaign-relative paths."""
    out: dict[str, list[str]] = {"checkpoints": [], "reports": [], "latest": []}
    if root.exists(LATEST):
        try:
            out["latest"].append(f"{LATEST} -> {root.read_json(LATEST)['checkpoint']}")
        except (ValueError, KeyError, TypeError) as e:
            out["latest"].append(f"{LATEST} unreadable ({e}): the next `fmbseg train` rewrites it")
    for name in root.listdir("train"):
        if root.exists(f"train/{name}/model.pt"):
            out["checkpoints"].append(f"train/{name}/model.pt")
    for name in root.listdir("eval"):
        if root.exists(f"eval/{name}/results.md"):
            out["reports"].append(f"eval/{name}/results.md")
    for rel in ("stats/stats.md", "show"):
        if root.exists(rel):
            out["reports"].append(rel)
    return out


def format_status(s: dict) -> str:
    """The screen `fmbseg status` prints."""
    lines = [
        f"campaign  {s['campaign']}  (preset {s['preset']}, {s['classes']} class{'' if s['classes'] == 1 else 'es'})",
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
    failed = s.get("failed_images") or []
    if failed:
        more = s["images_failed"] - len(failed)
        lines.append(f"failed    first {len(failed)} of {s['images_failed']} (all: the `error` column of images/; "
                     "`fmbseg label ... --retry-failed` retries them):")
        for r in failed:
            lines.append(f"  {r['path'] or r['image_id']}: {r['error']}")
        if more > 0:
            lines.append(f"  ... {more} more")
    outputs = s.get("outputs") or {}
    for kind in ("latest", "checkpoints", "reports"):
        if outputs.get(kind):
            lines.append(f"{kind:<9} " + ", ".join(outputs[kind]))
    for p in s.get("problems", []):
        lines.append(f"problem   {p}")
    if s.get("problems"):
        lines.append(f"recover   fmbseg verify --campaign {s['campaign']} --repair, then fmbseg label again "
                     "(redoes only the dropped shards)")
    else:
        lines.append(f"integrity fmbseg verify --campaign {s['campaign']} checks every file against its done marker")
    return "\n".join(lines)
