"""Presets: named configurations of the three models (DESIGN §3).

| preset | CLIP               | SAM   | DINOv2                           | weights                 |
|--------|--------------------|-------|----------------------------------|-------------------------|
| paper  | ViT-L/14 (openai)  | ViT-H | ViT-L/14 (facebook/dinov2-large) | local or downloaded     |
| base   | ViT-B/16 (openai)  | ViT-B | ViT-B/14 (facebook/dinov2-base)  | local or downloaded     |
| tiny   | the same classes at toy widths, SAM at 256 px                    | seeded random, offline  |
| oracle | synthetic-world stand-ins (`fmbseg.testing.oracle`)              | none                    |

`make_clip/make_sam/make_dino(preset, device="auto", weights=None, random_init=False)` build the architecture
(`make_clip` also takes `dense_mode`: maskclip, clearclip or sclip),
then load weights (an explicit `weights` path, else the registry's checkpoint, see `fmbseg.models.weights`).
`random_init=True` skips loading and keeps a seeded random init (benchmarks of full-width architectures);
`tiny` is always seeded random unless `weights` is given. Seeds are fixed per (preset, role), so every process
builds identical models.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from fmbseg.device import resolve_device


@dataclass(frozen=True)
class RoleSpec:
    """One model of a preset: its architecture name in `fmbseg.models.registry` and its checkpoint key
    (`None`: no pretrained checkpoint exists, the model is seeded random); `model_id` names it in outputs."""

    arch: str
    checkpoint: str | None
    model_id: str


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    clip: RoleSpec | None
    sam: RoleSpec | None
    dino: RoleSpec | None
    stage1: dict[str, Any] = field(default_factory=dict, hash=False)
    oracle: bool = False


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        "FMbSeg paper models: CLIP ViT-L/14 (openai), SAM ViT-H, DINOv2 ViT-L/14",
        clip=RoleSpec("ViT-L-14", "open_clip:ViT-L-14/openai", "open_clip:ViT-L-14/openai"),
        sam=RoleSpec("vit_h", "segment_anything:vit_h", "segment_anything:vit_h"),
        dino=RoleSpec("dinov2-large", "transformers:facebook/dinov2-large", "transformers:facebook/dinov2-large"),
    ),
    "base": Preset(
        "base",
        "smaller real models: CLIP ViT-B/16 (openai), SAM ViT-B, DINOv2 ViT-B/14",
        clip=RoleSpec("ViT-B-16", "open_clip:ViT-B-16/openai", "open_clip:ViT-B-16/openai"),
        sam=RoleSpec("vit_b", "segment_anything:vit_b", "segment_anything:vit_b"),
        dino=RoleSpec("dinov2-base", "transformers:facebook/dinov2-base", "transformers:facebook/dinov2-base"),
    ),
    "tiny": Preset(
        "tiny",
        "the real model classes at toy widths with seeded random weights (offline smoke runs)",
        clip=RoleSpec("tiny", None, "tiny-clip"),
        sam=RoleSpec("tiny", None, "tiny-sam"),
        dino=RoleSpec("tiny", None, "tiny-dino"),
        # Random weights predict arbitrary IoU/stability: filters at 0 so the pipeline still sees masks.
        stage1=dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area_frac=0.0),
    ),
    "oracle": Preset(
        "oracle",
        "synthetic-world stand-ins that know the planted answer (fmbseg.testing.oracle)",
        clip=None,
        sam=None,
        dino=None,
        oracle=True,
    ),
}


# The preset names as a type (flow parameters, CLI choices), built from the registry above.
PresetName = Literal[tuple(PRESETS)]


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is a ValueError with "did you mean" against the presets."""
    if name not in PRESETS:
        from fmbseg.suggest import did_you_mean

        raise ValueError(f"unknown preset {name!r}; {did_you_mean(name, PRESETS, 'presets')}")
    return PRESETS[name]


def stage1_overrides(preset: str) -> dict[str, Any]:
    """Stage-1 settings the preset needs (a copy), e.g. tiny: 8x8 points and filters at 0."""
    return dict(get_preset(preset).stage1)


def role_seed(preset: str, role: str) -> int:
    """The fixed seed of a preset's random init (stable across processes and Python hash seeds)."""
    return zlib.crc32(f"fmbseg:{preset}:{role}".encode())


def _seeded_build(role: str, arch: str, seed: int) -> torch.nn.Module:
    from fmbseg.models.registry import build

    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            return build(role, arch)


