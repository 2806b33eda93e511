"""Relabel a campaign with a new vocabulary without rerunning the image encoders (issue 12).

`run_relabel(RelabelConfig(campaign=C, vocab=NEW, out=C2))` writes a new campaign C2 whose `images`, `masks` and
`labels.zarr` are those a full `fmbseg label` with NEW on the same images (same Stage-1 config, preset, models,
seed, shard lists) writes — bit for bit when relabel runs on the same kind of device that labelled C; one
exception on CUDA: an image that gets its first SAM pass during relabel (below) is encoded alone, while label
batches the encoder (`sam_batch`), which can move its embedding by bf16 noise — and C2 keeps a relabel store
itself, so it can be relabelled again.

C must have been labelled with `fmbseg label --relabel-store` (fmbseg >= `RELABEL_STORE_SINCE`): every committed
shard then holds `relabel.zarr/NNNNNN/` (storage/relabel_store.py, fmbseg/kept.py): per image the sliding-window
CLIP features (crop CLS, dense map, geometry) and, for images that got a SAM pass, the SAM embedding and the 1.2
automatic masks with their SAM scores. Relabel reads those and reruns only what depends on the vocabulary: the
CLIP text encoder, detection, the 1.1 point prompts and the SAM *decoder* call for them (on the kept embedding),
the pooling of the dense map under every candidate, the merge (`fmbseg.stage1.relabel_stage1`). An image that had
no SAM pass in C (nothing detected) but detects a class under NEW gets one now (its image is read; SAM encoder +
automatic masks), exactly as the full run would; the summary counts them (`new_sam_passes`).

What C2 takes from C as is: campaign.json (except the vocabulary and the code version), the shard lists, and the
rows of images that failed in C (a failed image has no kept results; `fmbseg label --campaign C2 ...
--retry-failed` retries them with the full pipeline). The `path` column is the image's current location (the
shard list under `inputs.root`), as a full run would record it. Run-specific fields that differ from a full run:
the done markers' `seconds`, `attempt` and `code_version`, and C2's relabel store, which also keeps the SAM
embeddings of images that no longer detect anything (a full run would not compute them).

Resumable per shard, like `label`: a shard of C2 whose done marker carries C2's hash is skipped; shards go through
the same attempt/commit protocol (storage/shard_writer.py).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import fmbseg
from fmbseg.images import ImageDecodeError, load_image
from fmbseg.kept import kept_from_arrays, kept_to_arrays
from fmbseg.vocab import Vocabulary, parse_vocab
from stages import models_cache
from stages.label import check_models, committed_or_redo, stage1_config_from_manifest
from stages.label_pipeline import ShardRows, failure_of
from storage.campaign import CampaignManifest, differing_fields, read_manifest, write_manifest
from storage.fs import CampaignRoot
from storage.layout import images_path, shard_list_path
from storage.markers import DoneMarker, read_done_or_none
from storage.planning import ImageEntry, planned_shards, read_shard
from storage.relabel_store import build_relabel_group, has_relabel_store, read_relabel_group, relabel_file_prefix
from storage.shard_writer import commit_shard, read_committed, uncommit
from storage.tables import images_table, masks_table, parquet_bytes_to_table

log = logging.getLogger(__name__)

# The first fmbseg version whose `fmbseg label --relabel-store` keeps what relabel reads.
RELABEL_STORE_SINCE = "0.2.0"
TIMING_KEYS = ("read", "decode", "clip", "sam_encoder", "sam_decoder", "labeling", "storage")


class RelabelUnavailable(ValueError):
    """The source campaign (or one of its shards) has no relabel store: the message names the version and flag."""


def _unavailable(campaign: str, why: str) -> RelabelUnavailable:
    return RelabelUnavailable(
        f"relabel needs a campaign labelled with fmbseg >= {RELABEL_STORE_SINCE} with `fmbseg label "
        f"--relabel-store`; {campaign} {why}. Label the images once with `fmbseg label --relabel-store` (a new "
        f"--campaign, or --overwrite), or run `fmbseg label` with the new vocabulary directly")


@dataclass
class RelabelConfig:
    """One relabel run: source campaign, new vocabulary (as `fmbseg label --vocab` takes it), output campaign."""

    campaign: str
    vocab: str
    out: str
    device: str = "auto"


def plan_relabel(cfg: RelabelConfig) -> list[int]:
    """Write or validate C2's campaign.json (C's, with the new vocabulary) and copy C's shard lists; -> every shard
    id. Raises `RelabelUnavailable` when C keeps no relabel store, ValueError when `out` is another campaign."""
    src = CampaignRoot(cfg.campaign)
    manifest = read_manifest(src)
    if manifest is None:
        raise FileNotFoundError(f"no campaign at {cfg.campaign} (campaign.json missing)")
    if not manifest.relabel_store:
        raise _unavailable(cfg.campaign, "was labelled without it")
    vocab = parse_vocab(cfg.vocab)
    if CampaignRoot(cfg.out).url == src.url:
        raise ValueError("--out must be a new campaign directory, not the source campaign")
    new = CampaignManifest(
        # The resolved config (what a fresh `fmbseg label` writes), so C2's hash is the full run's.
        stage1=stage1_config_from_manifest(manifest).to_dict(),
        vocabulary=vocab.to_json(),
        preset=manifest.preset,
        models=manifest.models,
        seed=manifest.seed,
        code_version=fmbseg.__version__,
        inputs=dict(manifest.inputs),
        relabel_store=True,
    )
    out = CampaignRoot(cfg.out)
    old = read_manifest(out)
    if old is not None:
        diff = differing_fields(old, new)
        if old.inputs != new.inputs:
            diff.append(f"inputs: {old.inputs} -> {new.inputs}")
        if diff:
            raise ValueError(f"{cfg.out} is a campaign with other settings ({'; '.join(diff)}); use another --out")
    else:
        write_manifest(out, new)
    shard_ids = planned_shards(src)
    for sid in shard_ids:
        rel = shard_list_path(sid)
        data = src.read_bytes(rel)
        if not out.exists(rel):
            out.write_bytes(rel, data)
        elif out.read_bytes(rel) != data:
            raise ValueError(f"{out.full_url(rel)} differs from {src.full_url(rel)}: {cfg.out} was planned from "
                             "other images; use another --out")
    return shard_ids


def _source_shard(src: CampaignRoot, manifest: CampaignManifest, shard_id: int, campaign: str
                  ) -> tuple[DoneMarker, list[dict], dict[str, bytes], dict[str, dict]] | None:
    """C's committed shard: (marker, its `images` rows, its relabel store's files (group-relative key -> bytes) and
    their content by image id); None when not committed."""
    marker = read_done_or_none(src, shard_id)
    if marker is None or marker.stage1_hash != manifest.stage1_hash():
        return None
    if not has_relabel_store(marker.files, shard_id):
        raise _unavailable(campaign, f"has no relabel store in shard {shard_id} (its done marker names none)")
    rows = parquet_bytes_to_table(read_committed(src, marker, images_path(shard_id))).to_pylist()
    prefix = relabel_file_prefix(shard_id)
    files = {rel[len(prefix):]: read_committed(src, marker, rel) for rel in marker.files if rel.startswith(prefix)}
    return marker, rows, files, read_relabel_group(files)


def _embedder(sam, entry: ImageEntry, hw: tuple[int, int], timings: dict) -> Callable:
    """`embed()` for `relabel_stage1`: read the image and run the SAM encoder as the label pipeline does."""

    def embed():
        t0 = time.perf_counter()
        image = load_image(entry.path)
        timings["decode"] += time.perf_counter() - t0
        if tuple(image.shape[:2]) != tuple(hw):
            raise RuntimeError(f"{entry.path} is {image.shape[1]}x{image.shape[0]} now, {hw[1]}x{hw[0]} when the "
                               "campaign was labelled")
        embed_many = getattr(sam, "embed_many", None)
        if embed_many is None:
            return sam.embed(image)
        prepare = getattr(sam, "prepare", None)
        return embed_many([image], [prepare(image)] if prepare is not None else None)[0]

    return embed


def relabel_shard(campaign: str, out: str, shard_id: int, device: str = "auto", *,
                  on_image: Callable[[int, int], None] | None = None) -> dict:
    """Relabel one shard of `campaign` into the planned campaign `out` (`plan_relabel`) and commit it; a no-op
    (`skipped`) when `out` has it done, `missing` when `campaign` has not committed it."""
    src, root = CampaignRoot(campaign), CampaignRoot(out)
    src_manifest, manifest = read_manifest(src), read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"no campaign at {out} (campaign.json missing): run plan_relabel first")
    out_hash = manifest.stage1_hash()
    base = {"shard_id": shard_id, "images": 0, "ok": 0, "failed": 0, "masks": 0, "new_sam_passes": 0,
            "seconds": 0.0, "skipped": False, "missing": False}
    marker, corrupt, done = committed_or_redo(root, shard_id, out_hash)
    if done:
        return {**base, "images": marker.images, "ok": marker.ok, "failed": marker.failed,
                "masks": marker.masks, "skipped": True}
    root.check_writable()
    t_start = time.perf_counter()
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    source = _source_shard(src, src_manifest, shard_id, campaign)
    if source is None:
        return {**base, "missing": True}
    src_marker, src_rows, store_files, store = source
    config = stage1_config_from_manifest(src_manifest)
    clip, sam = models_cache.get_models(src_manifest.preset, device, config.dense_mode)
    check_models(clip, sam, src_manifest, campaign, "relabel needs the same models")
    vocab = Vocabulary.from_json(manifest.vocabulary)
    text = models_cache.text_embeddings(clip, vocab, config.templates)
    entries = {e.image_id: e for e in read_shard(root, shard_id)}
    timings["read"] += time.perf_counter() - t_start
    if marker is not None or corrupt:
        uncommit(root, shard_id, expect=marker)

    from fmbseg.stage1 import relabel_stage1

    acc = ShardRows(vocab.names, keep=lambda kept: kept)  # arrays made at the commit, only for what changed
    fresh: set[str] = set()  # images that got their SAM pass now
    for row in src_rows:
        entry = entries.get(row["image_id"]) or ImageEntry(row["image_id"], row["path"])
        if row["status"] != "ok":  # no kept results: the failure stands (its kind is counted from C's marker)
            acc.rows.append({**row, "path": entry.path})
            acc.n_failed += 1
        else:
            hw = (int(row["height"]), int(row["width"]))
            try:
                t0 = time.perf_counter()
                kept = kept_from_arrays(store[row["image_id"]], sam, clip.device)
                timings["read"] += time.perf_counter() - t0
                result = relabel_stage1(kept, sam, text, config, manifest.seed, entry.image_id,
                                        _embedder(sam, entry, hw, timings))
                for k, v in result.timings.items():
                    timings[k] += v
                if kept.embedding is None and result.kept.embedding is not None:
                    fresh.add(entry.image_id)
                t1 = time.perf_counter()
                acc.add_ok(entry, hw, result.masks, result.selected, result.label, result.kept)
                timings["storage"] += time.perf_counter() - t1
            except ImageDecodeError as e:
                acc.add_failure(entry, str(e), e.kind, e.hw)
            except Exception as e:  # one image's failure must not stop the shard (as in label)
                acc.add_failure(entry, *failure_of(e, entry, shard_id), hw)
        if on_image is not None:
            on_image(acc.n_masks, acc.n_failed)
    t_store = time.perf_counter()
    reasons = Counter(src_marker.failure_reasons)
    reasons.update(r.pop("_kind") for r in acc.rows if "_kind" in r)
    names = list(vocab.names)
    if not fresh and acc.kept_ids == [r["image_id"] for r in src_rows if r["status"] == "ok"]:
        relabel_files = store_files  # the same arrays of the same images: the same bytes
    else:
        records = [kept_to_arrays(k, sam) if i in fresh else store[i] for i, k in zip(acc.kept_ids, acc.kept)]
        relabel_files = build_relabel_group(acc.kept_ids, records, shard_id)
    committed = commit_shard(root, shard_id, out_hash, images_table(acc.rows, names), masks_table(acc.cols, names),
                             acc.labels, failure_reasons=dict(reasons), seconds=time.perf_counter() - t_start,
                             code_version=fmbseg.__version__, relabel_files=relabel_files)
    timings["storage"] += time.perf_counter() - t_store
    return {**base, "images": committed.images, "ok": committed.ok, "failed": committed.failed,
            "masks": committed.masks, "new_sam_passes": len(fresh),
            "seconds": round(time.perf_counter() - t_start, 4), "timings": timings}


def run_relabel(cfg: RelabelConfig, progress: bool = True) -> dict:
    """Plan C2, then relabel every shard of C not yet done in C2; returns the run's summary."""
    from tqdm.auto import tqdm

    shard_ids = plan_relabel(cfg)
    t0 = time.perf_counter()
    bar = tqdm(total=len(shard_ids), unit="shard", desc="relabel", disable=not progress, dynamic_ncols=True)
    results = []
    try:
        for sid in shard_ids:
            results.append(relabel_shard(cfg.campaign, cfg.out, sid, cfg.device))
            bar.update(1)
    finally:
        bar.close()
    return summarize_relabel(cfg, results, time.perf_counter() - t0)


