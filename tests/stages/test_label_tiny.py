"""The `tiny` preset (the real model classes at toy widths, seeded random weights) labels a few images end to end."""

import pytest

from fmbseg.testing.world import write_world
from stages.label import LabelConfig, run_label
from storage.reader import CampaignReader
from storage.tables import decode_rle

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_tiny_preset_campaign_produces_masks(tmp_path):
    write_world(tmp_path / "w", 2, seed=1, sizes=((96, 128), (120, 80)), formats=("png", "jpg"))
    cfg = LabelConfig(images=str(tmp_path / "w" / "images"), vocab="red,green,blue,yellow,gray",
                      campaign=str(tmp_path / "c"), preset="tiny", shard_size=1, device="cpu")
    s = run_label(cfg, progress=False)
    print(f"tiny preset: {s['images']} images, {s['masks']} masks, {s['seconds']:.1f} s, timings {s['timings']}")
    assert (s["images"], s["ok"], s["failed"]) == (2, 2, 0)
    assert s["masks"] > 0
    reader = CampaignReader(tmp_path / "c")
    assert reader.manifest.models["clip"]["id"] == "tiny-clip" and reader.manifest.stage1["points_per_side"] == 8
    masks = reader.masks().to_pylist()
    assert len(masks) == s["masks"]
    for m in masks[:20]:
        assert int(decode_rle(m["rle"], m["height"], m["width"]).sum()) == m["area"]
    labels = {i: lab for i, _, lab in reader.iter_labels()}
    assert {i: lab.shape for i, lab in labels.items()} == {"world_0000.png": (96, 128), "world_0001.jpg": (120, 80)}


def test_dense_mode_reaches_the_campaign_and_the_cached_clip(tmp_path):
    from stages import models_cache

    write_world(tmp_path / "w", 1, seed=2, sizes=((64, 80),), formats=("png",))
    base = dict(images=str(tmp_path / "w" / "images"), vocab="red,green,blue", preset="tiny", device="cpu")
    s = run_label(LabelConfig(campaign=str(tmp_path / "c"), stage1={"dense_mode": "clearclip"}, **base),
                  progress=False)
    assert (s["images"], s["ok"]) == (1, 1)
    reader = CampaignReader(tmp_path / "c")
    assert reader.manifest.stage1["dense_mode"] == "clearclip"
    clip, _ = models_cache.get_models("tiny", "cpu", "clearclip")
    assert clip.dense_mode == "clearclip"
    assert models_cache.get_models("tiny", "cpu")[0].dense_mode == "maskclip"  # its own cache entry
    # The default is recorded like any field; another mode is another Stage-1 config.
    run_label(LabelConfig(campaign=str(tmp_path / "d"), **base), progress=False)
    default = CampaignReader(tmp_path / "d").manifest
    assert default.stage1["dense_mode"] == "maskclip" and default.stage1_hash() != reader.manifest.stage1_hash()
    with pytest.raises(ValueError, match=r"stage1\.dense_mode"):
        run_label(LabelConfig(campaign=str(tmp_path / "c"), stage1={"dense_mode": "sclip"}, **base), progress=False)
    with pytest.raises(ValueError, match="dense_mode must be one of maskclip, clearclip, sclip"):
        run_label(LabelConfig(campaign=str(tmp_path / "e"), stage1={"dense_mode": "bad"}, **base), progress=False)
