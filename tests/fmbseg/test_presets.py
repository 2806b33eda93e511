"""Presets: the registry, seeded tiny models identical across processes, random-init and oracle wiring."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types

import pytest
import torch

from fmbseg.presets import PRESETS, get_preset, make_clip, make_dino, make_sam, preset_info, stage1_overrides

_DIGEST = """
import hashlib, torch
from fmbseg.presets import make_clip, make_sam, make_dino
def digest(module):
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
print(digest(make_clip('tiny', 'cpu').model), digest(make_sam('tiny', 'cpu').sam), digest(make_dino('tiny', 'cpu').model))
"""


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_registry_holds_the_four_presets_with_paper_models():
    assert list(PRESETS) == ["paper", "base", "tiny", "oracle"]
    paper = preset_info("paper")
    assert paper["clip"]["model_id"] == "open_clip:ViT-L-14/openai"
    assert paper["sam"]["checkpoint"]["filename"] == "sam_vit_h_4b8939.pth"
    assert paper["sam"]["checkpoint"]["sha256"] == "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"
    assert paper["dino"]["checkpoint"]["url"].startswith("https://huggingface.co/facebook/dinov2-large/")
    base = preset_info("base")
    assert base["sam"]["checkpoint"]["sha256"] == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    assert base["clip"]["arch"] == "ViT-B-16" and base["dino"]["model_id"] == "transformers:facebook/dinov2-base"
    for name in PRESETS:
        json.dumps(preset_info(name))  # goes into campaign.json as is
    with pytest.raises(ValueError, match="unknown preset 'huge'.*paper, base, tiny, oracle"):
        get_preset("huge")


def test_stage1_overrides():
    assert stage1_overrides("paper") == {} and stage1_overrides("base") == {}
    tiny = stage1_overrides("tiny")
    assert tiny == {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "min_area_frac": 0.0}
    tiny["points_per_side"] = 99  # a copy: callers may merge into it
    assert stage1_overrides("tiny")["points_per_side"] == 8


def test_tiny_models_are_identical_in_every_process_and_leave_the_rng_alone():
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    models = (make_clip("tiny", "cpu"), make_sam("tiny", "cpu"), make_dino("tiny", "cpu"))
    assert torch.equal(torch.rand(3), expected_next)
    assert tuple(m.model_id for m in models) == ("tiny-clip", "tiny-sam", "tiny-dino")
    here = (_digest(models[0].model), _digest(models[1].sam), _digest(models[2].model))
    out = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, check=True, timeout=120)
    there = tuple(out.stdout.split())
    print(f"\ntiny state-dict sha256 (clip, sam, dino): {[d[:12] for d in here]}")
    assert there == here


def test_random_init_skips_weight_lookup(monkeypatch, tmp_path):
    """`random_init` keeps the seeded init of the preset's architecture and never looks for a checkpoint (the
    weights directory is empty and downloads are off, so a lookup would raise). The base architecture is swapped
    for a narrow one here to keep the test fast; full widths are checked on the meta device elsewhere."""
    from fmbseg.models import registry
    from fmbseg.models.dino import DinoArch

    monkeypatch.setenv("FMBSEG_OFFLINE", "1")
    monkeypatch.setenv("FMBSEG_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setitem(registry.DINO_ARCHS, "dinov2-base", DinoArch("dinov2-base", 128, 1, 2))
    dino = make_dino("base", device="cpu", random_init=True)
    assert dino.model_id == "transformers:facebook/dinov2-base/random-init" and dino.weights_sha256 is None
    assert dino.features(torch.rand(1, 3, 28, 42)).shape == (1, 2, 3, 128)
    again = make_dino("base", device="cpu", random_init=True)
    assert _digest(again.model) == _digest(dino.model)  # seeded: benchmarks compare like with like
    with pytest.raises(ValueError, match="not both"):
        make_dino("base", device="cpu", weights=str(tmp_path / "x.pt"), random_init=True)
    with pytest.raises(FileNotFoundError, match="dinov2-base.safetensors"):
        make_dino("base", device="cpu")


def test_oracle_preset_delegates_to_the_testing_oracle(monkeypatch):
    calls = []
    fake = types.ModuleType("fmbseg.testing.oracle")
    for role in ("clip", "sam", "dino"):
        setattr(fake, f"build_oracle_{role}", lambda device, role=role, **kw: calls.append((role, device)) or role)
    monkeypatch.setitem(sys.modules, "fmbseg.testing.oracle", fake)
    import fmbseg.testing

    monkeypatch.setattr(fmbseg.testing, "oracle", fake, raising=False)
    assert (make_clip("oracle", "cpu"), make_sam("oracle", "cpu"), make_dino("oracle", "cpu")) == ("clip", "sam", "dino")
    assert calls == [("clip", torch.device("cpu")), ("sam", torch.device("cpu")), ("dino", torch.device("cpu"))]
    with pytest.raises(ValueError, match="oracle preset has no weights"):
        make_clip("oracle", "cpu", weights="x.pt")
    assert preset_info("oracle")["clip"]["model_id"] == "oracle-clip"


def test_bad_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        make_dino("tiny", device="tpu")
