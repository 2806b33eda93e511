"""Committed data is verified (issue 13 items 2, 3, 10, 11): damaged files are caught by readers and `fmbseg verify`,
`--repair` drops just the bad shard, a corrupt marker or shard list never blocks the campaign, a lost shard list
never gives an image a second shard; files follow the umask and are fsynced before their rename."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from storage.campaign import CampaignManifest, read_manifest, write_manifest
from storage.fs import CampaignRoot
from storage.labels import write_label_group
from storage.layout import images_path, labels_group_path, masks_path
from storage.markers import DoneMarker, write_done
from storage.planning import ImageEntry, PlanDamaged, append_shards, planned_shards, read_shard
from storage.reader import CampaignReader
from storage.shard_writer import ShardDamaged, commit_shard, sha256
from storage.tables import table_to_parquet_bytes
from storage.verify import verify_campaign

sys.path.insert(0, str(Path(__file__).parent))
from commit_writer import shard_content  # noqa: E402

VOCAB = ["red", "green", "blue"]


def campaign(path, n_images=6, shard_size=2, commit=(0, 1, 2)) -> CampaignRoot:
    root = CampaignRoot(path)
    write_manifest(root, CampaignManifest(stage1={"a": 1}, vocabulary={"names": VOCAB, "synonyms": [[], [], []]},
                                          preset="oracle", models={}, seed=0, code_version="t",
                                          inputs={"images": "/in", "root": "/in"}))
    entries = [ImageEntry(f"im{i}.png", f"/in/im{i}.png", 100 + i) for i in range(n_images)]
    append_shards(root, entries, shard_size, "/in")
    h = read_manifest(root).stage1_hash()
    for sid in commit:
        commit_shard(root, sid, h, *shard_content(root, sid, 1), failure_reasons={}, seconds=0, code_version="t")
    return root


def status(path):
    from stages.label import campaign_status

    return campaign_status(str(path))


@pytest.mark.parametrize("damage", ["zarr chunk deleted", "parquet truncated", "parquet replaced"])
def test_damaged_shard_fails_readers_and_verify_repair_drops_just_it(tmp_path, damage):
    from flows.cli import main

    root = campaign(tmp_path / "c")
    if damage == "zarr chunk deleted":
        chunk = next(p for p in (tmp_path / "c" / labels_group_path(1)).rglob("c/*/*/*"))
        chunk.unlink()
        read = lambda r: r.labels(1)  # noqa: E731
    elif damage == "parquet truncated":
        p = tmp_path / "c" / masks_path(1)
        p.write_bytes(p.read_bytes()[:100])
        read = lambda r: r.masks()  # noqa: E731
    else:
        p = tmp_path / "c" / images_path(1)
        p.write_bytes(table_to_parquet_bytes(shard_content(root, 2, 1)[0]))  # valid Parquet, wrong rows
        read = lambda r: r.images()  # noqa: E731
    reader = CampaignReader(tmp_path / "c")
    with pytest.raises(ShardDamaged, match=r"shard 1 .*verify --campaign .* --repair"):
        read(reader)
    if damage == "zarr chunk deleted":
        with pytest.raises(ShardDamaged):
            list(reader.iter_labels())  # what train reads
    assert main(["verify", "--campaign", str(tmp_path / "c")]) == 1
    assert main(["verify", "--campaign", str(tmp_path / "c"), "--repair"]) == 0
    assert main(["verify", "--campaign", str(tmp_path / "c")]) == 0
    reader = CampaignReader(tmp_path / "c")
    assert sorted(reader.done()) == [0, 2] and reader.masks().num_rows == 8
    assert not (tmp_path / "c" / masks_path(1)).exists()  # plain readers do not see the dropped shard either
    s = status(tmp_path / "c")
    assert (s["shards_done"], s["shards_total"], s["problems"]) == (2, 3, [])


@pytest.mark.parametrize("content", [b"", b'{"shard_id": 1, "stage1', b"[]"])
def test_corrupt_marker_is_named_and_never_blocks_the_campaign(tmp_path, content, capsys):
    from flows.cli import main
    from stages.label import format_status

    root = campaign(tmp_path / "c")
    (tmp_path / "c" / "done" / "000001.json").write_bytes(content)
    reader = CampaignReader(tmp_path / "c")
    assert sorted(reader.done()) == [0, 2] and reader.masks().num_rows == 8  # the rest reads
    s = status(tmp_path / "c")
    assert s["shards_done"] == 2 and "done/000001.json" in s["problems"][0]
    text = format_status(s)
    assert "done/000001.json" in text and "verify --campaign" in text and "--repair" in text
    assert main(["verify", "--campaign", str(tmp_path / "c"), "--repair"]) == 0
    assert "done/000001.json" in capsys.readouterr().out
    assert not (tmp_path / "c" / masks_path(1)).exists() and status(tmp_path / "c")["problems"] == []
    assert planned_shards(root) == [0, 1, 2]  # shard 1 stays planned: the next label redoes it


def test_lost_shard_list_is_rebuilt_never_replanned(tmp_path):
    root = campaign(tmp_path / "c")
    before = read_shard(root, 1)
    (tmp_path / "c" / "shards" / "000001.json").unlink()
    entries = [ImageEntry(f"im{i}.png", f"/in/im{i}.png") for i in range(8)]  # 2 new images on the rerun
    ids, new = append_shards(root, entries, 2, "/in")
    assert (ids, new) == ([0, 1, 2, 3], [3])
    assert read_shard(root, 1) == before
    planned = [e.image_id for sid in ids for e in read_shard(root, sid)]
    assert sorted(planned) == sorted(f"im{i}.png" for i in range(8))  # every image exactly once
    s = status(tmp_path / "c")
    assert (s["shards_done"], s["shards_total"], s["images_planned"]) == (3, 4, 8)


@pytest.mark.parametrize("how", ["deleted", "zero bytes"])
def test_lost_list_of_an_uncommitted_shard_is_reported_then_retired(tmp_path, how):
    root = campaign(tmp_path / "c", commit=(0, 2))
    p = tmp_path / "c" / "shards" / "000001.json"
    p.unlink() if how == "deleted" else p.write_bytes(b"")
    entries = [ImageEntry(f"im{i}.png", f"/in/im{i}.png") for i in range(6)]
    with pytest.raises(PlanDamaged, match=r"shards/000001.json .*verify --campaign .* --repair"):
        append_shards(root, entries, 2, "/in")
    s = status(tmp_path / "c")
    assert "shards/000001.json" in s["problems"][0] and (s["shards_done"], s["shards_total"]) == (2, 3)
    report = verify_campaign(root, repair=True)
    assert report["clean"] and "retired" in report["problems"][0].fix
    ids, new = append_shards(root, entries, 2, "/in")
    assert new == [3] and [e.image_id for e in read_shard(root, 3)] == ["im2.png", "im3.png"]
    assert read_shard(root, 1) == []
    planned = [e.image_id for sid in ids for e in read_shard(root, sid)]
    assert sorted(planned) == sorted(e.image_id for e in entries)


def test_marker_of_a_crashed_publish_is_rolled_forward_and_old_campaigns_read_as_is(tmp_path):
    # A campaign written before the attempt protocol: outputs in place, a format-1 marker without `files`.
    root = CampaignRoot(tmp_path / "old")
    campaign(tmp_path / "old", commit=())
    h = read_manifest(root).stage1_hash()
    images, masks, labels = shard_content(root, 0, 3)
    outputs = {}
    for rel, t in ((images_path(0), images), (masks_path(0), masks)):
        data = table_to_parquet_bytes(t)
        root.write_bytes(rel, data)
        outputs[rel] = sha256(data)
    outputs[labels_group_path(0)] = write_label_group(root, 0, labels)
    write_done(root, DoneMarker(shard_id=0, stage1_hash=h, images=2, ok=2, failed=0, masks=4, outputs=outputs))
    reader = CampaignReader(tmp_path / "old")
    assert list(reader.done()) == [0] and reader.masks().num_rows == 4
    assert reader.labels(0).image_ids == ["im0.png", "im1.png"]
    assert verify_campaign(root)["problems"] == []
    next(p for p in (tmp_path / "old" / labels_group_path(0)).rglob("c/*/*/*")).unlink()
    with pytest.raises(ShardDamaged):
        CampaignReader(tmp_path / "old").labels(0)
    assert [p.path for p in verify_campaign(root)["problems"]] == [labels_group_path(0)]


def test_outputs_follow_the_umask_and_are_fsynced_before_rename(tmp_path, monkeypatch):
    old = os.umask(0o002)
    try:
        root = campaign(tmp_path / "c", commit=(0,))
    finally:
        os.umask(old)
    for rel in ("campaign.json", "shards/000000.json", "done/000000.json", images_path(0), masks_path(0),
                f"{labels_group_path(0)}/zarr.json"):
        assert (os.stat(tmp_path / "c" / rel).st_mode & 0o777) == 0o664, rel
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b))[1])
    root.write_json("x.json", {"a": 1})
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
