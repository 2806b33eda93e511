"""The `paper` and `base` architectures, built on the meta device, match the stored parameter lists.

A failure here means the architecture changed (a library update or an edit): real checkpoints would stop loading.
If the change is deliberate, regenerate with `python -m fmbseg.models.registry --dump-arch` and commit the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from fmbseg.models.registry import CHECKED_ARCHS, arch_file, meta_signature, stored_signature
from fmbseg.presets import PRESETS

# State-dict element counts in millions, an independent check on the stored lists: CLIP ViT-L/14 427.6 M and
# ViT-B/16 149.6 M are open_clip's reported sizes; DINOv2 ViT-L/14 ~304 M and ViT-B/14 ~86.6 M and SAM ViT-H
# ~641 M / ViT-B ~94 M (image encoder + prompt encoder + decoder) match the released checkpoints' sizes.
EXPECTED_MILLIONS = {
    ("clip", "ViT-L-14"): 427.6,
    ("clip", "ViT-B-16"): 149.6,
    ("sam", "vit_h"): 641.1,
    ("sam", "vit_b"): 93.7,
    ("dino", "dinov2-large"): 304.4,
    ("dino", "dinov2-base"): 86.6,
}


def test_paper_and_base_presets_use_exactly_the_checked_architectures():
    used = {(role, getattr(PRESETS[p], role).arch) for p in ("paper", "base") for role in ("clip", "sam", "dino")}
    assert used == set(CHECKED_ARCHS)


@pytest.mark.parametrize("role,name", CHECKED_ARCHS, ids=[f"{r}-{n}" for r, n in CHECKED_ARCHS])
def test_meta_architecture_matches_stored_list(role, name):
    built = meta_signature(role, name)
    stored = stored_signature(role, name)
    built_d, stored_d = {k: s for k, s in built}, {k: s for k, s in stored}
    missing = [k for k in stored_d if k not in built_d]
    extra = [k for k in built_d if k not in stored_d]
    reshaped = [(k, stored_d[k], built_d[k]) for k in stored_d if k in built_d and stored_d[k] != built_d[k]]
    assert not (missing or extra or reshaped), (
        f"{role} {name} changed: missing {missing[:5]} ({len(missing)}), new {extra[:5]} ({len(extra)}), "
        f"reshaped {reshaped[:3]} ({len(reshaped)})"
    )
    assert [k for k, _ in built] == [k for k, _ in stored]  # same order too
    n = sum(torch.Size(s).numel() for _, s in built)
    with open(arch_file(role, name), encoding="utf-8") as f:
        assert json.load(f)["n_elements"] == n
    print(f"\n{role} {name}: {len(built)} tensors, {n / 1e6:.1f} M elements")
    assert n / 1e6 == pytest.approx(EXPECTED_MILLIONS[(role, name)], abs=0.1)


@pytest.mark.parametrize("name", ["ViT-L-14", "ViT-B-16"])
def test_written_out_clip_configs_equal_open_clips_own(name):
    from fmbseg.models.clip import ClipArch
    from fmbseg.models.registry import CLIP_ARCHS

    assert CLIP_ARCHS[name] == ClipArch.from_open_clip(name)
    assert CLIP_ARCHS[name].quick_gelu  # OpenAI weights were trained with QuickGELU


# -- the architectures equal the libraries' own builders for the released weights -------------------------------


@pytest.mark.parametrize("name", ["ViT-L-14", "ViT-B-16"])
def test_clip_matches_open_clips_openai_model_and_source(name):
    """What `open_clip.create_model(name, pretrained="openai")` builds: QuickGELU (OpenAI trained with it; plain GELU
    would silently change every feature), the same modules, the OpenAI pixel statistics, the same Hub file."""
    import open_clip

    from fmbseg.models.clip import OPENAI_MEAN, OPENAI_STD
    from fmbseg.models.registry import PRETRAINED, build

    cfg = open_clip.get_pretrained_cfg(name, "openai")
    assert cfg["quick_gelu"] is True
    assert tuple(cfg["mean"]) == OPENAI_MEAN and tuple(cfg["std"]) == OPENAI_STD
    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, quick_gelu=cfg["quick_gelu"], device="meta")
        ours = build("clip", name)
    assert repr(ours) == repr(ref)  # module types (QuickGELU), widths, norms' eps, ...
    assert type(ours.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert type(ours.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    entry = PRETRAINED[f"open_clip:{name}/openai"]
    # open_clip prefers open_clip_model.safetensors in this repo, falling back to open_clip_pytorch_model.bin.
    assert entry.hf_repo == cfg["hf_hub"].rstrip("/")
    assert entry.hf_filename == open_clip.constants.HF_SAFE_WEIGHTS_NAME
    assert open_clip.constants.HF_WEIGHTS_NAME in entry.hf_alt_filenames


@pytest.mark.parametrize("name", ["vit_h", "vit_b"])
def test_sam_matches_segment_anythings_builder(name):
    from segment_anything import sam_model_registry

    from fmbseg.models.registry import build

    with torch.device("meta"):
        ref, ours = sam_model_registry[name](), build("sam", name)
    assert repr(ours) == repr(ref)
    # Settings a repr does not show.
    assert ours.image_encoder.img_size == ref.image_encoder.img_size == 1024
    assert [b.window_size for b in ours.image_encoder.blocks] == [b.window_size for b in ref.image_encoder.blocks]
    assert ours.prompt_encoder.image_embedding_size == ref.prompt_encoder.image_embedding_size
    assert ours.mask_threshold == ref.mask_threshold and ours.image_format == ref.image_format == "RGB"
    from fmbseg.models.registry import SAM_ARCHS

    assert SAM_ARCHS[name].pixel_mean == (123.675, 116.28, 103.53)
    assert SAM_ARCHS[name].pixel_std == (58.395, 57.12, 57.375)


# facebook/dinov2-{base,large} config.json values (the fields that change the computation).
_HUB_DINO_CONFIG = dict(
    hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0, mlp_ratio=4, qkv_bias=True,
    use_swiglu_ffn=False, patch_size=14, image_size=518, num_channels=3,
)


@pytest.mark.parametrize("name,dims", [("dinov2-base", (768, 12, 12)), ("dinov2-large", (1024, 24, 16))])
def test_dino_config_matches_the_hub_config(name, dims):
    from fmbseg.models.registry import DINO_ARCHS

    cfg = DINO_ARCHS[name].config()
    assert type(cfg).__name__ == "Dinov2Config"  # no register tokens
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == dims
    for key, value in _HUB_DINO_CONFIG.items():
        assert getattr(cfg, key) == value, key
