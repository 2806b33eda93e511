"""Listing inputs (folders, COCO JSON) and appending immutable shards."""

import json

import pytest

from storage.fs import CampaignRoot
from storage.planning import ImageEntry, append_shards, list_inputs, planned_shards, read_shard


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_folder_listing_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b.PNG", "a/z.jpg", "a/b.JpEg", "c.webp", "d.bmp", "e.tif", "f.TIFF", "notes.txt", "g.gif", "a/x/y.png"]:
        touch(tmp_path / "in" / rel)
    (tmp_path / "in" / "dir.jpg").mkdir()  # a directory is not an image
    entries = list_inputs(str(tmp_path / "in"))
    ids = [e.image_id for e in entries]
    assert ids == ["a/b.JpEg", "a/x/y.png", "a/z.jpg", "b.PNG", "c.webp", "d.bmp", "e.tif", "f.TIFF"]
    assert entries[0].path == str(tmp_path / "in" / "a" / "b.JpEg")


def test_folder_listing_on_object_store():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/plan-in/b.png": b"1", "/plan-in/a/c.jpg": b"2", "/plan-in/readme.md": b"3"})
    entries = list_inputs("memory://plan-in")
    assert [e.image_id for e in entries] == ["a/c.jpg", "b.png"]
    assert fs.cat_file(entries[0].path) == b"2"


def test_coco_listing(tmp_path):
    coco = {"images": [{"id": 10, "file_name": "x/b.jpg"}, {"id": 2, "file_name": "a.png"}], "annotations": []}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    (tmp_path / "imgs").mkdir()
    entries = list_inputs(str(tmp_path / "ann.json"), image_root=str(tmp_path / "imgs"))
    assert entries == [ImageEntry("2", str(tmp_path / "imgs" / "a.png")), ImageEntry("10", str(tmp_path / "imgs" / "x/b.jpg"))]
    # default image root: the JSON's folder
    assert list_inputs(str(tmp_path / "ann.json"))[0].path == str(tmp_path / "a.png")


@pytest.mark.parametrize(
    "content,match",
    [("{", "not valid JSON"), ('{"x": 1}', "no 'images' list"), ('{"images": [{"id": 1}]}', "file_name"),
     ('{"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}]}', "appears twice")],
)
def test_bad_coco_is_a_clear_error(tmp_path, content, match):
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        list_inputs(str(tmp_path / "c.json"))


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_inputs(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="COCO file not found"):
        list_inputs(str(tmp_path / "nope.json"))
    (tmp_path / "c.json").write_text('{"images": []}')
    with pytest.raises(FileNotFoundError, match="image-root"):
        list_inputs(str(tmp_path / "c.json"), image_root=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="only applies"):
        list_inputs(str(tmp_path), image_root=str(tmp_path))


@pytest.mark.parametrize("url", ["local", "memory://plan-c"])
def test_append_shards_never_changes_existing_lists(tmp_path, url):
    root = CampaignRoot(tmp_path / "c" if url == "local" else url)
    first = [ImageEntry(f"{i:02d}.png", f"/in/{i:02d}.png") for i in range(5)]
    all_ids, new = append_shards(root, first, shard_size=2)
    assert all_ids == new == [0, 1, 2]
    assert [e.image_id for e in read_shard(root, 2)] == ["04.png"]
    before = {s: root.read_bytes(f"shards/{s:06d}.json") for s in all_ids}
    # same inputs again: nothing new
    assert append_shards(root, first, shard_size=2) == ([0, 1, 2], [])
    # new images (one sorting before the old ones) go to new shards; old lists are byte-identical
    more = [ImageEntry("00a.png", "/in/00a.png")] + first + [ImageEntry("99.png", "/in/99.png")]
    all_ids, new = append_shards(root, more, shard_size=2)
    assert new == [3] and planned_shards(root) == [0, 1, 2, 3]
    assert [e.image_id for e in read_shard(root, 3)] == ["00a.png", "99.png"]
    assert all(root.read_bytes(f"shards/{s:06d}.json") == b for s, b in before.items())
    with pytest.raises(ValueError, match="positive"):
        append_shards(root, more, shard_size=0)
    with pytest.raises(FileNotFoundError, match="not planned"):
        read_shard(root, 9)
