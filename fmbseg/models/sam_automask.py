"""SAM automatic mask generation from a precomputed image embedding (DESIGN §1, Stage 1.2).

This is `SamAutomaticMaskGenerator`'s single-crop path (`crop_n_layers = 0`) rebuilt on an existing
`SamEmbedding`, so the image encoder never runs again: a `points_per_side`² grid of single positive points, decoded
`points_per_batch` at a time (multimask), filtered by predicted IoU and stability score, then box NMS.

Choices where the stock generator has none: masks are also filtered by area *before* NMS (so an out-of-range mask
never suppresses a valid one), with `min_area_frac`/`max_area_frac` of the original image area, and empty masks are
always dropped. A stability score of 0/0 (no pixel above the low cut) counts as 0. Grid points are cell centres in
continuous original-image pixels, mapped like any other point prompt.
Output order: decreasing predicted IoU (the NMS order), as in the stock generator.
"""

from __future__ import annotations

import numpy as np
import torch

from fmbseg.models.base import AutoMask, AutoMaskConfig, SamEmbedding


def _check_config(cfg: AutoMaskConfig) -> None:
    if cfg.points_per_side < 1 or cfg.points_per_batch < 1:
        raise ValueError(f"points_per_side and points_per_batch must be >= 1, got {cfg.points_per_side}, {cfg.points_per_batch}")
    if not 0.0 <= cfg.min_area_frac <= cfg.max_area_frac <= 1.0:
        raise ValueError(f"need 0 <= min_area_frac <= max_area_frac <= 1, got {cfg.min_area_frac}, {cfg.max_area_frac}")
    if not 0.0 <= cfg.box_nms_thresh <= 1.0:
        raise ValueError(f"box_nms_thresh must be in [0, 1], got {cfg.box_nms_thresh}")


def grid_points(points_per_side: int, original_hw: tuple[int, int]) -> np.ndarray:
    """(points_per_side², 2) continuous (x, y) original px: centres of a regular points_per_side² cell grid."""
    from segment_anything.utils.amg import build_point_grid

    h, w = original_hw
    return build_point_grid(points_per_side) * np.array([[w, h]], dtype=np.float64)


@torch.no_grad()
def generate_masks(model, emb: SamEmbedding, cfg: AutoMaskConfig) -> list[AutoMask]:
    """`model` is a `SegmentAnythingModel`; -> masks (H, W) bool at the original resolution, best first."""
    from segment_anything.utils.amg import (
        MaskData,
        batch_iterator,
        batched_mask_to_box,
        calculate_stability_score,
        mask_to_rle_pytorch,
        rle_to_mask,
    )
    from torchvision.ops import batched_nms

    _check_config(cfg)
    h, w = emb.original_hw
    min_area, max_area = cfg.min_area_frac * h * w, cfg.max_area_frac * h * w
    threshold = model.sam.mask_threshold

    data = MaskData()
    for (points,) in batch_iterator(cfg.points_per_batch, grid_points(cfg.points_per_side, (h, w))):
        logits, iou = model.decode(emb, points[:, None, :])  # (b, 3, H, W), (b, 3)
        batch = MaskData(masks=logits.flatten(0, 1), iou_preds=iou.flatten(0, 1))
        del logits
        if cfg.pred_iou_thresh > 0.0:
            batch.filter(batch["iou_preds"] > cfg.pred_iou_thresh)
        stability = calculate_stability_score(batch["masks"], threshold, cfg.stability_score_offset)
        batch["stability_score"] = torch.nan_to_num(stability, nan=0.0)
        if cfg.stability_score_thresh > 0.0:
            batch.filter(batch["stability_score"] >= cfg.stability_score_thresh)
        batch["masks"] = batch["masks"] > threshold
        area = batch["masks"].flatten(1).sum(1)
        batch.filter((area > 0) & (area >= min_area) & (area <= max_area))
        batch["boxes"] = batched_mask_to_box(batch["masks"])
        # Run-length encode survivors so a large image's candidates do not all sit in memory as dense masks.
        batch["rles"] = mask_to_rle_pytorch(batch["masks"])
        del batch["masks"]
        data.cat(batch)

    if len(data["rles"]) == 0:
        return []
    keep = batched_nms(
        data["boxes"].float(),
        data["iou_preds"],
        torch.zeros(len(data["boxes"]), dtype=torch.long, device=data["boxes"].device),
        iou_threshold=cfg.box_nms_thresh,
    )
    data.filter(keep)
    return [
        AutoMask(segmentation=rle_to_mask(rle), predicted_iou=float(iou), stability_score=float(stab))
        for rle, iou, stab in zip(data["rles"], data["iou_preds"].tolist(), data["stability_score"].tolist())
    ]
