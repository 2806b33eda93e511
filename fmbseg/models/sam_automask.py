"""SAM automatic mask generation from a precomputed image embedding (DESIGN §1, Stage 1.2).

This is `SamAutomaticMaskGenerator`'s single-crop path (`crop_n_layers = 0`) rebuilt on an existing
`SamEmbedding`, so the image encoder never runs again: a `points_per_side`² grid of single positive points, decoded
in batches (multimask), filtered by predicted IoU and stability score, then box NMS. With the area filter off
(`min_area_frac = 0`, `max_area_frac = 1`) and `stability_score_thresh > 0` the masks, predicted IoUs, stability
scores, boxes and order are bit-identical to the stock generator's on the same image and weights (tested side by
side on CPU, float32).

The grid is the stock one: `build_point_grid(n) * (W, H)` taken, as the stock generator takes it, as SAM
pixel-index coordinates (`ResizeLongestSide.apply_coords` without the -0.5 that `SegmentAnythingModel` applies to
continuous user points). In this project's continuous convention a grid point therefore sits half an input pixel
right of and below the cell centre `build_point_grid(n) * (W, H)`; `grid_points` returns the stock values.

Exact reorganisations of the stock computation (each checked bit for bit against the stock generator):
- the prompt-independent part of the mask decoder (image embedding + no-mask embedding, the first two-way layer's
  image-side projections, the positional encoding) is computed once per image (`GridDecoder`), not per prompt;
- the predicted-IoU filter runs on the low-resolution logits, so only survivors are upsampled to full size;
- the decode batch (`SegmentAnythingModel.points_per_batch`, chosen for the device) is an execution setting: every
  per-mask value is computed independently of the other prompts in its batch, so outputs do not depend on it;
- survivors are bit-packed on the device (`packbits_rows`) before they are copied to the host for NMS.

Choices where the stock generator has none: masks are also filtered by area *before* NMS (so an out-of-range mask
never suppresses a valid one), with `min_area_frac`/`max_area_frac` of the original image area, and empty masks are
always dropped. A stability score of 0/0 (no pixel above the low cut) counts as 0.
Output order: decreasing predicted IoU (the NMS order), as in the stock generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fmbseg.device import autocast
from fmbseg.models.base import AutoMask, AutoMaskConfig, SamEmbedding


# Decoder batches are whole multiples of PAD_TO points. CPU BLAS computes a row of a GEMM with the same summation
# order whatever the number of rows only when that number has no odd remainder for its vectorised kernels: measured
# on this project's CPU, batches of 4, 8, 16, ... 1024 points give bit-identical masks and scores while 1, 2, 3 or 7
# differ in the last bit. Padding makes the decode batch an execution setting (tested).
PAD_TO = 8


def grid_points(points_per_side: int, original_hw: tuple[int, int]) -> np.ndarray:
    """(points_per_side², 2) (x, y): the stock generator's grid, `build_point_grid(n) * (W, H)`, row-major (y
    outer). These are SAM pixel-index coordinates (see the module docstring), not continuous ones."""
    from segment_anything.utils.amg import build_point_grid

    h, w = original_hw
    return build_point_grid(points_per_side) * np.array([[w, h]], dtype=np.float64)


def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything `transformer.Attention.forward` after the input projections (q, k, v already projected;
    a batch of 1 broadcasts)."""
    q = attn._separate_heads(q, attn.num_heads)
    k = attn._separate_heads(k, attn.num_heads)
    v = attn._separate_heads(v, attn.num_heads)
    a = q @ k.permute(0, 1, 3, 2)
    a = a / math.sqrt(q.shape[-1])
    a = torch.softmax(a, dim=-1)
    return attn.out_proj(attn._recombine_heads(a @ v))