def _make(
    role: str,
    preset: str,
    device: str | torch.device,
    weights: str | None,
    random_init: bool,
    wrap: Callable[[torch.nn.Module, str, torch.device, str | None], Any],
    oracle_kwargs: dict[str, Any] | None = None,
):
    from fmbseg.models.registry import PRETRAINED
    from fmbseg.models.weights import existing_file, load_weights, resolve_weights

    p = get_preset(preset)
    if weights is not None and random_init:
        raise ValueError("give either weights=PATH or random_init=True, not both")
    dev = resolve_device(device)
    if p.oracle:
        if weights is not None:
            raise ValueError("the oracle preset has no weights; do not pass weights=")
        import fmbseg.testing.oracle as oracle

        return getattr(oracle, f"build_oracle_{role}")(dev, **(oracle_kwargs or {}))
    spec: RoleSpec = getattr(p, role)
    what = f"{preset} {role} ({spec.arch})"
    entry = PRETRAINED[spec.checkpoint] if spec.checkpoint else None
    model_id, sha, path = spec.model_id, None, None
    # Find the file before building: a missing checkpoint fails fast, not after a full-width random init.
    if weights is not None or (entry is not None and not random_init):
        path = resolve_weights(entry, weights) if entry is not None else existing_file(weights, what)
    elif entry is not None:
        model_id = f"{spec.model_id}/random-init"
    module = _seeded_build(role, spec.arch, role_seed(preset, role))
    if path is not None:
        strip = entry.strip_prefixes if entry is not None else ()
        sha = load_weights(module, path, what, strip, _CONVERTERS.get(role))
    return wrap(module, model_id, dev, sha)


def _convert_dino(sd, module):
    from fmbseg.models.dino import convert_legacy_state_dict

    return convert_legacy_state_dict(sd, module)


# Key renamings applied before the strict check (Hub DINOv2 checkpoints predate transformers 5's names).
_CONVERTERS = {"dino": _convert_dino}


def make_clip(preset: str, device: str | torch.device = "auto", weights: str | None = None, random_init: bool = False,
              dense_mode: str = "maskclip"):
    """-> a `ClipModel` of `preset` (see module docstring for how weights are found). `dense_mode`: the dense
    CLIP path, one of `fmbseg.models.clip.DENSE_MODES` (the oracle accepts any and ignores it)."""
    from fmbseg.models.clip import OpenClipModel, check_dense_mode

    check_dense_mode(dense_mode)
    return _make("clip", preset, device, weights, random_init,
                 lambda m, i, d, s: OpenClipModel(m, i, d, s, dense_mode=dense_mode), {"dense_mode": dense_mode})


def make_sam(preset: str, device: str | torch.device = "auto", weights: str | None = None, random_init: bool = False,
             *, fused_attention: bool = True, compile: bool = False, points_per_batch: int | None = None):
    """-> a `SamModel` of `preset`. Execution settings (none changes outputs beyond float rounding, none is part
    of the campaign's config hash; the oracle ignores them): `fused_attention` (SDPA in the image encoder, default
    on), `compile` (torch.compile the image encoder, for GPU runs), `points_per_batch` (automatic-mask decode
    batch; default by device). See `fmbseg.models.sam.SegmentAnythingModel`."""
    from fmbseg.models.sam import SegmentAnythingModel

    opts = dict(fused_attention=fused_attention, compile=compile, points_per_batch=points_per_batch)
    return _make("sam", preset, device, weights, random_init,
                 lambda m, i, d, s: SegmentAnythingModel(m, i, d, s, **opts))


def make_dino(preset: str, device: str | torch.device = "auto", weights: str | None = None, random_init: bool = False):
    """-> a `DinoModel` of `preset`."""
    from fmbseg.models.dino import HfDinoModel

    return _make("dino", preset, device, weights, random_init, lambda m, i, d, s: HfDinoModel(m, i, d, s))


def preset_info(preset: str) -> dict[str, Any]:
    """JSON-able description: per role the model id, architecture and checkpoint source (for campaign.json)."""
    from fmbseg.models.registry import PRETRAINED

    p = get_preset(preset)
    info: dict[str, Any] = {"preset": p.name, "description": p.description, "stage1_overrides": dict(p.stage1)}
    for role in ("clip", "sam", "dino"):
        spec: RoleSpec | None = getattr(p, role)
        if spec is None:
            info[role] = {"model_id": f"oracle-{role}", "arch": None, "checkpoint": None}
            continue
        entry = PRETRAINED.get(spec.checkpoint) if spec.checkpoint else None
        info[role] = {
            "model_id": spec.model_id,
            "arch": spec.arch,
            "checkpoint": None
            if entry is None
            else {"key": entry.key, "filename": entry.filename, "url": entry.url, "source": entry.source, "sha256": entry.sha256},
            "random_seed": role_seed(p.name, role) if entry is None else None,
        }
    return info


def preset_weights(preset: str) -> list[tuple[str, "WeightsEntry"]]:
    """[(role, checkpoint entry)] of every pretrained file `preset` loads, in role order (clip, sam, dino);
    empty for presets without checkpoints (`tiny`, `oracle`)."""
    from fmbseg.models.registry import PRETRAINED

    p = get_preset(preset)
    out = []
    for role in ("clip", "sam", "dino"):
        spec: RoleSpec | None = getattr(p, role)
        if spec is not None and spec.checkpoint:
            out.append((role, PRETRAINED[spec.checkpoint]))
    return out
