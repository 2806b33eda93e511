"""Counted FLOPs per labeled image: this project's Stage-1 structure vs the stock structure vs the structural minimum.

Counted by `torch.utils.flop_counter.FlopCounterMode` on meta tensors (no memory, no weights, deterministic; it
counts matmuls, convolutions and attention, not elementwise ops or interpolation) through the project's own
adapters (`OpenClipModel.encode_crops`, SAM's image encoder, `SegmentAnythingModel.decode`), per architecture of
the `paper` and `base` presets, at one image size with Stage-1's defaults.

Structures (per image; n_crops from the real sliding-window layout, P = points_per_side² automatic prompts, C
detected classes with points_per_class points each):
- project: every crop once through `encode_crops` (CLS and dense features from one pass), ONE SAM encoding shared
  by 1.1 and 1.2, the decoder as the adapter calls it (the 1.1 call, then P prompts in points_per_batch batches);
- stock: open_clip per crop twice (`encode_image` for the CLS votes, a separate dense MaskCLIP forward for the
  features), SamPredictor.set_image for 1.1 and SamAutomaticMaskGenerator's own set_image for 1.2 (two
  encodings), the same decoder calls (one per AMG batch: the decoder's FLOPs are linear in the prompts);
- minimum: each crop once, one encoding, the decoder once per prompt with its prompt-independent first-layer
  image-side projections (k/v of the first token-to-image attention) computed once per image.

    python scripts/bench_flops.py                      # 480x640, both presets
    python scripts/bench_flops.py --size 1024 1024 --points-per-side 16
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fmbseg.models.base import SamEmbedding  # noqa: E402
from fmbseg.models.sliding import crop_offsets, upscaled_size  # noqa: E402
from fmbseg.stage1 import Stage1Config  # noqa: E402

META = torch.device("meta")
# The first-layer image-side projections every prompt recomputes (identical for all prompts of an image).
# Module-name suffixes (the counter names modules from the outermost one called: `mask_decoder.transformer...` or
# `TwoWayTransformer...` depending on the entry point).
PROMPT_INDEPENDENT = ("layers.0.cross_attn_token_to_image.k_proj",
                      "layers.0.cross_attn_token_to_image.v_proj")


def _count(fn) -> tuple[int, dict[str, int]]:
    """FLOPs of fn() and per-module totals (module paths as FlopCounterMode names them)."""
    import torch.fx.experimental._config as fx_config

    # The prompt encoder's boolean-mask writes (labels == 1) need nonzero() on meta tensors; their FLOPs are nil.
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True), FlopCounterMode(display=False) as fc:
        fn()
    per_module = {k: int(sum(v.values())) for k, v in fc.get_flop_counts().items()}
    return int(fc.get_total_flops()), per_module


@dataclass
class Counts:
    """FLOPs of one image's parts: CLIP per crop (project's pass / stock's CLS-only pass), SAM encoder, decoder per
    prompt (one point / the 1.1 points), and the decoder's prompt-independent share."""

    clip_crop: int
    clip_cls_only: int
    n_crops: int
    sam_encoder: int
    decoder_auto_batch: int  # one decode call of points_per_batch single-point prompts
    decoder_points_call: int  # the 1.1 call: C prompts of points_per_class points
    decoder_independent: int  # per prompt: the first-layer image-side k/v projections


def count_parts(preset: str, hw: tuple[int, int], cfg: Stage1Config, n_classes: int) -> Counts:
    from fmbseg.models.clip import OpenClipModel
    from fmbseg.models.registry import build
    from fmbseg.models.sam import SegmentAnythingModel
    from fmbseg.presets import get_preset

    p = get_preset(preset)
    with torch.device(META):
        clip_module = build("clip", p.clip.arch)
        sam_module = build("sam", p.sam.arch)
    clip = OpenClipModel(clip_module, f"{preset}-clip", META)
    sam = SegmentAnythingModel(sam_module, f"{preset}-sam", META)
    S, P = clip.input_size, clip.patch_size
    Hu, Wu = upscaled_size(*hw, S, P, cfg.upscale, cfg.max_side)
    n_crops = len(crop_offsets(Hu, S, P)) * len(crop_offsets(Wu, S, P))
    crop = torch.empty(1, 3, S, S, device=META)
    clip_crop, _ = _count(lambda: clip.encode_crops(crop))
    clip_cls, _ = _count(lambda: clip.model.encode_image(clip._normalise(crop)))
    enc, _ = _count(lambda: sam.sam.image_encoder(torch.empty(1, 3, sam.image_size, sam.image_size, device=META)))

    gh, gw = sam.sam.prompt_encoder.image_embedding_size
    emb = SamEmbedding(original_hw=hw, input_hw=tuple(sam.transform.get_preprocess_shape(*hw, sam.image_size)),
                       features=torch.empty(1, sam.sam.prompt_encoder.embed_dim, gh, gw, device=META))
    H, W = hw
    rng = np.random.default_rng(0)  # coordinates do not change FLOPs; any in-image points do
    auto_pts = rng.uniform(0, 1, (cfg.points_per_batch, 1, 2)) * [W, H]
    cls_pts = rng.uniform(0, 1, (n_classes, cfg.points_per_class, 2)) * [W, H]
    dec_auto, _ = _count(lambda: sam.decode(emb, auto_pts))
    dec_pts, _ = _count(lambda: sam.decode(emb, cls_pts))
    _, per_module = _count(lambda: sam.decode(emb, auto_pts[:1]))
    indep = sum(v for k, v in per_module.items() if k.endswith(PROMPT_INDEPENDENT))
    return Counts(clip_crop, clip_cls, n_crops, enc, dec_auto, dec_pts, indep)


