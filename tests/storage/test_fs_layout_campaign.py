"""Campaign root I/O, layout names, campaign.json and its Stage-1 config hash."""

import os

import pytest

from storage.campaign import CampaignManifest, differing_fields, read_manifest, write_manifest
from storage.fs import CampaignRoot
from storage.layout import done_path, images_path, labels_group_path, masks_path, parse_shard_file, shard_list_path, shard_name


def manifest(**over):
    d = dict(
        stage1={"upscale": 2.0, "points_per_class": 5, "auto": {"points_per_side": 32}},
        vocabulary={"names": ["red", "green"], "synonyms": [[], ["lime"]]},
        preset="oracle",
        models={"clip": {"id": "oracle-clip", "weights_sha256": None}, "sam": {"id": "oracle-sam", "weights_sha256": None}},
        seed=0,
        code_version="0.1.0",
        inputs={"images": "/data/a"},
    )
    d.update(over)
    return CampaignManifest(**d)


def test_layout_names():
    assert shard_name(42) == "000042"
    assert shard_list_path(42) == "shards/000042.json"
    assert images_path(7) == "images/shard=000007/part-0.parquet"
    assert masks_path(7) == "masks/shard=000007/part-0.parquet"
    assert labels_group_path(7) == "labels.zarr/000007"
    assert done_path(1234567) == "done/1234567.json"
    assert parse_shard_file("000042.json") == 42 and parse_shard_file(".tmp-x-000042.json") is None
    with pytest.raises(ValueError):
        shard_name(-1)


@pytest.mark.parametrize("url", ["local", "memory://fs-test"])
def test_whole_file_writes_local_and_memory(tmp_path, url):
    root = CampaignRoot(tmp_path / "c" if url == "local" else url)
    root.write_bytes("a/b/c.bin", b"123")
    root.write_json("x.json", {"b": 1, "a": [1, 2]})
    assert root.read_bytes("a/b/c.bin") == b"123"
    assert root.read_json("x.json") == {"a": [1, 2], "b": 1}
    assert root.exists("a/b/c.bin") and not root.exists("nope")
    assert root.listdir("a/b") == ["c.bin"] and root.listdir("missing") == []
    assert root.find("a") == ["b/c.bin"]
    root.write_bytes("a/b/c.bin", b"4567")  # overwrite in place
    assert root.read_bytes("a/b/c.bin") == b"4567"
    if url == "local":
        # no temporary left next to the target
        assert sorted(os.listdir(tmp_path / "c" / "a" / "b")) == ["c.bin"]
    root.remove("a", recursive=True)
    assert not root.exists("a/b/c.bin")


def test_failed_local_write_leaves_no_temp(tmp_path, monkeypatch):
    root = CampaignRoot(tmp_path)
    root.write_bytes("f.bin", b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        root.write_bytes("f.bin", b"new")
    assert sorted(os.listdir(tmp_path)) == ["f.bin"] and (tmp_path / "f.bin").read_bytes() == b"old"


def test_manifest_roundtrip_and_hash(tmp_path):
    root = CampaignRoot(tmp_path)
    assert read_manifest(root) is None
    m = manifest()
    write_manifest(root, m)
    back = read_manifest(root)
    assert back == m and back.stage1_hash() == m.stage1_hash()
    assert len(m.stage1_hash()) == 64
    # recorded-only fields do not change the hash; Stage-1-defining ones do
    assert manifest(code_version="9.9", inputs={"images": "/elsewhere"}).stage1_hash() == m.stage1_hash()
    for over in ({"seed": 1}, {"preset": "tiny"}, {"vocabulary": {"names": ["red", "green"], "synonyms": [[], []]}}):
        assert manifest(**over).stage1_hash() != m.stage1_hash()
    # the hash does not depend on key order (canonical JSON)
    reordered = manifest(stage1={"auto": {"points_per_side": 32}, "points_per_class": 5, "upscale": 2.0})
    assert reordered.stage1_hash() == m.stage1_hash()


def test_differing_fields_names_each_field():
    a = manifest()
    b = manifest(seed=3, stage1={"upscale": 2.0, "points_per_class": 3, "auto": {"points_per_side": 16}})
    assert differing_fields(a, b) == [
        "seed: 0 -> 3",
        "stage1.auto.points_per_side: 32 -> 16",
        "stage1.points_per_class: 5 -> 3",
    ]
    assert differing_fields(a, manifest(code_version="2")) == []
    c = manifest(stage1={"upscale": 2.0, "points_per_class": 5, "auto": {"points_per_side": 32}, "new": 1})
    assert differing_fields(a, c) == ["stage1.new: (absent) -> 1"]


def test_hand_edited_manifest_is_refused(tmp_path):
    root = CampaignRoot(tmp_path)
    write_manifest(root, manifest())
    d = root.read_json("campaign.json")
    d["seed"] = 5
    root.write_json("campaign.json", d)
    with pytest.raises(ValueError, match="edited by hand"):
        read_manifest(root)


def test_write_file_writes_whole_files_at_paths_and_urls(tmp_path):
    import fsspec

    from storage.fs import write_file

    target = tmp_path / "deep" / "report.json"
    write_file(target, b"{}\n")
    write_file(str(target), b'{"a": 1}\n')  # replaces the file, leaves no temporary behind
    assert target.read_bytes() == b'{"a": 1}\n' and sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
    write_file("memory://write-file-test/x/y.md", b"# t\n")
    assert fsspec.filesystem("memory").cat("/write-file-test/x/y.md") == b"# t\n"
