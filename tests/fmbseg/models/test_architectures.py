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
