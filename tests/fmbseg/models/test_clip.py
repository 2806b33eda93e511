"""The open_clip adapter: MaskCLIP (and ClearCLIP / SCLIP) dense features against hand-written references, text
embeddings, shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fmbseg.models.base import ClipModel
from fmbseg.models.clip import DENSE_MODES, ClipArch, OpenClipModel, build_clip, dense_features
from fmbseg.presets import make_clip

TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)


def _arch(image_size=64, patch=8, width=64, layers=3, **vision) -> ClipArch:
    return ClipArch("test", 24, dict(image_size=image_size, patch_size=patch, width=width, layers=layers,
                                     head_width=32, **vision), dict(TEXT))


def _random_clip(arch: ClipArch, seed: int = 0):
    torch.manual_seed(seed)
    model = build_clip(arch)
    # Perturb the LayerNorm affines and biases too: at their defaults (1, 0) a swapped norm would go unnoticed.
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _ln(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _tokens_before_last_block(model, images):
    """(B, 1 + gh*gw, C) tokens entering the last vision block, written with explicit matrices; and (gh, gw)."""
    v = model.visual
    b, _, h, w = images.shape
    p = v.patch_size[0]
    gh, gw = h // p, w // p
    patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, 3, gh, gw, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, gh * gw, 3 * p * p)
    tokens = patches @ v.conv1.weight.reshape(v.conv1.weight.shape[0], -1).T
    pos = v.positional_embedding
    n = v.grid_size
    if (gh, gw) != tuple(n):
        grid = pos[1:].T.reshape(1, -1, n[0], n[1])
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.reshape(-1, gh * gw).T])
    x = torch.cat([v.class_embedding.expand(b, 1, -1), tokens], dim=1) + pos
    x = _ln(x, v.ln_pre)
    for blk in v.transformer.resblocks[:-1]:
        x = blk(x)
    return x, (gh, gw)


def _mlp(last, x):
    hid = x @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias
    return last.mlp.gelu(hid) @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias


def _reference_maskclip(model, images):
    """MaskCLIP written from DESIGN §3 with explicit matrices (independent of fmbseg.models.clip)."""
    v = model.visual
    b = images.shape[0]
    x, (gh, gw) = _tokens_before_last_block(model, images)
    last = v.transformer.resblocks[-1]
    gamma1 = last.ls_1.gamma if hasattr(last.ls_1, "gamma") else 1.0
    gamma2 = last.ls_2.gamma if hasattr(last.ls_2, "gamma") else 1.0
    c = v.width if hasattr(v, "width") else x.shape[-1]
    w_v = last.attn.in_proj_weight[2 * c :]
    b_v = last.attn.in_proj_bias[2 * c :]
    y = _ln(x, last.ln_1)
    val = (y @ w_v.T + b_v) @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    val = x + gamma1 * val
    val = val + gamma2 * _mlp(last, _ln(val, last.ln_2))
    dense = _ln(val[:, 1:], v.ln_post) @ v.proj
    return dense.reshape(b, gh, gw, -1)


def _softmax_rows(s):
    e = (s - s.max(dim=-1, keepdim=True).values).exp()
    return e / e.sum(dim=-1, keepdim=True)


def _reference_correlative(model, images, mode):
    """ClearCLIP / SCLIP last block with explicit per-head loops over all tokens (CLS included):
    clearclip: a = out_proj(softmax(q_h q_h^T / sqrt(d)) v_h), dense = ln_post(a) proj (no residual, no FFN);
    sclip: A_h = softmax(q_h q_h^T / sqrt(d)) + softmax(k_h k_h^T / sqrt(d)), a = out_proj(A v),
    val = x + ls_1 a, val += ls_2 mlp(ln_2 val), dense = ln_post(val) proj (SCLIP keeps residual and FFN)."""
    v = model.visual
    b = images.shape[0]
    x, (gh, gw) = _tokens_before_last_block(model, images)
    last = v.transformer.resblocks[-1]
    c = x.shape[-1]
    heads = last.attn.num_heads
    d = c // heads
    w, bias = last.attn.in_proj_weight, last.attn.in_proj_bias
    y = _ln(x, last.ln_1)
    q, k, val = (y @ w[i * c : (i + 1) * c].T + bias[i * c : (i + 1) * c] for i in range(3))
    per_head = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, val))
        attn = _softmax_rows(qh @ qh.transpose(1, 2) / math.sqrt(d))
        if mode == "sclip":
            attn = attn + _softmax_rows(kh @ kh.transpose(1, 2) / math.sqrt(d))
        per_head.append(attn @ vh)
    a = torch.cat(per_head, dim=-1) @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    if mode == "clearclip":
        out = a
    else:
        gamma1 = last.ls_1.gamma if hasattr(last.ls_1, "gamma") else 1.0
        gamma2 = last.ls_2.gamma if hasattr(last.ls_2, "gamma") else 1.0
        out = x + gamma1 * a
        out = out + gamma2 * _mlp(last, _ln(out, last.ln_2))
    dense = _ln(out[:, 1:], v.ln_post) @ v.proj
    return dense.reshape(b, gh, gw, -1)


@pytest.mark.parametrize("vision", [{}, {"ls_init_value": 0.5}], ids=["plain", "layer-scale"])
def test_dense_features_equal_handwritten_maskclip_at_native_size(vision):
    model = _random_clip(_arch(**vision))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cls, dense = dense_features(model, images)
        ref_dense = _reference_maskclip(model, images)
        ref_cls = model.encode_image(images)
    assert cls.shape == (2, 24) and dense.shape == (2, 8, 8, 24)
    err_cls = (cls - ref_cls).abs().max().item()
    err_dense = (dense - ref_dense).abs().max().item()
    print(f"\nnative 64x64 ({'ls' if vision else 'plain'}): max |cls - encode_image| = {err_cls:.2e}, "
          f"max |dense - reference| = {err_dense:.2e} (dense scale {ref_dense.abs().mean():.2f})")
    assert torch.allclose(cls, ref_cls, atol=1e-5, rtol=1e-5)
    assert torch.allclose(dense, ref_dense, atol=1e-5, rtol=1e-5)
    # The value path is not the ordinary token output: guard against computing the wrong thing twice.
    with torch.no_grad():
        ordinary = model.visual.forward_intermediates(images, indices=1, normalize_intermediates=True,
                                                      output_fmt="NLC")["image_intermediates"][0] @ model.visual.proj
    assert not torch.allclose(dense.reshape(2, 64, -1), ordinary, atol=1e-3)


def test_dense_features_at_non_native_size_vit_b16_geometry():
    """ViT-B/16 geometry (224 px native, 16 px patches) at small width, fed 448x336 (H x W)."""
    model = _random_clip(_arch(image_size=224, patch=16, width=64, layers=2))
    images = torch.randn(1, 3, 448, 336)
    with torch.no_grad():
        cls, dense = dense_features(model, images)
        ref = _reference_maskclip(model, images)
    print(f"\n448x336 input -> dense grid {tuple(dense.shape[1:3])}, max |dense - reference| = "
          f"{(dense - ref).abs().max():.2e}")
    assert dense.shape == (1, 28, 21, 24) and cls.shape == (1, 24)
    assert torch.allclose(dense, ref, atol=1e-5, rtol=1e-5)
    # A second call at the same grid uses the cached embedding; new weights invalidate it.
    with torch.no_grad():
        again = dense_features(model, images)[1]
        model.visual.positional_embedding.add_(1.0)
        changed = dense_features(model, images)[1]
    assert torch.equal(again, dense)
    assert not torch.allclose(changed, dense)


@pytest.mark.parametrize("mode", ["clearclip", "sclip"])
@pytest.mark.parametrize("vision,size", [({}, (64, 64)), ({"ls_init_value": 0.5}, (64, 64)), ({}, (48, 80))],
                         ids=["plain", "layer-scale", "non-native"])
def test_dense_modes_equal_handwritten_formulas(mode, vision, size):
    model = _random_clip(_arch(**vision))
    assert model.visual.transformer.resblocks[-1].attn.num_heads == 2  # per-head splitting is exercised
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        cls, dense = dense_features(model, images, mode)
        ref = _reference_correlative(model, images, mode)
        ref_cls, maskclip = dense_features(model, images)
        if size == (64, 64):
            assert torch.allclose(ref_cls, model.encode_image(images), atol=1e-5, rtol=1e-5)
    gh, gw = size[0] // 8, size[1] // 8
    print(f"\n{mode} {size}: max |dense - reference| = {(dense - ref).abs().max():.2e}")
    assert dense.shape == (2, gh, gw, 24)
    assert torch.allclose(dense, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(cls, ref_cls, atol=1e-5, rtol=1e-5)  # CLS is the ordinary path in every mode
    assert not torch.allclose(dense, maskclip, atol=1e-3)


def test_dense_modes_differ_and_maskclip_is_the_default():
    model = _random_clip(_arch())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        default = dense_features(model, images)
        out = {m: dense_features(model, images, m) for m in DENSE_MODES}
    assert DENSE_MODES == ("maskclip", "clearclip", "sclip")
    assert torch.equal(default[0], out["maskclip"][0]) and torch.equal(default[1], out["maskclip"][1])
    assert not torch.allclose(out["clearclip"][1], out["sclip"][1], atol=1e-3)
    for m in DENSE_MODES:
        assert torch.equal(out[m][0], default[0])
    with pytest.raises(ValueError, match="unknown dense CLIP mode 'gem'.*maskclip, clearclip, sclip"):
        dense_features(model, images, "gem")


def test_adapter_dense_mode_reaches_encode_crops_and_encode_dense():
    for mode in DENSE_MODES:
        clip = make_clip("tiny", device="cpu", dense_mode=mode)
        assert clip.dense_mode == mode
        crops, images = torch.rand(2, 3, 64, 64), torch.rand(1, 3, 48, 96)
        _, dense = clip.encode_crops(crops)
        with torch.no_grad():
            ref = F.normalize(dense_features(clip.model, clip._normalise(crops), mode)[1], dim=-1)
            ref_full = F.normalize(dense_features(clip.model, clip._normalise(images), mode)[1], dim=-1)
        assert torch.allclose(dense, ref, atol=1e-6)
        assert torch.allclose(clip.encode_dense(images), ref_full, atol=1e-6)
    assert make_clip("tiny", device="cpu").dense_mode == "maskclip"
    assert make_clip("oracle", device="cpu", dense_mode="sclip").dense_mode == "sclip"
    with pytest.raises(ValueError, match="unknown dense CLIP mode 'bogus'.*maskclip, clearclip, sclip"):
        make_clip("tiny", device="cpu", dense_mode="bogus")
    with pytest.raises(ValueError, match="unknown dense CLIP mode"):
        OpenClipModel(_random_clip(_arch()), "x", torch.device("cpu"), dense_mode="MaskCLIP")


def test_dense_features_reject_sizes_off_the_patch_grid():
    model = _random_clip(_arch())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dense_features(model, torch.randn(1, 3, 60, 64))


@pytest.fixture(scope="module")
def tiny_clip():
    return make_clip("tiny", device="cpu")


def test_tiny_clip_adapter_shapes_and_normalisation(tiny_clip):
    assert isinstance(tiny_clip, ClipModel)
    s, p, d = tiny_clip.input_size, tiny_clip.patch_size, tiny_clip.embed_dim
    assert (s, p, d) == (64, 8, 32)
    cls, dense = tiny_clip.encode_crops(torch.rand(3, 3, s, s))
    assert cls.shape == (3, d) and dense.shape == (3, s // p, s // p, d)
    assert torch.allclose(cls.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(dense.norm(dim=-1), torch.ones(3, 8, 8), atol=1e-5)
    out = tiny_clip.encode_dense(torch.rand(2, 3, 48, 96))
    assert out.shape == (2, 6, 12, d)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 6, 12), atol=1e-5)
    with pytest.raises(ValueError, match="encode_dense"):
        tiny_clip.encode_crops(torch.rand(1, 3, 48, 48))


def test_crops_are_normalised_with_openai_statistics(tiny_clip):
    crops = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = F.normalize(tiny_clip.model.encode_image((crops - mean) / std), dim=-1)
    cls, _ = tiny_clip.encode_crops(crops)
    assert torch.allclose(cls, ref, atol=1e-5)


def test_encode_text_templates_synonyms_and_cache(tiny_clip):
    long_name = "a deliberately long class name that overflows the sixteen token context of the tiny text tower"
    t = tiny_clip.encode_text(["red", "green", long_name])
    assert t.shape == (3, 32) and torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert tiny_clip.encode_text(["red", "green", long_name]) is t  # cached per vocabulary
    assert not torch.allclose(t[0], t[1])

    templates = ("a photo of a {}.", "a drawing of a {}.")
    per = [tiny_clip.encode_text(["red"], (tpl,))[0] for tpl in templates]
    both = tiny_clip.encode_text(["red"], templates)[0]
    assert torch.allclose(both, F.normalize(per[0] + per[1], dim=-1), atol=1e-5)

    syn = tiny_clip.encode_text([["red", "crimson"]])[0]
    red, crimson = tiny_clip.encode_text(["red", "crimson"])
    assert torch.allclose(syn, F.normalize(red + crimson, dim=-1), atol=1e-5)


def test_encode_text_rejects_bad_input(tiny_clip):
    with pytest.raises(TypeError):
        tiny_clip.encode_text("red")
    with pytest.raises(ValueError, match="non-empty"):
        tiny_clip.encode_text(["red", ""])
    with pytest.raises(ValueError, match="placeholder"):
        tiny_clip.encode_text(["red"], ("a photo",))


def test_tiny_clip_text_tokens_fit_the_context(tiny_clip):
    tokens = tiny_clip.tokenizer(["a photo of a red."])
    assert tokens.shape == (1, 16)
    assert tokens.max().item() == 49407  # end-of-text, the id text pooling looks for
    assert tiny_clip.model.token_embedding.num_embeddings == 49408


def test_bf16_autocast_path_matches_float32(tiny_clip, monkeypatch):
    """CUDA runs under bf16 autocast; exercise the same code on the CPU's bf16 autocast."""
    import fmbseg.models.clip as clip_module

    crops = torch.rand(2, 3, 64, 64)
    cls32, dense32 = tiny_clip.encode_crops(crops)
    text32 = tiny_clip.encode_text(["red", "blue"], ("a {}.",))
    monkeypatch.setattr(clip_module, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    cls16, dense16 = tiny_clip.encode_crops(crops)
    tiny_clip._text_cache.clear()
    text16 = tiny_clip.encode_text(["red", "blue"], ("a {}.",))
    assert cls16.dtype == dense16.dtype == text16.dtype == torch.float32
    cos = [(a * b).sum(-1).min().item() for a, b in ((cls16, cls32), (dense16, dense32), (text16, text32))]
    print(f"\nbf16 vs fp32 min cosine (cls, dense, text): {[round(c, 4) for c in cos]}")
    assert min(cos) > 0.98
