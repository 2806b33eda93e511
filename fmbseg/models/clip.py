"""CLIP adapter over open_clip: text embeddings, crop CLS embeddings and dense features (DESIGN §3).

Dense features change only the last vision block; with x the tokens entering it (CLS included) and y = ln_1(x):
- `maskclip` (default, MaskCLIP's value path): v = out_proj(W_v y + b_v) (queries and keys unused);
  v = x + ls_1(v); v = v + ls_2(mlp(ln_2(v))).
- `clearclip` (ClearCLIP, Lan et al. 2024): per head A = softmax(q q^T / sqrt(d_head)) over all tokens;
  v = out_proj(A v); no residual, no FFN (ClearCLIP's default `ignore_residual=True`, q-q attention).
- `sclip` (SCLIP, Wang et al. 2023, correlative self-attention): per head
  A = softmax(q q^T / sqrt(d_head)) + softmax(k k^T / sqrt(d_head)); a = out_proj(A v); v = x + ls_1(a);
  v = v + ls_2(mlp(ln_2(v))) -- SCLIP's official code keeps the residual and the FFN of the last block.
Then ln_post and the visual projection. The CLS embedding takes the ordinary path in every mode, so it equals
`model.encode_image`. For a non-native input grid the positional embeddings are interpolated bicubically
(cached per grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fmbseg.device import autocast
from fmbseg.stage1_config import DENSE_MODES, DenseMode  # noqa: F401 (the registry lives with the settings)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)



def check_dense_mode(mode: str) -> str:
    """`mode` if it is one of `DENSE_MODES`, else ValueError naming the valid ones."""
    if not isinstance(mode, str) or mode not in DENSE_MODES:
        raise ValueError(f"unknown dense CLIP mode {mode!r}; choose one of {', '.join(DENSE_MODES)}")
    return mode


@dataclass(frozen=True)
class ClipArch:
    """An open_clip CLIP architecture: `embed_dim`, `vision_cfg`, `text_cfg` as in open_clip's model configs.

    `quick_gelu` must be True for OpenAI weights (they were trained with QuickGELU)."""

    name: str
    embed_dim: int
    vision_cfg: dict[str, Any] = field(hash=False)
    text_cfg: dict[str, Any] = field(hash=False)
    quick_gelu: bool = True

    @classmethod
    def from_open_clip(cls, model_name: str, quick_gelu: bool = True) -> "ClipArch":
        import open_clip

        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"open_clip has no model config named {model_name!r}")
        return cls(model_name, cfg["embed_dim"], dict(cfg["vision_cfg"]), dict(cfg["text_cfg"]), quick_gelu)


def build_clip(arch: ClipArch) -> nn.Module:
    """A randomly initialised `open_clip.CLIP` (honours an enclosing `torch.device(...)` context, e.g. meta)."""
    from open_clip.model import CLIP

    model = CLIP(
        embed_dim=arch.embed_dim,
        vision_cfg=dict(arch.vision_cfg),
        text_cfg=dict(arch.text_cfg),
        quick_gelu=arch.quick_gelu,
    )
    return model.eval()


# -- dense features ------------------------------------------------------------------------------------------


def interpolated_pos_embed(visual: nn.Module, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(1 + h*w, width) positional embedding for a (h, w) patch grid; bicubic from the native grid, cached.

    The cache key includes the tensor's storage and version counter, so loading new weights invalidates it."""
    pos = visual.positional_embedding
    native = tuple(visual.grid_size)
    if tuple(grid_hw) == native:
        return pos
    cache = visual.__dict__.setdefault("_fmbseg_pos_cache", {})
    key = (tuple(grid_hw), pos.data_ptr(), pos._version, pos.dtype, pos.device)
    if key not in cache:
        cache.clear()
        width = pos.shape[-1]
        patch = pos[1:].reshape(1, native[0], native[1], width).permute(0, 3, 1, 2).float()
        patch = F.interpolate(patch, size=tuple(grid_hw), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(grid_hw[0] * grid_hw[1], width).to(pos.dtype)
        cache[key] = torch.cat([pos[:1], patch], dim=0)
    return cache[key]


def _check_supported(visual: nn.Module) -> None:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(f"dense CLIP features need an open_clip VisionTransformer, got {type(visual).__name__}")
    if visual.attn_pool is not None:
        raise NotImplementedError("dense CLIP features do not support attentional pooling (CoCa-style) towers")
    last = visual.transformer.resblocks[-1]
    if type(last) is not ResidualAttentionBlock or not isinstance(last.attn, nn.MultiheadAttention):
        raise NotImplementedError(f"dense CLIP features need the default attention block, got {type(last).__name__}")


def _correlative_attention(attn: nn.MultiheadAttention, y: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, L, C) normed tokens -> out_proj(A v) with A = softmax(q q^T s) (clearclip) or
    softmax(q q^T s) + softmax(k k^T s) (sclip), per head, s = 1/sqrt(head dim), over all L tokens."""
    b, n, c = y.shape
    heads = attn.num_heads
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
    # scaled_dot_product_attention(a, a, v) == softmax(a a^T / sqrt(d)) v, without materialising A on fused kernels.
    out = F.scaled_dot_product_attention(q, q, v)
    if mode == "sclip":
        out = out + F.scaled_dot_product_attention(k, k, v)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, c))


def dense_features(
    model: nn.Module, images: torch.Tensor, mode: str = "maskclip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip `CLIP` + normalised batch (B, 3, H, W), H and W multiples of the patch size ->
    raw (un-normalised) `cls (B, D)` (== `model.encode_image(images)`) and `dense (B, H/P, W/P, D)`.

    `mode` (one of `DENSE_MODES`, see the module docstring) picks the dense path of the last block; the CLS
    output is the same in every mode. Patch dropout is not applied: every patch must reach the output grid
    (it is a training-only op anyway)."""
    check_dense_mode(mode)
    visual = model.visual
    _check_supported(visual)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"CLIP dense features expect a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    ph, pw = visual.patch_size
    b, _, height, width = images.shape
    if height % ph or width % pw:
        raise ValueError(f"CLIP input {height}x{width} is not a multiple of the patch size {ph}x{pw}")
    gh, gw = height // ph, width // pw

    x = visual.conv1(images)  # (B, width, gh, gw)
    x = x.reshape(b, x.shape[1], gh * gw).permute(0, 2, 1)
    cls_tok = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
    x = torch.cat([cls_tok, x], dim=1) + interpolated_pos_embed(visual, (gh, gw)).to(x.dtype)
    x = visual.ln_pre(x)

    transformer = visual.transformer
    blocks = transformer.resblocks
    # Blocks take (B, L, C) when batch_first, else (L, B, C); token-wise ops below do not care.
    seq = x if transformer.batch_first else x.transpose(0, 1)
    for blk in blocks[:-1]:
        seq = blk(seq)
    last = blocks[-1]
    x = seq if transformer.batch_first else seq.transpose(0, 1)  # (B, L, C)

    # CLS path: the ordinary last block and pooling.
    if visual.pool_type == "tok" and last.attn.batch_first:
        # Only the CLS query is needed; keys/values are all tokens (same result as the full block for token 0).
        y = last.ln_1(x)
        c = x[:, :1] + last.ls_1(last.attention(q_x=y[:, :1], k_x=y, v_x=y))
        c = c + last.ls_2(last.mlp(last.ln_2(c)))
        pooled, _ = visual._pool(c)
    else:
        full = last(seq)
        full = full if transformer.batch_first else full.transpose(0, 1)
        pooled, _ = visual._pool(full)
    cls = pooled @ visual.proj if visual.proj is not None else pooled

    if mode == "maskclip":
        # Dense path: MaskCLIP value path on the patch tokens (token-wise, the CLS token is not needed).
        y = last.ln_1(x[:, 1:])
        dim = y.shape[-1]
        w_v = last.attn.in_proj_weight[2 * dim :]
        b_v = last.attn.in_proj_bias[2 * dim :] if last.attn.in_proj_bias is not None else None
        v = last.attn.out_proj(F.linear(y, w_v, b_v))
        v = x[:, 1:] + last.ls_1(v)
        v = v + last.ls_2(last.mlp(last.ln_2(v)))
    else:
        # q-q (clearclip) or q-q + k-k (sclip) attention over all tokens, CLS included; its row dropped after.
        a = _correlative_attention(last.attn, last.ln_1(x), mode)[:, 1:]
        if mode == "clearclip":
            v = a  # no residual, no FFN
        else:
            v = x[:, 1:] + last.ls_1(a)
            v = v + last.ls_2(last.mlp(last.ln_2(v)))
    v = visual.ln_post(v)
    if visual.proj is not None:
        v = v @ visual.proj
    return cls, v.reshape(b, gh, gw, v.shape[-1])


# -- adapter -------------------------------------------------------------------------------------------------


class OpenClipModel:
    """`ClipModel` over an open_clip `CLIP` (frozen, eval mode). Inputs are in [0, 1]; OpenAI statistics inside.

    `dense_mode` (one of `DENSE_MODES`, default `maskclip`) is the dense path of `encode_crops`/`encode_dense`."""

    def __init__(
        self,
        model: nn.Module,
        model_id: str,
        device: torch.device,
        weights_sha256: str | None = None,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        text_batch_size: int = 256,
        dense_mode: str = "maskclip",
    ):
        from open_clip.tokenizer import SimpleTokenizer

        _check_supported(model.visual)
        self.dense_mode = check_dense_mode(dense_mode)
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        size = model.visual.image_size
        patch = model.visual.patch_size
        if size[0] != size[1] or patch[0] != patch[1]:
            raise NotImplementedError(f"only square CLIP inputs and patches are supported, got {size} / {patch}")
        self.input_size = int(size[0])
        self.patch_size = int(patch[0])
        self.embed_dim = int(model.text_projection.shape[1] if model.text_projection is not None else model.visual.output_dim)
        self.tokenizer = SimpleTokenizer(context_length=model.context_length)
        self.text_batch_size = text_batch_size
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.pixel_mean = tuple(float(v) for v in mean)     # the [0, 1] input that is 0 after normalisation
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self._text_cache: dict[tuple, torch.Tensor] = {}

    # -- text ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.text_batch_size):
            tokens = self.tokenizer(prompts[i : i + self.text_batch_size]).to(self.device)
            # float32 even on CUDA: computed once per vocabulary, and bf16 would move every cosine logit by ~1e-2.
            with torch.autocast(self.device.type, enabled=False):
                out.append(self.model.encode_text(tokens).float())
        return F.normalize(torch.cat(out), dim=-1)

    def encode_text(
        self, names: Sequence[str | Sequence[str]], templates: Sequence[str] = ("a photo of a {}.",)
    ) -> torch.Tensor:
        """-> (K, D) L2-normalised float32. Per name (or synonym) the templates' embeddings are normalised,
        averaged and re-normalised; a class given as a list of synonyms averages those and re-normalises.
        Cached per (names, templates); the returned tensor is shared, do not modify it in place."""
        if isinstance(names, str):
            raise TypeError("encode_text takes a sequence of class names, not one string")
        classes = tuple((n,) if isinstance(n, str) else tuple(n) for n in names)
        templates = tuple(templates)
        if not classes or any(not c or not all(isinstance(s, str) and s.strip() for s in c) for c in classes):
            raise ValueError(f"every class needs at least one non-empty name, got {names!r}")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"every template needs a '{{}}' placeholder, got {templates!r}")
        key = (classes, templates)
        if key not in self._text_cache:
            synonyms = sorted({s for c in classes for s in c})
            prompts = [t.format(s) for s in synonyms for t in templates]
            emb = self._embed_prompts(prompts).view(len(synonyms), len(templates), -1)
            per_name = F.normalize(emb.mean(dim=1), dim=-1)
            index = {s: i for i, s in enumerate(synonyms)}
            per_class = torch.stack([per_name[[index[s] for s in c]].mean(dim=0) for c in classes])
            self._text_cache[key] = F.normalize(per_class, dim=-1)
        return self._text_cache[key]

    # -- images --------------------------------------------------------------------------------------------
    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP expects a (B, 3, H, W) batch in [0, 1], got shape {tuple(images.shape)}")
        return (images.to(self.device, torch.float32) - self._mean) / self._std

    @torch.no_grad()
    def encode_crops(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1], S = input_size -> cls (B, D), dense (B, S/P, S/P, D), both L2-normalised."""
        if crops.ndim != 4 or tuple(crops.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"encode_crops expects (B, 3, {self.input_size}, {self.input_size}) crops, got {tuple(crops.shape)}; "
                "use encode_dense for other sizes"
            )
        with autocast(self.device):
            cls, dense = dense_features(self.model, self._normalise(crops), self.dense_mode)
        return F.normalize(cls.float(), dim=-1), F.normalize(dense.float(), dim=-1)

    @torch.no_grad()
    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of P -> (B, H/P, W/P, D) L2-normalised."""
        with autocast(self.device):
            _, dense = dense_features(self.model, self._normalise(images), self.dense_mode)
        return F.normalize(dense.float(), dim=-1)
