"""A campaign.json written before a Stage-1 setting existed keeps its meaning: its shards are labelled as its first
ones were, it can be extended with the settings it was labelled with, and other settings are refused by name."""

import shutil

import pytest

from fmbseg.testing.world import write_world
from stages.label import LabelConfig, label_shard, plan_campaign, run_label
from storage.campaign import read_manifest, write_manifest
from storage.fs import CampaignRoot
from storage.reader import CampaignReader

NEW_FIELDS = ("point_outputs", "stage12_undetected")


def test_old_campaign_keeps_its_meaning_and_can_be_extended(tmp_path):
    write_world(tmp_path / "w", 3, seed=5, sizes=((96, 128),), formats=("png",))
    images, camp = tmp_path / "w" / "images", tmp_path / "camp"
    cfg = dict(images=str(images), vocab=str(tmp_path / "w" / "classes.txt"), campaign=str(camp), preset="oracle",
               device="cpu", shard_size=2)
    shards = plan_campaign(LabelConfig(**cfg))
    root = CampaignRoot(str(camp))
    old = read_manifest(root)
    for name in NEW_FIELDS:  # what an fmbseg from before these settings wrote
        old.stage1.pop(name)
    write_manifest(root, old)
    for sid in shards:
        label_shard(str(camp), sid, device="cpu")
    done_before = {sid: (camp / "done" / f"{sid:06d}.json").read_bytes() for sid in shards}

    # New images, the settings the campaign was labelled with: accepted, old shards untouched, hash unchanged.
    shutil.copy(images / "world_0000.png", images / "world_0100.png")
    s = run_label(LabelConfig(**cfg, stage1={"point_outputs": "multimask"}), progress=False)
    assert s["shards_labelled"] == 1 and s["shards_skipped"] == len(shards)
    now = read_manifest(root)
    assert now.stage1 == old.stage1 and now.stage1_hash() == old.stage1_hash()
    assert all((camp / "done" / f"{sid:06d}.json").read_bytes() == b for sid, b in done_before.items())
    assert len(CampaignReader(str(camp)).images()) == 4

    # Today's defaults mean something else for this campaign: refused, naming the setting.
    with pytest.raises(ValueError, match=r"stage1\.point_outputs: \"multimask\" -> \"all4\""):
        plan_campaign(LabelConfig(**cfg))