def structures(c: Counts, cfg: Stage1Config, n_classes: int) -> dict[str, dict[str, float]]:
    """FLOPs per image of each structure, split into CLIP, SAM encoder, decoder."""
    n_auto = cfg.points_per_side ** 2
    n_batches = -(-n_auto // cfg.points_per_batch)
    decoder = c.decoder_points_call + n_batches * c.decoder_auto_batch * (
        1.0 if n_auto % cfg.points_per_batch == 0 else n_auto / (n_batches * cfg.points_per_batch))
    prompts = n_auto + n_classes
    return {
        "project": {"clip": c.n_crops * c.clip_crop, "sam_encoder": c.sam_encoder, "decoder": decoder},
        "stock": {"clip": c.n_crops * (c.clip_cls_only + c.clip_crop), "sam_encoder": 2 * c.sam_encoder,
                  "decoder": decoder},
        "minimum": {"clip": c.n_crops * c.clip_crop, "sam_encoder": c.sam_encoder,
                    "decoder": decoder - (prompts - 1) * c.decoder_independent},
    }


def flops_per_image(preset: str, hw: tuple[int, int] = (480, 640), cfg: Stage1Config | None = None,
                    n_classes: int = 8) -> dict[str, dict[str, float]]:
    """{structure: {part: FLOPs}} for one labeled image of `preset` (used by bench_gpu.py for the FLOP ideal)."""
    cfg = cfg or Stage1Config()
    return structures(count_parts(preset, hw, cfg, n_classes), cfg, n_classes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["paper", "base"])
    ap.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--classes", type=int, default=8, help="detected classes per image (1.1 prompts; default 8)")
    args = ap.parse_args(argv)
    cfg = Stage1Config(points_per_side=args.points_per_side)
    hw = tuple(args.size)
    print(f"FLOPs per labeled image, {hw[0]}x{hw[1]}, points_per_side={cfg.points_per_side}, "
          f"points_per_batch={cfg.points_per_batch}, {args.classes} detected classes (TFLOP)")
    print(f"{'preset':7} {'structure':9} {'CLIP':>8} {'SAM enc':>8} {'decoder':>8} {'total':>8} {'÷ stock':>8} "
          f"{'÷ min':>7}")
    ok = True
    for preset in args.presets:
        c = count_parts(preset, hw, cfg, args.classes)
        s = structures(c, cfg, args.classes)
        tot = {k: sum(v.values()) for k, v in s.items()}
        for name, parts in s.items():
            print(f"{preset:7} {name:9} {parts['clip'] / 1e12:8.2f} {parts['sam_encoder'] / 1e12:8.2f} "
                  f"{parts['decoder'] / 1e12:8.3f} {tot[name] / 1e12:8.2f} {tot[name] / tot['stock']:8.3f} "
                  f"{tot[name] / tot['minimum']:7.3f}")
        r_stock, r_min = tot["project"] / tot["stock"], tot["project"] / tot["minimum"]
        ok &= r_stock <= 0.55 and r_min <= 1.1
        print(f"{'':7} {c.n_crops} crops; decoder per prompt {c.decoder_auto_batch / cfg.points_per_batch / 1e9:.2f} "
              f"GFLOP of which {c.decoder_independent / 1e9:.2f} prompt-independent; project/stock {r_stock:.3f} "
              f"(target <= 0.55), project/minimum {r_min:.3f} (target <= 1.1)")
    print("targets met" if ok else "targets NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
