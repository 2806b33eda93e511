"""DINOv2 adapter over transformers' `Dinov2Model` (and `Dinov2WithRegistersModel`): frozen patch features.

`features((B, 3, H, W) in [0, 1]) -> (B, H/14, W/14, C)`: ImageNet normalisation inside, the final layer-normed
tokens with the CLS (and register) tokens dropped, channels last. Positional embeddings are interpolated by
transformers for any H, W multiple of the patch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fmbseg.device import autocast

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DinoArch:
    """A DINOv2 architecture (the fields of transformers' `Dinov2Config` that change between sizes)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int = 14
    image_size: int = 518
    mlp_ratio: int = 4
    num_register_tokens: int = 0
    use_swiglu_ffn: bool = False

    def config(self):
        kwargs = dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            patch_size=self.patch_size,
            image_size=self.image_size,
            mlp_ratio=self.mlp_ratio,
            use_swiglu_ffn=self.use_swiglu_ffn,
        )
        if self.num_register_tokens:
            from transformers import Dinov2WithRegistersConfig

            return Dinov2WithRegistersConfig(num_register_tokens=self.num_register_tokens, **kwargs)
        from transformers import Dinov2Config

        return Dinov2Config(**kwargs)


def build_dino(arch: DinoArch) -> nn.Module:
    """A randomly initialised DINOv2 of `arch` (honours an enclosing `torch.device(...)` context, e.g. meta)."""
    if arch.num_register_tokens:
        from transformers import Dinov2WithRegistersModel as cls
    else:
        from transformers import Dinov2Model as cls
    return cls(arch.config()).eval()


# Hub checkpoints (facebook/dinov2-*) use the original HF names; transformers >= 5 renames them on
# `from_pretrained`. Loading goes through our own strict loader, so the same renaming is done here.
_LEGACY_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("mlp.weights_out.", "mlp.down_proj."),
)


def convert_legacy_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename original Hugging Face DINOv2 checkpoint keys to the ones `model` (this transformers) uses.

    A state dict already in the model's naming is returned unchanged."""
    expected = model.state_dict().keys()
    if all(k in expected for k in sd):
        return sd
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        for old, repl in _LEGACY_RENAMES:
            new = new.replace(old, repl)
        if ".mlp.weights_in." in new:  # SwiGLU: one fused (2H, C) projection -> gate and up halves
            gate, up = value.chunk(2, dim=0)
            out[new.replace("mlp.weights_in.", "mlp.gate_proj.")] = gate
            out[new.replace("mlp.weights_in.", "mlp.up_proj.")] = up
            continue
        out[new] = value
    return out


class HfDinoModel:
    """`DinoModel` over a transformers DINOv2 module (frozen, eval mode)."""

    def __init__(self, model: nn.Module, model_id: str, device: torch.device, weights_sha256: str | None = None):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        config = model.config
        patch = config.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.embed_dim = int(config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.pixel_mean = tuple(float(v) for v in IMAGENET_MEAN)     # the [0, 1] input that is 0 after normalisation
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 14 -> (B, H/14, W/14, C) float32 (not normalised)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DINOv2 features expect a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        b, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DINOv2 input {h}x{w} is not a multiple of the patch size {p}")
        x = (images.to(self.device, torch.float32) - self._mean) / self._std
        with autocast(self.device):
            tokens = self.model(pixel_values=x).last_hidden_state
        patches = tokens[:, self.num_prefix_tokens :].float()
        return patches.reshape(b, h // p, w // p, self.embed_dim)
