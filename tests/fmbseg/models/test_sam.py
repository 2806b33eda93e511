"""The segment_anything adapter: one encoder pass per image, batched point prompts, automatic masks from the
precomputed embedding, and the coordinate convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmbseg.models.base import AutoMask, AutoMaskConfig, SamModel
from fmbseg.models.sam_automask import grid_points, packbits_rows
from fmbseg.presets import make_sam, stage1_overrides

TINY_AUTO = AutoMaskConfig(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area_frac=0.0)


@pytest.fixture(scope="module")
def sam():
    return make_sam("tiny", device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = np.full((61, 97, 3), 30, dtype=np.uint8)
    img[10:40, 20:60] = (220, 40, 40)
    img[45:58, 70:95] = (40, 70, 210)
    return np.clip(img + rng.integers(0, 10, img.shape), 0, 255).astype(np.uint8)


class _Counter:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def test_one_encoder_pass_serves_point_prompts_and_automatic_masks(sam, image):
    encoder = _Counter(sam.sam.image_encoder)
    # output_upscaling runs once per decoder call, whichever entry point (forward, predict_masks) is used.
    decoder = _Counter(sam.sam.mask_decoder.output_upscaling)
    try:
        emb = sam.embed(image)
        points = np.array([[[30.5, 20.5], [40.0, 25.0]], [[80.0, 50.0], [90.0, 52.0]], [[5.0, 5.0], [6.0, 6.0]]])
        masks, iou = sam.predict_points(emb, points)
        decoder_after_points = decoder.calls
        auto = sam.generate(emb, TINY_AUTO)
    finally:
        encoder.handle.remove()
        decoder.handle.remove()
    print(f"\nimage-encoder calls: {encoder.calls}; decoder calls: {decoder_after_points} for 3 prompt sets, "
          f"{decoder.calls - decoder_after_points} for 64 grid points at 64 per batch; {len(auto)} automatic masks")
    assert encoder.calls == 1
    assert decoder_after_points == 1  # all N prompt sets in one decoder call
    assert decoder.calls - decoder_after_points == 1
    assert masks.shape == (3, 3, 61, 97) and masks.dtype == bool
    assert iou.shape == (3, 3) and iou.dtype == np.float32
    assert all(isinstance(m, AutoMask) and m.segmentation.shape == (61, 97) and m.segmentation.dtype == bool
               for m in auto)
    assert len(auto) >= 1


def test_adapter_satisfies_protocol_and_embeds_like_sampredictor(sam, image):
    from segment_anything import SamPredictor

    assert isinstance(sam, SamModel) and sam.image_size == 256
    emb = sam.embed(image)
    assert emb.original_hw == (61, 97) and emb.input_hw == (161, 256)
    predictor = SamPredictor(sam.sam)
    predictor.set_image(image)
    assert torch.allclose(emb.features, predictor.features, atol=1e-6)


def test_batched_prompts_equal_one_by_one_stock_predictions(sam, image):
    """Our continuous (x, y) points map to SAM's pixel-index frame as apply_coords(p) - 0.5."""
    from segment_anything import SamPredictor

    emb = sam.embed(image)
    points = np.array([[[30.5, 20.5], [40.0, 25.0]], [[80.0, 50.0], [90.0, 52.0]]])
    masks, iou = sam.predict_points(emb, points)
    predictor = SamPredictor(sam.sam)
    predictor.set_image(image)
    for k in range(2):
        sam_frame = predictor.transform.apply_coords(points[k], (61, 97)) - 0.5
        coords = torch.as_tensor(sam_frame, dtype=torch.float32)[None]
        ref_masks, ref_iou, _ = predictor.predict_torch(coords, torch.ones(1, 2, dtype=torch.int))
        assert np.array_equal(masks[k], ref_masks[0].numpy())
        assert np.allclose(iou[k], ref_iou[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("outputs", ["all4", "multimask", "single"])
def test_point_outputs_are_stock_single_and_multimask_outputs_of_one_call(sam, image, outputs):
    """all4 = [token 0 (stock multimask_output=False), tokens 1-3 (stock multimask_output=True)] in ONE call."""
    from segment_anything import SamPredictor

    emb = sam.embed(image)
    points = np.array([[[30.5, 20.5], [40.0, 25.0], [45.0, 30.0]], [[80.0, 50.0], [90.0, 52.0], [75.0, 47.0]]])
    upscaling = _Counter(sam.sam.mask_decoder.output_upscaling)
    try:
        masks, iou = sam.predict_points(emb, points, outputs)
    finally:
        upscaling.handle.remove()
    assert upscaling.calls == 1
    m = {"all4": 4, "multimask": 3, "single": 1}[outputs]
    assert masks.shape == (2, m, 61, 97) and iou.shape == (2, m) and iou.dtype == np.float32
    predictor = SamPredictor(sam.sam)
    predictor.set_image(image)
    coords = torch.as_tensor(sam.to_model_coords(points, (61, 97)), dtype=torch.float32)
    labels = torch.ones(2, 3, dtype=torch.int)
    single, single_iou, _ = predictor.predict_torch(coords, labels, multimask_output=False)
    multi, multi_iou, _ = predictor.predict_torch(coords, labels, multimask_output=True)
    ref = {"all4": (torch.cat([single, multi], 1), torch.cat([single_iou, multi_iou], 1)),
           "multimask": (multi, multi_iou), "single": (single, single_iou)}[outputs]
    assert np.array_equal(masks, ref[0].numpy())
    assert np.allclose(iou, ref[1].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="outputs must be one of"):
        sam.predict_points(emb, points, "best")


def test_coordinate_mapping_hand_computed(sam):
    # 97 px wide -> 256: scale 256/97 along x; 61 -> 161 rows: scale 161/61 along y.
    got = sam.to_model_coords(np.array([[0.5, 0.5], [97.0, 61.0]]), (61, 97))
    want = np.array([[0.5 * 256 / 97 - 0.5, 0.5 * 161 / 61 - 0.5], [256 - 0.5, 161 - 0.5]])
    assert np.allclose(got, want)
    grid = grid_points(2, (61, 97))  # cell centres of a 2x2 grid, (x, y)
    assert np.allclose(grid, [[24.25, 15.25], [72.75, 15.25], [24.25, 45.75], [72.75, 45.75]])


def test_automatic_masks_respect_filters_and_order(sam, image):
    from torchvision.ops import box_iou

    from segment_anything.utils.amg import batched_mask_to_box

    emb = sam.embed(image)
    everything = sam.generate(emb, AutoMaskConfig(points_per_side=8, pred_iou_thresh=0, stability_score_thresh=0,
                                                  min_area_frac=0, max_area_frac=1, box_nms_thresh=1.0))
    areas = np.array([m.segmentation.sum() for m in everything])
    assert len(everything) > 1 and (areas > 0).all()
    ious = [m.predicted_iou for m in everything]
    assert ious == sorted(ious, reverse=True)

    lo, hi = np.quantile(areas, [0.25, 0.75]) / (61 * 97)
    cfg = AutoMaskConfig(points_per_side=8, pred_iou_thresh=0, stability_score_thresh=0,
                         min_area_frac=float(lo), max_area_frac=float(hi), box_nms_thresh=0.5)
    kept = sam.generate(emb, cfg)
    kept_areas = np.array([m.segmentation.sum() for m in kept])
    assert ((kept_areas >= lo * 61 * 97) & (kept_areas <= hi * 61 * 97)).all()
    if len(kept) > 1:
        boxes = batched_mask_to_box(torch.as_tensor(np.stack([m.segmentation for m in kept]))).float()
        overlap = box_iou(boxes, boxes).fill_diagonal_(0)
        assert overlap.max() <= 0.5 + 1e-6

    strict = sam.generate(emb, AutoMaskConfig(points_per_side=8, pred_iou_thresh=0.99, stability_score_thresh=0.0,
                                              min_area_frac=0.0))
    assert all(m.predicted_iou > 0.99 for m in strict)


def test_tiny_preset_overrides_are_automask_fields():
    over = stage1_overrides("tiny")
    assert over == {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "min_area_frac": 0.0}
    assert AutoMaskConfig(**over) == TINY_AUTO


def test_bad_inputs_are_refused(sam, image):
    with pytest.raises(ValueError, match="uint8"):
        sam.embed(image.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        sam.embed(image[..., 0])
    emb = sam.embed(image)
    with pytest.raises(ValueError, match=r"\(N, n, 2\)"):
        sam.predict_points(emb, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        sam.predict_points(emb, np.full((1, 1, 2), np.nan))
    masks, iou = sam.predict_points(emb, np.zeros((0, 5, 2)))
    assert masks.shape == (0, 3, 61, 97) and iou.shape == (0, 3)
    masks, iou = sam.predict_points(emb, np.zeros((0, 5, 2)), "all4")
    assert masks.shape == (0, 4, 61, 97) and iou.shape == (0, 4)
    with pytest.raises(ValueError, match="min_area_frac"):
        sam.generate(emb, AutoMaskConfig(min_area_frac=0.5, max_area_frac=0.1))
    from fmbseg.models.base import SamEmbedding

    with pytest.raises(TypeError, match="not made by"):
        sam.predict_points(SamEmbedding((61, 97), (61, 97), image), np.zeros((1, 1, 2)))


def test_bf16_autocast_path_matches_float32(sam, image, monkeypatch):
    """CUDA runs under bf16 autocast; exercise the same code on the CPU's bf16 autocast."""
    import fmbseg.models.sam as sam_module

    points = np.array([[[30.5, 20.5]], [[80.0, 50.0]]])
    emb32 = sam.embed(image)
    logits32, iou32 = sam.decode(emb32, points)
    monkeypatch.setattr(sam_module, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    emb16 = sam.embed(image)
    logits16, iou16 = sam.decode(emb16, points)
    assert emb16.features.dtype == logits16.dtype == iou16.dtype == torch.float32
    agree = ((logits16 > 0) == (logits32 > 0)).float().mean().item()
    print(f"\nbf16 vs fp32: mask agreement {agree:.4f}, max |iou diff| {(iou16 - iou32).abs().max():.4f}")
    assert agree > 0.95
    assert len(sam.generate(emb16, TINY_AUTO)) >= 1


def test_packbits_rows_equals_numpy_packbits():
    """The automatic-mask survivors are bit-packed on the device before the copy to the host: the same bytes as
    `np.packbits` of the copied masks, rows whose length is not a multiple of 8 included."""
    rng = np.random.default_rng(0)
    for n, length in [(0, 5), (1, 1), (3, 7), (5, 8), (4, 17), (2, 1001), (3, 64 * 48)]:
        m = rng.random((n, length)) < rng.random()
        got = packbits_rows(torch.from_numpy(m), torch_ops=True)  # the device path (CUDA default)
        assert got.dtype == np.uint8 and np.array_equal(got, np.packbits(m, axis=1)), (n, length)
