"""Benchmark Stage 1 at campaign level: where does a labelled image's time go?

Full-width `base` architectures (CLIP ViT-B/16, SAM ViT-B) with seeded random weights (no download needed; the
work per image is the real one, only the masks are meaningless), default Stage-1 settings, a few synthetic-world
images, through the real shard runner and storage. Prints the time split per image (decode, CLIP, SAM encoder,
SAM decoder, labeling/merge, storage) and the share of storage + bookkeeping (target < 10%).

    .venv/bin/python scripts/bench_stage1.py --images 3 --device auto
    .venv/bin/python scripts/bench_stage1.py --images 2 --points-per-side 16 --no-warmup   # a busy 2-core CPU

`--vs-stock` instead compares one image's Stage 1 (CPU, base architectures, random weights) with a plain stock
implementation of the same settings: `SamAutomaticMaskGenerator(crop_n_layers=0)` + `SamPredictor` (each encoding
the image) + open_clip called once per crop, then the same pooling and merge. Runs are interleaved (ours, stock,
ours, ...) and the median of `--repeats` is reported, with the share of each item of issue 9 (fused encoder
attention; the leaner automatic-mask decoder) measured by switching it off in extra interleaved runs:

    .venv/bin/python scripts/bench_stage1.py --vs-stock --repeats 3 --points-per-side 16 --size 480 640
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmbseg.device import resolve_device  # noqa: E402
from fmbseg.presets import make_clip, make_sam  # noqa: E402
from fmbseg.testing.world import write_world  # noqa: E402
from stages import models_cache  # noqa: E402
from stages.label import LabelConfig, run_label  # noqa: E402


def _legacy_generate(sam, emb, cfg, points_per_batch=64):
    """The automatic-mask path as it was before issue 9 item 3 (the stock generator's structure on our
    embedding): every batch decoded through MaskDecoder.forward (image embedding repeated per prompt), all 3B
    candidates upsampled to full size in float32, then the IoU filter. Same outputs, for timing only."""
    from segment_anything.utils.amg import batch_iterator, batched_mask_to_box, calculate_stability_score
    from torchvision.ops import batched_nms

    from fmbseg.models.sam_automask import grid_points

    h, w = emb.original_hw
    pts_all = sam.transform.apply_coords(grid_points(cfg.points_per_side, (h, w)), (h, w))
    kept = []
    with torch.no_grad():
        for (pts,) in batch_iterator(points_per_batch, pts_all):
            coords = torch.as_tensor(pts[:, None, :])
            sparse, dense = sam.sam.prompt_encoder(points=(coords, torch.ones(coords.shape[:2], dtype=torch.int)),
                                                   boxes=None, masks=None)
            low, iou = sam.sam.mask_decoder(image_embeddings=emb.features, image_pe=sam.sam.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=True)
            logits = sam.sam.postprocess_masks(low, emb.input_hw, emb.original_hw).flatten(0, 1)
            iou = iou.flatten(0, 1)
            keep = iou > cfg.pred_iou_thresh
            logits, iou = logits[keep], iou[keep]
            stab = calculate_stability_score(logits, 0.0, cfg.stability_score_offset)
            keep = stab >= cfg.stability_score_thresh
            masks = logits[keep] > 0
            if len(masks):
                kept.append((batched_mask_to_box(masks).float(), iou[keep], np.packbits(masks.flatten(1).numpy(), 1)))
    if kept:
        boxes, ious = torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])
        batched_nms(boxes, ious, torch.zeros(len(boxes), dtype=torch.long), cfg.box_nms_thresh)


def vs_stock(args) -> int:
    """Interleaved timing of our Stage 1 vs a plain stock implementation on one image (see module docstring)."""
    import statistics

    import torch.nn.functional as F

    from fmbseg.models.sliding import sliding_window_features
    from fmbseg.pooling import mask_pool
    from fmbseg.stage1 import Stage1Config, merge_label_map, run_stage1, select_masks
    from fmbseg.testing.world import make_world_image

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    clip = make_clip("base", device, random_init=True)
    sam = make_sam("base", device, random_init=True)  # fused attention (default)
    sam_plain = make_sam("base", device, random_init=True, fused_attention=False)  # stock attention, same weights
    image, _ = make_world_image(np.random.default_rng(0), *args.size)
    text = clip.encode_text([f"class {i}" for i in range(8)])
    # Equal settings on both sides; the filters are lowered so random weights leave masks to pool and merge.
    cfg = Stage1Config(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                       stability_score_thresh=args.stability_score_thresh, point_outputs="multimask",
                       min_area_frac=0.0, max_area_frac=1.0)
    amc = cfg.auto_mask_config()

    def ours():
        run_stage1(image, clip, sam, text, cfg, seed=0, image_id="bench")

    def stock():
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor

        # open_clip once per crop (batch 1), the same crops and dense path.
        sf = sliding_window_features(clip, image, cfg.upscale, cfg.max_side, 1)
        t = F.normalize(text.float(), dim=-1)
        votes = torch.bincount((sf.crop_cls @ t.T).argmax(1), minlength=len(t))
        detected = torch.nonzero(votes >= 1).flatten().tolist()
        dense = sf.dense.reshape(-1, sf.dense.shape[-1])
        top = (dense @ t[detected].T).topk(cfg.points_per_class, dim=0).indices.T.numpy()
        points = sf.cell_centres().reshape(-1, 2)[top]
        predictor = SamPredictor(sam_plain.sam)
        predictor.set_image(image)  # encoder pass 1
        masks11 = []
        for p in points:  # one predict call per class, as a user of SamPredictor writes it
            m, s, _ = predictor.predict(point_coords=p - 0.5, point_labels=np.ones(len(p)), multimask_output=True)
            masks11.append(m[s.argmax()])
        gen = SamAutomaticMaskGenerator(sam_plain.sam, points_per_side=cfg.points_per_side, points_per_batch=64,
                                        pred_iou_thresh=cfg.pred_iou_thresh,
                                        stability_score_thresh=cfg.stability_score_thresh,
                                        box_nms_thresh=cfg.box_nms_thresh, crop_n_layers=0,
                                        output_mode="binary_mask")
        autos = [a["segmentation"] for a in gen.generate(image)]  # encoder pass 2
        stack = np.stack(masks11 + autos)
        pooled = F.normalize(mask_pool(stack, sf.dense, sf.cell_size_xy).double(), dim=-1)
        cos = (pooled @ t.double().T).float().numpy()
        masks = [type("M", (), {"score": float(cos[i].max()), "class_id": int(cos[i].argmax()), "mask": m})()
                 for i, m in enumerate(stack)]
        sel = select_masks(["1.1"] * len(masks11) + ["1.2"] * len(autos), cfg.stage12_fraction, 0, "bench")
        merge_label_map(masks, sel, *image.shape[:2])

    emb_plain = sam_plain.embed(image)
    parts = {
        "ours (Stage 1)": ours,
        "stock (Stage 1)": stock,
        "encoder, fused attention": lambda: sam.embed(image),
        "encoder, stock attention": lambda: sam_plain.embed(image),
        "AMG, lean decoder": lambda: sam.generate(emb_plain, amc),
        "AMG, before (stock structure)": lambda: _legacy_generate(sam_plain, emb_plain, amc),
    }
    if not args.no_warmup:
        for fn in parts.values():
            fn()
    times = {k: [] for k in parts}
    for r in range(args.repeats):
        for name, fn in parts.items():  # interleaved: every round runs every variant once
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nCPU, {args.threads} thread(s), base architectures (random weights), image {args.size[0]}x{args.size[1]}, "
          f"points_per_side {args.points_per_side}, median of {args.repeats} interleaved runs "
          f"(a shared machine: other processes load the CPU, so compare ratios, not seconds)")
    for k, v in med.items():
        print(f"  {k:32s} {v:8.2f} s")
    enc_gain = med["encoder, stock attention"] - med["encoder, fused attention"]
    amg_gain = med["AMG, before (stock structure)"] - med["AMG, lean decoder"]
    print(f"\nfused encoder attention: {med['encoder, stock attention'] / med['encoder, fused attention']:.2f}x on the "
          f"encoder, saves {enc_gain:.2f} s per image")
    print(f"lean automatic-mask decoder: {med['AMG, before (stock structure)'] / med['AMG, lean decoder']:.2f}x on AMG, "
          f"saves {amg_gain:.2f} s per image")
    print(f"one SAM embedding instead of two (structural): saves one encoder pass, {med['encoder, fused attention']:.2f} s")
    print(f"\nstock / ours: {med['stock (Stage 1)'] / med['ours (Stage 1)']:.2f}x (target >= 1.7x)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vs-stock", action="store_true", help="time one image vs a plain stock implementation")
    ap.add_argument("--repeats", type=int, default=3, help="--vs-stock: interleaved rounds (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="--vs-stock: torch threads")
    ap.add_argument("--pred-iou-thresh", type=float, default=0.0, help="--vs-stock: both sides")
    ap.add_argument("--stability-score-thresh", type=float, default=0.0, help="--vs-stock: both sides")
    ap.add_argument("--images", type=int, default=3, help="number of world images (default 3)")
    ap.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"), help="image size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--points-per-side", type=int, default=32, help="Stage-1.2 grid (default 32, DESIGN §1)")
    ap.add_argument("--keep-filters", action="store_true",
                    help="keep the default IoU/stability filters (random weights then leave few masks to store; "
                         "by default the filters are set to 0 so storage handles a realistic number of masks)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the one-image warm-up campaign")
    ap.add_argument("--workdir", help="keep the world and campaign here (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.vs_stock:
        return vs_stock(args)

    device = resolve_device(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fmbseg-bench-"))
    try:
        write_world(work / "world", args.images, seed=0, sizes=(tuple(args.size),), formats=("jpg", "png"))
        write_world(work / "warm", 1, seed=1, sizes=(tuple(args.size),))
        t = time.perf_counter()
        clip = make_clip("base", device, random_init=True)
        sam = make_sam("base", device, random_init=True)
        print(f"built {clip.model_id} + {sam.model_id} (random init) on {device} in {time.perf_counter() - t:.1f} s")
        models_cache.register_models("base", device, clip, sam)
        stage1 = {"points_per_side": args.points_per_side}
        if not args.keep_filters:
            stage1.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
        cfg = LabelConfig(images=str(work / "world" / "images"), vocab=str(work / "world" / "classes.txt"),
                          campaign=str(work / "campaign"), preset="base", shard_size=args.shard_size,
                          device=str(device), stage1=stage1)
        # Warm-up on a throwaway one-image campaign (first-call allocations, lazy inits), then the measured run.
        if not args.no_warmup:
            run_label(LabelConfig(**{**cfg.__dict__, "images": str(work / "warm" / "images"),
                                     "campaign": str(work / "warmup")}), progress=False)
        t = time.perf_counter()
        s = run_label(cfg, progress=False)
        wall = time.perf_counter() - t
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    n = max(s["images"], 1)
    tm = dict(s["timings"])
    bookkeeping = max(wall - sum(tm.values()), 0.0)  # planning, campaign.json, done checks, progress
    rows = [("decode", tm["decode"]), ("CLIP (crops + dense)", tm["clip"]), ("SAM encoder", tm["sam_encoder"]),
            ("SAM decoder (1.1 points + 1.2 auto)", tm["sam_decoder"]), ("labeling / merge", tm["labeling"]),
            ("storage (RLE, Parquet, Zarr, marker)", tm["storage"]), ("bookkeeping (plan, manifest, checks)", bookkeeping)]
    print(f"\n{s['images']} images {args.size[0]}x{args.size[1]}, {s['masks']} masks, "
          f"points_per_side={args.points_per_side}, filters {'default' if args.keep_filters else 'at 0'}, "
          f"device {device}, wall {wall:.2f} s")
    print(f"{'step':40} {'s/image':>9} {'share':>7}")
    for name, v in rows:
        print(f"{name:40} {v / n:9.3f} {100 * v / wall:6.1f}%")
    print(f"{'total':40} {wall / n:9.3f} {100.0:6.1f}%")
    share = 100 * (tm["storage"] + bookkeeping) / wall
    print(f"\nstorage + bookkeeping: {share:.1f}% of the total (target < 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