def summarize_relabel(cfg: RelabelConfig, results: list[dict], seconds: float) -> dict:
    """The run summary from the per-shard results of `relabel_shard`."""
    ran = [r for r in results if not r["skipped"] and not r["missing"]]
    timings = dict.fromkeys(TIMING_KEYS, 0.0)
    for r in ran:
        for k, v in r.get("timings", {}).items():
            timings[k] += v
    images = sum(r["images"] for r in ran)
    return {
        "campaign": cfg.campaign,
        "out": cfg.out,
        "shards": len(results),
        "shards_relabelled": len(ran),
        "shards_skipped": sum(r["skipped"] for r in results),
        "shards_missing": [r["shard_id"] for r in results if r["missing"]],
        "images": images,
        "ok": sum(r["ok"] for r in ran),
        "failed": sum(r["failed"] for r in ran),
        "masks": sum(r["masks"] for r in ran),
        "new_sam_passes": sum(r["new_sam_passes"] for r in ran),
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 3) if seconds > 0 and images else 0.0,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def format_relabel_summary(s: dict) -> str:
    """The one-screen summary `fmbseg relabel` prints."""
    lines = [
        f"relabel    {s['campaign']} -> {s['out']}",
        f"shards     {s['shards']}: {s['shards_relabelled']} relabelled, {s['shards_skipped']} already done",
        f"images     {s['images']} relabelled: {s['ok']} ok, {s['failed']} failed; {s['new_sam_passes']} needed a "
        "SAM encoder pass (nothing detected before, a class now)",
        f"masks      {s['masks']}",
        f"time       {s['seconds']:.1f} s ({s['images_per_s']:.2f} images/s)",
    ]
    if s["shards_missing"]:
        lines.append(f"missing    shards {s['shards_missing'][:10]} are not committed in {s['campaign']}: label them "
                     f"there first, or `fmbseg label --campaign {s['out']} ...` labels them in full")
    return "\n".join(lines)
