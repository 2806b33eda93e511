"""`fmbseg export`: each format read back by its own ecosystem's reader (pycocotools, PIL + the `custom` dataset
reader + `fmbseg eval`, `datasets.load_from_disk`) equals the campaign pixel for pixel; uncommitted shards are left
out; an interrupted export resumes to the same output; `--selected-only`; the COCO JSON labels again."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.export import export_campaign, label_to_png
from storage.labels import IGNORE
from storage.reader import CampaignReader
from storage.tables import decode_rle

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, label_world):
    """5 oracle-labelled world images in 3 shards (2, 2, 1), one of them an unreadable file (a failed row)."""
    from fmbseg.testing.world import write_world

    root = tmp_path_factory.mktemp("export")
    write_world(root / "world", 4, seed=3, sizes=((72, 96), (64, 80)))
    (root / "world" / "images" / "zz_broken.png").write_bytes(b"not a png")
    return label_world(root / "world", root / "campaign", shard_size=2)


def _export(campaign, fmt, out, **kw):
    from stages.export import run_export

    return run_export(str(campaign), fmt, str(out), progress=False, **kw)


def _labels(campaign) -> dict[str, np.ndarray]:
    return {i: lab for i, _, lab in CampaignReader(str(campaign)).iter_labels()}


def test_campaign_has_a_failed_image_and_three_shards(campaign):
    r = CampaignReader(str(campaign))
    assert sorted(r.done()) == [0, 1, 2]
    status = dict(zip(r.images().column("image_id").to_pylist(), r.images().column("status").to_pylist()))
    assert status["zz_broken.png"] == "failed" and list(status.values()).count("ok") == 4


def test_coco_read_by_pycocotools_equals_stored_masks(campaign, tmp_path):
    from pycocotools.coco import COCO

    summary = _export(campaign, "coco", tmp_path / "coco")
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    masks = CampaignReader(str(campaign)).masks().to_pydict()
    assert summary["masks"] == len(coco.anns) == len(masks["rle"]) > 0
    assert summary["images"] == len(coco.imgs) == 4  # ok images only
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert cats == {k + 1: n for k, n in enumerate(CampaignReader(str(campaign)).vocabulary)}
    by_key = {(coco.imgs[a["image_id"]]["fmbseg_image_id"], a["mask_id"]): a for a in coco.anns.values()}
    for k in range(len(masks["rle"])):
        a = by_key[(masks["image_id"][k], masks["mask_id"][k])]
        assert a["segmentation"]["counts"].encode() == masks["rle"][k]  # the stored RLE, not re-encoded
        stored = decode_rle(masks["rle"][k], masks["height"][k], masks["width"][k])
        np.testing.assert_array_equal(coco.annToMask(a).astype(bool), stored)
        assert a["area"] == masks["area"][k] == int(stored.sum())
        assert a["bbox"] == pytest.approx(list(masks["bbox"][k]))
        assert a["iscrowd"] == 0 and a["category_id"] == masks["class_id"][k] + 1
        assert (a["stage"], a["selected"]) == (masks["stage"][k], masks["selected"][k])
        assert a["score"] == pytest.approx(masks["score"][k])
    img = next(iter(coco.imgs.values()))
    assert (Path(json.load(open(tmp_path / "coco" / "annotations.json"))["info"]["image_root"])
            / img["file_name"]).is_file()


def test_coco_selected_only(campaign, tmp_path):
    _export(campaign, "coco", tmp_path / "sel", selected_only=True)
    anns = json.load(open(tmp_path / "sel" / "annotations.json"))["annotations"]
    sel = CampaignReader(str(campaign)).masks().column("selected").to_pylist()
    assert len(anns) == sum(sel) < len(sel) and all(a["selected"] for a in anns)


def test_coco_export_labels_again(campaign, tmp_path):
    """`fmbseg label --images export.json --image-root ...` reads the export: same images, same masks."""
    from flows.cli import main

    _export(campaign, "coco", tmp_path / "coco")
    info = json.load(open(tmp_path / "coco" / "annotations.json"))
    world = Path(info["info"]["image_root"]).parent
    rc = main(["label", "--images", str(tmp_path / "coco" / "annotations.json"), "--image-root",
               info["info"]["image_root"], "--vocab", str(world / "classes.txt"), "--campaign", str(tmp_path / "c2"),
               "--preset", "oracle", "--device", "cpu", "--no-progress"])
    assert rc == 0
    again = CampaignReader(str(tmp_path / "c2")).masks().to_pydict()
    ids = {str(im["id"]): im["fmbseg_image_id"] for im in info["images"]}
    got = sorted((ids[i], r) for i, r in zip(again["image_id"], again["rle"]))
    first = CampaignReader(str(campaign)).masks().to_pydict()
    assert got == sorted(zip(first["image_id"], first["rle"]))


def test_png_read_by_pil_and_the_custom_dataset_reader(campaign, tmp_path):
    from fmbseg.datasets import open_dataset

    out = tmp_path / "png"
    _export(campaign, "png", out)
    labels = _labels(campaign)
    names = CampaignReader(str(campaign)).vocabulary
    assert (out / "classes.txt").read_text().splitlines() == names
    assert sorted(os.listdir(out / "ann_dir")) == sorted(os.path.splitext(i)[0] + ".png" for i in labels)
    for image_id, lab in labels.items():
        stem = os.path.splitext(image_id)[0]
        with Image.open(out / "ann_dir" / f"{stem}.png") as im:
            assert im.mode == "P"  # palette PNG: colours in a viewer, indices for readers
            got = np.array(im)
        np.testing.assert_array_equal(got, np.where(lab == IGNORE, 255, lab).astype(np.uint8))
        link = out / "img_dir" / (stem + os.path.splitext(image_id)[1])
        assert link.is_symlink() and filecmp.cmp(link, campaign.parent / "world" / "images" / image_id)
    ds = open_dataset("custom", str(out))
    assert list(ds.class_names) == names and len(ds) == len(labels)
    for image_id, image, gt in ds:
        lab = labels[image_id + os.path.splitext(next(i for i in labels if i.startswith(image_id + ".")))[1]]
        np.testing.assert_array_equal(gt, np.where(lab == IGNORE, 255, lab).astype(np.int64))
        assert image.shape[:2] == gt.shape


def test_png_export_evaluates_with_fmbseg_eval(campaign, tmp_path):
    from flows.cli import main

    _export(campaign, "png", tmp_path / "png", copy=True)
    assert not (tmp_path / "png" / "img_dir" / "world_0000.png").is_symlink()
    rc = main(["eval", "--dataset", "custom", "--data-root", str(tmp_path / "png"), "--models", "maskclip",
               "--preset", "oracle", "--device", "cpu", "--out", str(tmp_path / "report")])
    assert rc == 0
    results = json.load(open(tmp_path / "report" / "results.json"))["results"]
    (column,) = results
    # Scored against the exported label maps, over the campaign's classes (pixel equality with the campaign is
    # checked on the reader `eval` uses, in the test above).
    assert column == "custom:png"
    assert sorted(results[column]["maskclip"]["IoU"]) == sorted(CampaignReader(str(campaign)).vocabulary)
    assert 0 < results[column]["maskclip"]["aAcc"] <= 100


def test_hf_load_from_disk_round_trip(campaign, tmp_path):
    from datasets import ClassLabel, load_from_disk

    _export(campaign, "hf", tmp_path / "hf")
    ds = load_from_disk(str(tmp_path / "hf"))
    r = CampaignReader(str(campaign))
    assert isinstance(ds.features["objects"].feature["class"], ClassLabel)
    assert ds.features["objects"].feature["class"].names == r.vocabulary
    labels = _labels(campaign)
    masks = r.masks().to_pydict()
    assert ds["image_id"] == list(labels)
    for row in ds:
        lab = labels[row["image_id"]]
        np.testing.assert_array_equal(np.array(row["label"]), np.where(lab == IGNORE, 255, lab))
        path = campaign.parent / "world" / "images" / row["image_id"]
        with Image.open(path) as im:
            np.testing.assert_array_equal(np.array(row["image"].convert("RGB")), np.array(im.convert("RGB")))
        mine = [k for k, i in enumerate(masks["image_id"]) if i == row["image_id"]]
        assert [o["rle"].encode() for o in row["objects"]] == [masks["rle"][k] for k in mine]
        assert [o["class"] for o in row["objects"]] == [masks["class_id"][k] for k in mine]
        assert [o["selected"] for o in row["objects"]] == [masks["selected"][k] for k in mine]


def test_uncommitted_shard_is_left_out_and_exported_once_committed(campaign, tmp_path):
    c = tmp_path / "campaign"
    shutil.copytree(campaign, c, symlinks=True)
    marker = c / "done" / "000001.json"
    saved = marker.read_bytes()
    marker.unlink()  # shard 1 now looks half-written: its outputs exist, its commit marker does not
    r = CampaignReader(str(c))
    hidden = set(r.shard_images(1)[i].image_id for i in range(len(r.shard_images(1))))
    for fmt in ("coco", "png", "hf"):
        s = _export(c, fmt, tmp_path / fmt)
        assert s["shards"] == 2 and s["images"] == 2
    exported = {im["fmbseg_image_id"] for im in json.load(open(tmp_path / "coco" / "annotations.json"))["images"]}
    assert exported and not exported & hidden
    assert not {os.path.splitext(i)[0] + ".png" for i in hidden} & set(os.listdir(tmp_path / "png" / "ann_dir"))
    from datasets import load_from_disk

    assert not set(load_from_disk(str(tmp_path / "hf"))["image_id"]) & hidden
    # Committed later: the next run exports just that shard and ends equal to a one-go export.
    marker.write_bytes(saved)
    s = _export(c, "coco", tmp_path / "coco")
    assert (s["shards_exported"], s["shards_skipped"]) == (1, 2)
    _export(c, "coco", tmp_path / "coco-clean")
    assert (tmp_path / "coco" / "annotations.json").read_bytes() == \
        (tmp_path / "coco-clean" / "annotations.json").read_bytes()


class _Killed(Exception):
    pass


@pytest.mark.parametrize("fmt", ["coco", "png", "hf"])
def test_interrupted_export_resumes_to_the_clean_output(campaign, tmp_path, fmt):
    from fmbseg.show import class_palette

    pal = class_palette(len(CampaignReader(str(campaign)).vocabulary))
    clean = export_campaign(str(campaign), fmt, str(tmp_path / "clean"), palette=pal)

    def kill_after_first(shard_id, record):
        raise _Killed(shard_id)

    out = tmp_path / "resumed"
    with pytest.raises(_Killed):
        export_campaign(str(campaign), fmt, str(out), palette=pal, on_shard=kill_after_first)
    again = export_campaign(str(campaign), fmt, str(out), palette=pal)
    assert (again["shards_exported"], again["shards_skipped"]) == (2, 1)  # shard 0 was not redone
    assert (again["images"], again["masks"]) == (clean["images"], clean["masks"])
    if fmt == "hf":
        from datasets import load_from_disk

        a, b = load_from_disk(str(tmp_path / "clean")), load_from_disk(str(out))
        assert a.features == b.features and a.to_dict() == b.to_dict()
    else:
        cmp = filecmp.dircmp(tmp_path / "clean", out, ignore=[".fmbseg-export"])
        assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
        for sub in cmp.subdirs.values():
            assert not sub.left_only and not sub.right_only and not sub.diff_files
    # A third run has nothing to do and changes nothing.
    assert export_campaign(str(campaign), fmt, str(out), palette=pal)["shards_exported"] == 0


def test_an_export_folder_refuses_other_options(campaign, tmp_path):
    export_campaign(str(campaign), "coco", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="selected_only"):
        export_campaign(str(campaign), "coco", str(tmp_path / "o"), selected_only=True)
    with pytest.raises(ValueError, match="unknown export format"):
        export_campaign(str(campaign), "yolo", str(tmp_path / "p"))


def test_label_png_more_than_255_classes_is_16_bit_with_65535_ignore(tmp_path):
    lab = np.array([[0, 300], [IGNORE, 254]], np.uint16)
    p = tmp_path / "a.png"
    p.write_bytes(label_to_png(lab, 301))
    with Image.open(p) as im:
        np.testing.assert_array_equal(np.array(im), lab)
    p.write_bytes(label_to_png(np.array([[3, IGNORE]], np.uint16), 255))
    with Image.open(p) as im:
        assert im.mode == "L" and np.array(im).tolist() == [[3, 255]]


def test_label_maps_carry_class_names_and_ignore_in_their_attributes(campaign):
    import zarr

    arr = zarr.open_group(str(campaign / "labels.zarr" / "000000"), mode="r")["label"]
    assert arr.attrs["class_names"] == CampaignReader(str(campaign)).vocabulary
    assert arr.attrs["ignore_label"] == 65535 == arr.fill_value
