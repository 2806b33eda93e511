"""The DINOv2 adapter: patch features with prefix tokens dropped, ImageNet normalisation inside, Hub key names."""

from __future__ import annotations

import pytest
import torch

from fmbseg.models.base import DinoModel
from fmbseg.models.dino import DinoArch, HfDinoModel, build_dino, convert_legacy_state_dict
from fmbseg.presets import make_dino

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def dino():
    return make_dino("tiny", device="cpu")


def test_tiny_dino_features_shape_and_values(dino):
    assert isinstance(dino, DinoModel)
    assert (dino.patch_size, dino.embed_dim) == (14, 64)
    images = torch.rand(2, 3, 70, 42)  # a non-square, non-native size: 5 x 3 patches
    feats = dino.features(images)
    assert feats.shape == (2, 5, 3, 64) and feats.dtype == torch.float32
    with torch.no_grad():
        tokens = dino.model(pixel_values=(images - MEAN) / STD).last_hidden_state
    # Token 0 is CLS; patch tokens follow in row-major order.
    assert torch.allclose(feats.reshape(2, 15, 64), tokens[:, 1:], atol=1e-6)
    assert not torch.allclose(feats[:, 0, 0], tokens[:, 0], atol=1e-3)


def test_register_tokens_are_dropped():
    torch.manual_seed(0)
    arch = DinoArch("reg", 64, 1, 2, image_size=56, num_register_tokens=4)
    adapter = HfDinoModel(build_dino(arch), "reg", torch.device("cpu"))
    images = torch.rand(1, 3, 28, 56)
    feats = adapter.features(images)
    with torch.no_grad():
        tokens = adapter.model(pixel_values=(images - MEAN) / STD).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 8
    assert feats.shape == (1, 2, 4, 64)
    assert torch.allclose(feats.reshape(1, 8, 64), tokens[:, 5:], atol=1e-6)


def test_bad_sizes_are_refused(dino):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        dino.features(torch.rand(1, 3, 50, 42))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dino.features(torch.rand(3, 42, 42))


def _to_hub_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename to the original facebook/dinov2-* checkpoint names (what the Hub files hold)."""
    out = {}
    for k, v in sd.items():
        k = (k.replace("attention.q_proj.", "attention.attention.query.")
              .replace("attention.k_proj.", "attention.attention.key.")
              .replace("attention.v_proj.", "attention.attention.value.")
              .replace("attention.o_proj.", "attention.output.dense."))
        out[k] = v
    return out


def test_hub_checkpoint_names_load_through_the_preset(dino, tmp_path):
    torch.manual_seed(1)
    source = build_dino(DinoArch("tiny", 64, 2, 2, image_size=56))
    hub = _to_hub_names(source.state_dict())
    assert any(".attention.attention.query." in k for k in hub)
    path = tmp_path / "dinov2-tiny-hub.pt"
    torch.save(hub, path)
    loaded = make_dino("tiny", device="cpu", weights=str(path))
    images = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        ref = source(pixel_values=(images - MEAN) / STD).last_hidden_state[:, 1:].reshape(1, 2, 2, 64)
    assert torch.allclose(loaded.features(images), ref, atol=1e-6)


def test_swiglu_fused_projection_is_split():
    torch.manual_seed(2)
    model = build_dino(DinoArch("swiglu", 64, 1, 2, image_size=56, use_swiglu_ffn=True))
    sd = model.state_dict()
    hub = {k: v for k, v in sd.items() if ".mlp." not in k}
    for part in ("weight", "bias"):
        hub[f"encoder.layer.0.mlp.weights_in.{part}"] = torch.cat(
            [sd[f"encoder.layer.0.mlp.gate_proj.{part}"], sd[f"encoder.layer.0.mlp.up_proj.{part}"]])
        hub[f"encoder.layer.0.mlp.weights_out.{part}"] = sd[f"encoder.layer.0.mlp.down_proj.{part}"]
    converted = convert_legacy_state_dict(_to_hub_names(hub), model)
    assert converted.keys() == sd.keys()
    assert all(torch.equal(converted[k], sd[k]) for k in sd)


def test_bf16_autocast_path_matches_float32(dino, monkeypatch):
    """CUDA runs under bf16 autocast; exercise the same code on the CPU's bf16 autocast."""
    import fmbseg.models.dino as dino_module

    images = torch.rand(1, 3, 42, 56)
    f32 = dino.features(images)
    monkeypatch.setattr(dino_module, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    f16 = dino.features(images)
    assert f16.dtype == torch.float32 and f16.shape == f32.shape
    cos = torch.nn.functional.cosine_similarity(f16, f32, dim=-1).min().item()
    print(f"\nbf16 vs fp32 min cosine: {cos:.4f}")
    assert cos > 0.98


def test_hub_names_load_like_transformers_from_pretrained(tmp_path):
    """A Hub-layout model.safetensors (pre-transformers-5 names, as facebook/dinov2-* ship) gives the same weights
    and features through make_dino as through transformers' own from_pretrained (its own key conversion)."""
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    from fmbseg.models.registry import DINO_ARCHS

    torch.manual_seed(3)
    arch = DINO_ARCHS["tiny"]
    source = build_dino(arch)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hub = {k: v.contiguous() for k, v in _to_hub_names(source.state_dict()).items()}
    assert "encoder.layer.0.layer_scale1.lambda1" in hub and hub["embeddings.mask_token"].shape == (1, 64)
    save_file(hub, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    arch.config().save_pretrained(tmp_path)
    ref = Dinov2Model.from_pretrained(tmp_path).eval()
    ours = make_dino("tiny", device="cpu", weights=str(tmp_path / "model.safetensors"))
    ref_sd, our_sd = ref.state_dict(), ours.model.state_dict()
    assert ref_sd.keys() == our_sd.keys() and all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)
    images = torch.rand(2, 3, 42, 70)
    with torch.no_grad():
        want = ref(pixel_values=(images - MEAN) / STD).last_hidden_state[:, 1:].reshape(2, 3, 5, 64)
    assert torch.allclose(ours.features(images), want, atol=1e-6)
