"""Named architectures and pretrained checkpoints of the three model roles, and the stored architecture lists.

- `CLIP_ARCHS`, `SAM_ARCHS`, `DINO_ARCHS`: architecture name -> spec (built by `fmbseg.models.{clip,sam,dino}`).
- `PRETRAINED`: checkpoint key (also the adapter's `model_id`) -> `WeightsEntry` (source, file name, sha256).
- `fmbseg/data/arch/<role>-<arch>.json`: the state-dict names and shapes of the `paper` and `base` architectures,
  checked by the tests on the `meta` device. Regenerate after a deliberate change with
  `python -m fmbseg.models.registry --dump-arch`.

OpenAI CLIP weights are taken from the open_clip state dicts on Hugging Face (the `timm/*.openai` repositories
open_clip itself downloads for `pretrained="openai"`), not from OpenAI's TorchScript `.pt` archives, which cannot
be read with `weights_only=True`; `python -m fmbseg.models.weights convert-torchscript` converts such a file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fmbseg.models.clip import ClipArch
from fmbseg.models.dino import DinoArch
from fmbseg.models.sam import SamArch
from fmbseg.models.weights import WeightsEntry

ARCH_DIR = Path(__file__).resolve().parent.parent / "data" / "arch"

_TEXT_77 = dict(context_length=77, vocab_size=49408)

CLIP_ARCHS: dict[str, ClipArch] = {
    # open_clip's ViT-L-14 / ViT-B-16 configs, written out so a library update cannot change them silently.
    "ViT-L-14": ClipArch(
        "ViT-L-14", 768,
        dict(image_size=224, layers=24, width=1024, patch_size=14),
        dict(**_TEXT_77, width=768, heads=12, layers=12),
    ),
    "ViT-B-16": ClipArch(
        "ViT-B-16", 512,
        dict(image_size=224, layers=12, width=768, patch_size=16),
        dict(**_TEXT_77, width=512, heads=8, layers=12),
    ),
    # Toy width, real code paths. The vocabulary stays at 49408 because open_clip's tokenizer emits ids up to
    # 49407 (end-of-text, which the 'argmax' text pooling relies on being the largest id); context is shortened.
    "tiny": ClipArch(
        "tiny", 32,
        dict(image_size=64, layers=2, width=64, patch_size=8, head_width=32),
        dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
    ),
}

SAM_ARCHS: dict[str, SamArch] = {
    "vit_h": SamArch("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    "vit_b": SamArch("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "tiny": SamArch(
        "tiny", 32, 2, 2, (1,), image_size=256, window_size=8, prompt_embed_dim=32, decoder_mlp_dim=64,
        decoder_num_heads=2, iou_head_hidden_dim=32, mask_in_chans=8,
    ),
}

DINO_ARCHS: dict[str, DinoArch] = {
    "dinov2-large": DinoArch("dinov2-large", 1024, 24, 16),
    "dinov2-base": DinoArch("dinov2-base", 768, 12, 12),
    # 64 channels so a head count of C/64 (the alignment module's rule) is still >= 1.
    "tiny": DinoArch("tiny", 64, 2, 2, image_size=56),
}

_HF = "https://huggingface.co/{repo}/resolve/main/{file}"


def _open_clip_openai(arch: str, repo: str) -> WeightsEntry:
    file = "open_clip_model.safetensors"
    return WeightsEntry(
        key=f"open_clip:{arch}/openai",
        filename=f"open_clip_{arch}_openai.safetensors",
        url=_HF.format(repo=repo, file=file),
        source=f"open_clip {arch} pretrained='openai' (Hugging Face {repo})",
        hf_repo=repo,
        hf_filename=file,
        # open_clip downloads the safetensors file when it can, else this pickle twin (same keys).
        hf_alt_filenames=("open_clip_pytorch_model.bin",),
    )


def _dinov2(repo: str) -> WeightsEntry:
    return WeightsEntry(
        key=f"transformers:{repo}",
        filename=f"{repo.split('/')[-1]}.safetensors",
        url=_HF.format(repo=repo, file="model.safetensors"),
        source=f"Hugging Face {repo} (transformers Dinov2Model)",
        hf_repo=repo,
        hf_filename="model.safetensors",
        strip_prefixes=("dinov2.",),
    )


PRETRAINED: dict[str, WeightsEntry] = {
    e.key: e
    for e in (
        _open_clip_openai("ViT-L-14", "timm/vit_large_patch14_clip_224.openai"),
        _open_clip_openai("ViT-B-16", "timm/vit_base_patch16_clip_224.openai"),
        WeightsEntry(
            key="segment_anything:vit_h",
            filename="sam_vit_h_4b8939.pth",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            source="segment-anything ViT-H release",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            size_bytes=2564550879,
        ),
        WeightsEntry(
            key="segment_anything:vit_b",
            filename="sam_vit_b_01ec64.pth",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            source="segment-anything ViT-B release",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            size_bytes=375042383,
        ),
        _dinov2("facebook/dinov2-large"),
        _dinov2("facebook/dinov2-base"),
    )
}

ROLES = ("clip", "sam", "dino")
# The architectures whose parameter lists are stored and checked (those of the `paper` and `base` presets).
CHECKED_ARCHS: tuple[tuple[str, str], ...] = (
    ("clip", "ViT-L-14"), ("clip", "ViT-B-16"),
    ("sam", "vit_h"), ("sam", "vit_b"),
    ("dino", "dinov2-large"), ("dino", "dinov2-base"),
)


def arch_spec(role: str, name: str):
    table = {"clip": CLIP_ARCHS, "sam": SAM_ARCHS, "dino": DINO_ARCHS}.get(role)
    if table is None:
        raise ValueError(f"unknown model role {role!r}; use one of {ROLES}")
    if name not in table:
        raise ValueError(f"unknown {role} architecture {name!r}; known: {sorted(table)}")
    return table[name]


def build(role: str, name: str) -> nn.Module:
    """A randomly initialised module of a named architecture (on the current default device)."""
    spec = arch_spec(role, name)
    if role == "clip":
        from fmbseg.models.clip import build_clip

        return build_clip(spec)
    if role == "sam":
        from fmbseg.models.sam import build_sam

        return build_sam(spec)
    from fmbseg.models.dino import build_dino

    return build_dino(spec)


def arch_signature(module: nn.Module) -> list[list]:
    """[[name, [shape...]], ...] of every state-dict entry (what a checkpoint must match), in module order."""
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


def arch_file(role: str, name: str) -> Path:
    return ARCH_DIR / f"{role}-{name}.json"


def meta_signature(role: str, name: str) -> list[list]:
    """The signature of `name` built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return arch_signature(build(role, name))


def stored_signature(role: str, name: str) -> list[list]:
    with open(arch_file(role, name), encoding="utf-8") as f:
        return json.load(f)["tensors"]


def dump_arch(out_dir: Path = ARCH_DIR) -> list[Path]:
    """Write the stored lists of `CHECKED_ARCHS` (run after a deliberate architecture change)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for role, name in CHECKED_ARCHS:
        sig = meta_signature(role, name)
        n_params = sum(int(torch.Size(s).numel()) for _, s in sig)
        path = out_dir / f"{role}-{name}.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"role": role, "arch": name, "n_tensors": len(sig), "n_elements": n_params, "tensors": sig}, f)
            f.write("\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmbseg.models.registry")
    parser.add_argument("--dump-arch", action="store_true", help=f"write the stored architecture lists to {ARCH_DIR}")
    parser.add_argument("--list", action="store_true", help="list pretrained checkpoints and their sources")
    args = parser.parse_args(argv)
    if args.dump_arch:
        for p in dump_arch():
            print(f"wrote {p}")
    if args.list or not args.dump_arch:
        for e in PRETRAINED.values():
            print(f"{e.key:40s} {e.filename:40s} {e.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
