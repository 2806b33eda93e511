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
    from segment_anything.utils.amg import batch_iterator, batched_mask_to_box, calculate_stability_score
    from torchvision.ops import batched_nms

    _check_config(cfg)
    h, w = emb.original_hw
    min_area, max_area = cfg.min_area_frac * h * w, cfg.max_area_frac * h * w
    threshold = model.sam.mask_threshold

    # Survivors of each batch are kept bit-packed (8x smaller than bool) so a large image's candidates do not all
    # sit in memory as dense masks; packing is one vectorised call, unlike the stock generator's per-mask RLE.
    packed, boxes, ious, stabs = [], [], [], []
    for (points,) in batch_iterator(cfg.points_per_batch, grid_points(cfg.points_per_side, (h, w))):
        logits, iou = model.decode(emb, points[:, None, :])  # (b, 3, H, W), (b, 3)
        logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)
        keep = iou > cfg.pred_iou_thresh if cfg.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
        logits, iou = logits[keep], iou[keep]
        stability = torch.nan_to_num(calculate_stability_score(logits, threshold, cfg.stability_score_offset), nan=0.0)
        if cfg.stability_score_thresh > 0.0:
            keep = stability >= cfg.stability_score_thresh
            logits, iou, stability = logits[keep], iou[keep], stability[keep]
        masks = logits > threshold
        del logits
        area = masks.flatten(1).sum(1)
        keep = (area > 0) & (area >= min_area) & (area <= max_area)
        masks, iou, stability = masks[keep], iou[keep], stability[keep]
        if len(masks) == 0:
            continue
        boxes.append(batched_mask_to_box(masks).float().cpu())
        ious.append(iou.float().cpu())
        stabs.append(stability.float().cpu())
        packed.append(np.packbits(masks.flatten(1).cpu().numpy(), axis=1))

    if not packed:
        return []
    boxes_t, ious_t, stabs_t = torch.cat(boxes), torch.cat(ious), torch.cat(stabs)
    keep = batched_nms(boxes_t, ious_t, torch.zeros(len(boxes_t), dtype=torch.long), iou_threshold=cfg.box_nms_thresh)
    bits = np.concatenate(packed)[keep.numpy()]
    masks = np.unpackbits(bits, axis=1, count=h * w).reshape(-1, h, w).astype(bool)
    return [
        AutoMask(segmentation=m, predicted_iou=float(i), stability_score=float(s))
        for m, i, s in zip(masks, ious_t[keep].tolist(), stabs_t[keep].tolist())
    ]
