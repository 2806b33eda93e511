"""The SAM adapter against stock segment_anything, run side by side on the same weights and image: automatic
masks bit-identical to `SamAutomaticMaskGenerator(crop_n_layers=0)`, the decode batch changing nothing, and the
fused encoder attention equal to the explicit one."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fmbseg.models.base import AutoMaskConfig
from fmbseg.presets import make_sam


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((61, 97, 3), 30, dtype=np.uint8)
    img[10:40, 20:60] = (220, 40, 40)
    img[45:58, 70:95] = (40, 70, 210)
    return np.clip(img + rng.integers(0, 10, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sharp_tiny():
    """Seeded tiny SAM with stock attention; the hypernetwork outputs scaled x40 so that random-weight logits
    leave the (-1, 1) band and stability scores spread over [0, 0.8] (same weights on both sides)."""
    sam = make_sam("tiny", device="cpu", fused_attention=False)
    with torch.no_grad():
        for mlp in sam.sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40.0)
            mlp.layers[-1].bias.mul_(40.0)
    return sam


def _stock(sam, image, cfg: AutoMaskConfig, points_per_batch=64):
    from segment_anything import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(
        sam.sam, points_per_side=cfg.points_per_side, points_per_batch=points_per_batch,
        pred_iou_thresh=cfg.pred_iou_thresh, stability_score_thresh=cfg.stability_score_thresh,
        stability_score_offset=cfg.stability_score_offset, box_nms_thresh=cfg.box_nms_thresh, crop_n_layers=0,
        min_mask_region_area=0, output_mode="binary_mask")
    return gen.generate(image)


def _assert_bit_identical(ours, stock):
    assert len(ours) == len(stock)
    for a, b in zip(ours, stock):
        assert np.array_equal(a.segmentation, b["segmentation"])
        assert a.predicted_iou == b["predicted_iou"]  # exact float equality
        assert a.stability_score == b["stability_score"]
        ys, xs = np.nonzero(a.segmentation)
        assert [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()] == b["bbox"]


@pytest.mark.parametrize("nms", [1.0, 0.7])
def test_automatic_masks_bit_identical_to_stock_generator(sharp_tiny, one_torch_thread, nms):
    image = _image()
    # No area filter; thresholds lowered (random weights) but > 0, so both filters run and tens of masks survive.
    cfg = AutoMaskConfig(points_per_side=12, pred_iou_thresh=0.01, stability_score_thresh=0.1,
                         box_nms_thresh=nms, min_area_frac=0.0, max_area_frac=1.0)
    emb = sharp_tiny.embed(image)
    ours = sharp_tiny.generate(emb, cfg)
    stock = _stock(sharp_tiny, image, cfg)
    print(f"\nbox_nms_thresh {nms}: {len(ours)} masks, stock {len(stock)}")
    if nms == 1.0:
        assert len(stock) >= 20
    _assert_bit_identical(ours, stock)


def test_decode_batch_is_an_execution_setting_that_changes_no_output(sharp_tiny, one_torch_thread):
    """points_per_batch (SegmentAnythingModel's, chosen per device) is not part of the campaign config: masks,
    scores and order are the same bits for batches of 1 point, a ragged 7, the CPU default and everything at
    once."""
    image = _image()
    cfg = AutoMaskConfig(points_per_side=8, pred_iou_thresh=0.01, stability_score_thresh=0.1,
                         box_nms_thresh=1.0, min_area_frac=0.0, max_area_frac=1.0)
    emb = sharp_tiny.embed(image)
    default = sharp_tiny.points_per_batch
    try:
        runs = {}
        for b in (1, 7, 16, 64, 1024):
            sharp_tiny.points_per_batch = b
            runs[b] = sharp_tiny.generate(emb, cfg)
    finally:
        sharp_tiny.points_per_batch = default
    assert default == 64 and len(runs[64]) >= 5
    for b, masks in runs.items():
        assert [(m.predicted_iou, m.stability_score) for m in masks] == \
            [(m.predicted_iou, m.stability_score) for m in runs[64]], b
        assert all(np.array_equal(m.segmentation, r.segmentation) for m, r in zip(masks, runs[64])), b


def _random_rel_pos(encoder: torch.nn.Module, seed: int) -> None:
    # Released checkpoints have learned tables; random init leaves them at zero, which would hide the bias path.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in encoder.blocks:
            blk.attn.rel_pos_h.copy_(torch.randn(blk.attn.rel_pos_h.shape, generator=g) * 0.5)
            blk.attn.rel_pos_w.copy_(torch.randn(blk.attn.rel_pos_w.shape, generator=g) * 0.5)


def test_fused_attention_equals_stock_encoder_on_tiny(one_torch_thread):
    from fmbseg.models.sam_attention import FusedRelPosAttention

    stock, fused = make_sam("tiny", "cpu", fused_attention=False), make_sam("tiny", "cpu")
    assert fused.fused_attention and all(isinstance(b.attn, FusedRelPosAttention) for b in fused.sam.image_encoder.blocks)
    assert not any(isinstance(b.attn, FusedRelPosAttention) for b in stock.sam.image_encoder.blocks)
    assert stock.sam.state_dict().keys() == fused.sam.state_dict().keys()
    for sam in (stock, fused):
        _random_rel_pos(sam.sam.image_encoder, 1)
    image = _image()
    a, b = stock.embed(image).features, fused.embed(image).features
    print(f"\ntiny encoder, fused vs stock attention: max |diff| {(a - b).abs().max():.2e} (features std {a.std():.3f})")
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [14, 0])  # a windowed block (14x14) and a global one
def test_fused_attention_equals_stock_on_vit_b_blocks(window, one_torch_thread):
    """Seeded encoder blocks at ViT-B width (768 dims, 12 heads, relative-position tables sized for the 64x64
    token grid of a 1024 px input): fused and explicit attention within 1e-5 in float32. The token grid is 28x28 so
    the global block also exercises the tables' interpolation; the whole 1024 px encoder runs in the benchmark."""
    from functools import partial

    from segment_anything.modeling.image_encoder import Attention, Block

    from fmbseg.models.sam_attention import FusedRelPosAttention

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        blk = Block(dim=768, num_heads=12, mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                    use_rel_pos=True, window_size=window, input_size=(14, 14) if window else (64, 64)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        blk.attn.rel_pos_h.copy_(torch.randn(blk.attn.rel_pos_h.shape, generator=g) * 0.5)
        blk.attn.rel_pos_w.copy_(torch.randn(blk.attn.rel_pos_w.shape, generator=g) * 0.5)
        x = torch.randn(1, 28, 28, 768, generator=g)
        ref = blk(x)
        blk.attn.__class__ = FusedRelPosAttention
        got = blk(x)
        blk.attn.__class__ = Attention
    print(f"\nViT-B-width block, window {window}: max |diff| {(ref - got).abs().max():.2e}")
    assert torch.allclose(ref, got, rtol=0, atol=1e-5)
