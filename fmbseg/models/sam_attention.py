"""Fused attention for SAM's image encoder: `F.scaled_dot_product_attention` with the decomposed relative-position
bias passed as an additive mask (the approach of pytorch-labs/segment-anything-fast), instead of
segment_anything's explicit `softmax(q k^T * scale + bias) v`.

The result equals the stock attention up to float rounding (tested: <= 1e-5 fp32 on seeded ViT-B and tiny weights
with non-zero relative-position tables); the parameters and their names are untouched, so released checkpoints
load as before. The bias is materialised as one (B, heads, H*W, H*W) tensor per block, the size of the attention
matrix the stock path materialises anyway; on CUDA, SDPA's memory-efficient kernel takes such a mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    """x (B, H, W, C) -> (B, H, W, C); `self` is a segment_anything `image_encoder.Attention`."""
    B, H, W, _ = x.shape
    nh = self.num_heads
    # (3, B, heads, H*W, c), as the stock forward lays it out.
    q, k, v = self.qkv(x).reshape(B, H * W, 3, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if self.use_rel_pos:
        c = q.shape[-1]
        Rh = get_rel_pos(H, H, self.rel_pos_h)  # (H, H, c)
        Rw = get_rel_pos(W, W, self.rel_pos_w)  # (W, W, c)
        r_q = q.reshape(B * nh, H, W, c)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)  # (B*heads, H, W, kH)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)  # (B*heads, H, W, kW)
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(B, nh, H * W, H * W)
        # SDPA wants the mask in the query's dtype (under autocast q is bf16 while the tables are float32).
        bias = bias.to(q.dtype)
    # SDPA's default scale is 1/sqrt(c), the stock `head_dim ** -0.5`.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.reshape(B, nh, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(out)


class FusedRelPosAttention(Attention):
    """segment_anything's `Attention` (same parameters and state-dict names) with the fused forward."""

    forward = _fused_forward


def use_fused_attention(image_encoder: nn.Module) -> int:
    """Switch every attention block of a segment_anything `ImageEncoderViT` to `FusedRelPosAttention`, in place
    (isinstance(Attention) stays true). Returns the number of blocks switched (0 when already switched)."""
    n = 0
    for module in image_encoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedRelPosAttention
            n += 1
    return n