class GridDecoder:
    """`MaskDecoder.predict_masks` for batches of point prompts on ONE image, with everything that does not depend
    on the prompt computed once in `__init__`: the image embedding plus the no-mask embedding, the flattened
    positional encoding, and the first two-way layer's projections of the image side (k and v of the
    token-to-image attention, q of the image-to-token attention). Values per prompt equal the stock decoder's
    bit for bit (the shared tensors are the rows the stock path computes B times)."""

    @torch.no_grad()
    def __init__(self, model, emb: SamEmbedding):
        sam = model.sam
        self.model, self.dec, self.pe = model, sam.mask_decoder, sam.prompt_encoder
        self.tr = self.dec.transformer
        features = model._features(emb)  # (1, C, h, w)
        _, c, h, w = features.shape
        self.hw = (h, w)
        image_pe = self.pe.get_dense_pe()  # (1, C, h, w)
        dense = self.pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        layer0 = self.tr.layers[0]
        with autocast(model.device):
            self.keys = (features + dense).flatten(2).permute(0, 2, 1)  # (1, HW, C)
            self.key_pe = image_pe.flatten(2).permute(0, 2, 1)  # (1, HW, C)
            kpe = self.keys + self.key_pe
            t2i, i2t = layer0.cross_attn_token_to_image, layer0.cross_attn_image_to_token
            self.k0, self.v0 = t2i.k_proj(kpe), t2i.v_proj(self.keys)
            self.q0 = i2t.q_proj(kpe)

    @torch.no_grad()
    def __call__(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords (B, n, 2) SAM pixel-index coordinates, all positive -> low-res logits (B, 4, h, w) and predicted
        IoU (B, 4) (output 0: single-mask token, 1-3: multimask tokens), in the decoder's (autocast) dtype."""
        dec, tr = self.dec, self.tr
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
        # Float32 prompt encoding, as in SegmentAnythingModel.decode_low_res.
        sparse, _ = self.pe(points=(coords, labels), boxes=None, masks=None)
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        layer0 = tr.layers[0]
        with autocast(self.model.device):
            # TwoWayTransformer.forward, its first TwoWayAttentionBlock (skip_first_layer_pe) unrolled.
            queries = layer0.self_attn(q=tokens, k=tokens, v=tokens)
            queries = layer0.norm1(queries)
            t2i = layer0.cross_attn_token_to_image
            queries = layer0.norm2(queries + _attend(t2i, t2i.q_proj(queries + tokens), self.k0, self.v0))
            queries = layer0.norm3(queries + layer0.mlp(queries))
            i2t = layer0.cross_attn_image_to_token
            q = queries + tokens
            keys = layer0.norm4(self.keys + _attend(i2t, self.q0, i2t.k_proj(q), i2t.v_proj(queries)))
            for layer in tr.layers[1:]:
                queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=self.key_pe)
            attn_out = tr.final_attn_token_to_image(q=queries + tokens, k=keys + self.key_pe, v=keys)
            hs = tr.norm_final_attn(queries + attn_out)

            # The rest of MaskDecoder.predict_masks.
            iou_token_out = hs[:, 0, :]
            mask_tokens_out = hs[:, 1 : (1 + dec.num_mask_tokens), :]
            b, c, (h, w) = keys.shape[0], keys.shape[2], self.hw
            src = keys.transpose(1, 2).view(b, c, h, w)
            upscaled = dec.output_upscaling(src)
            hyper_in = torch.stack([dec.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                                    for i in range(dec.num_mask_tokens)], dim=1)
            b, c, h, w = upscaled.shape
            masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
            iou_pred = dec.iou_prediction_head(iou_token_out)
        return masks, iou_pred


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def packbits_rows(masks: torch.Tensor, torch_ops: bool | None = None) -> np.ndarray:
    """(n, L) bool on any device -> `np.packbits(masks.cpu().numpy(), axis=1)`, (n, ceil(L / 8)) uint8, packed on
    the device: 8x fewer bytes cross to the host, and the host packs nothing (both were host time per image).
    `torch_ops` None: on any device but the CPU, where numpy packs (faster there than the torch ops)."""
    if not (torch_ops if torch_ops is not None else masks.device.type != "cpu"):
        return np.packbits(masks.numpy(), axis=1)
    n, L = masks.shape
    if L % 8:
        masks = torch.cat([masks, masks.new_zeros(n, -L % 8)], dim=1)  # np.packbits pads the last byte with 0s
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=masks.device)
    # Distinct bits: the uint8 sum is exact (at most 255).
    return (masks.reshape(n, masks.shape[1] // 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8).cpu().numpy()


@torch.no_grad()
def generate_masks(model, emb: SamEmbedding, cfg: AutoMaskConfig) -> list[AutoMask]:
    """`model` is a `SegmentAnythingModel`; -> masks (H, W) bool at the original resolution, best first."""
    from segment_anything.utils.amg import batch_iterator, batched_mask_to_box, calculate_stability_score
    from torchvision.ops import batched_nms

    h, w = emb.original_hw
    min_area, max_area = cfg.min_area_frac * h * w, cfg.max_area_frac * h * w
    threshold = model.sam.mask_threshold
    # float64 model-frame points, as the stock generator hands them to the prompt encoder.
    model_frame = model.transform.apply_coords(grid_points(cfg.points_per_side, (h, w)), (h, w))
    decoder = GridDecoder(model, emb)

    # Survivors of each batch are kept bit-packed (8x smaller than bool) so a large image's candidates do not all
    # sit in memory as dense masks; packing is one vectorised call, unlike the stock generator's per-mask RLE.
    packed, boxes, ious, stabs = [], [], [], []
    step = max(PAD_TO, model.points_per_batch // PAD_TO * PAD_TO)
    for (points,) in batch_iterator(step, model_frame):
        n = len(points)
        # Pad a ragged last batch to a multiple of PAD_TO points (repeats of its last point, dropped below): the
        # GEMMs then see row counts for which each row's result does not depend on the batch (see PAD_TO).
        padded = np.concatenate([points, np.repeat(points[-1:], -n % PAD_TO, axis=0)])
        low_res, iou = decoder(torch.as_tensor(padded[:, None, :], device=model.device))
        low_res, iou = low_res[:n, 1:].flatten(0, 1), iou[:n, 1:].flatten(0, 1).float()  # multimask, (n*3, ...)
        if cfg.pred_iou_thresh > 0.0:
            # Before upsampling: a mask's upsampled logits depend on its own low-res logits only.
            keep = iou > cfg.pred_iou_thresh
            low_res, iou = low_res[keep], iou[keep]
        if len(iou) == 0:
            continue
        logits = model.upsample(low_res, emb)  # (k, H, W) float32
        del low_res
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
        ious.append(iou.cpu())
        stabs.append(stability.float().cpu())
        packed.append(packbits_rows(masks.flatten(1)))

    if not packed:
        return []
    boxes_t, ious_t, stabs_t = torch.cat(boxes), torch.cat(ious), torch.cat(stabs)
    keep = batched_nms(boxes_t, ious_t, torch.zeros(len(boxes_t), dtype=torch.long), iou_threshold=cfg.box_nms_thresh)
    bits = np.concatenate(packed)[keep.numpy()]
    masks = np.unpackbits(bits, axis=1, count=h * w).reshape(-1, h, w).view(bool)  # 0/1 bytes: no bool copy
    return [
        AutoMask(segmentation=m, predicted_iou=float(i), stability_score=float(s))
        for m, i, s in zip(masks, ious_t[keep].tolist(), stabs_t[keep].tolist())
    ]
