"""Benchmark readers on tiny fake trees in mmsegmentation's layouts: label conversions, and clear errors for
missing folders, missing annotations and class-count mismatches."""

import numpy as np
import pytest
from PIL import Image

from fmbseg.datasets import DatasetError, open_dataset
from fmbseg.overlay import palette


def _img(path, h=16, w=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _ann(path, values, mode=None):
    """values: one row of 8 labels (or a full map), tiled to the 16x16 image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(values, np.uint8)
    if arr.shape != (16, 16):
        arr = np.tile(arr[:1, :8], (16, 2))
    im = Image.fromarray(arr, mode="P") if mode == "P" else Image.fromarray(arr)
    if mode == "P":
        im.putpalette(palette(256).ravel().tolist())
    im.save(path)


GT = np.array([[0, 1, 2, 255, 20, 0, 0, 0]] * 6)


def _voc(root, year="VOC2012", ann_dir="SegmentationClass", split="Segmentation", gt=GT):
    base = root / "VOCdevkit" / year
    for stem in ("2007_000032", "2007_000039"):
        _img(base / "JPEGImages" / f"{stem}.jpg")
        _ann(base / ann_dir / f"{stem}.png", gt, mode="P")
    (base / "ImageSets" / split).mkdir(parents=True)
    (base / "ImageSets" / split / "val.txt").write_text("2007_000032\n2007_000039\n")
    return base


def test_voc21_and_voc20(tmp_path):
    base = _voc(tmp_path)
    ds = open_dataset("voc21", str(tmp_path))               # a parent of VOCdevkit/VOC2012 is accepted
    assert ds.root == str(base) and len(ds) == 2 and ds.num_classes == 21 and ds.background_rule
    assert ds.class_names[1] == "aeroplane" and ds.class_names[20] == "tvmonitor"
    image_id, image, gt = ds.load(0)
    assert image_id == "2007_000032" and image.shape == (16, 16, 3)
    assert gt[0, :8].tolist() == [0, 1, 2, 255, 20, 0, 0, 0]      # palette indices, not colours
    v20 = open_dataset("voc20", str(base))
    assert not v20.background_rule and v20.num_classes == 20
    assert v20.load_gt(0)[0, :8].tolist() == [255, 0, 1, 255, 19, 255, 255, 255]


def test_context59_reduce_zero_label(tmp_path):
    _voc(tmp_path, "VOC2010", "SegmentationClassContext", "SegmentationContext",
         gt=np.array([[0, 1, 59, 255, 3, 3, 3, 3]] * 6))
    ds = open_dataset("context59", str(tmp_path))
    assert ds.class_names[0] == "aeroplane" and ds.num_classes == 59
    assert ds.load_gt(1)[0, :8].tolist() == [255, 0, 58, 255, 2, 2, 2, 2]


def test_context60_keeps_background_as_class_zero(tmp_path):
    """mmseg's PascalContextDataset (TCL's "context"): same files as context59, no reduce_zero_label."""
    _voc(tmp_path, "VOC2010", "SegmentationClassContext", "SegmentationContext",
         gt=np.array([[0, 1, 59, 255, 3, 3, 3, 3]] * 6))
    ds = open_dataset("context60", str(tmp_path))
    assert ds.num_classes == 60 and ds.class_names[:2] == ("background", "aeroplane")
    assert ds.class_names[1:] == open_dataset("context59", str(tmp_path)).class_names
    assert not ds.background_rule          # "background" is scored as its own prompt, no stuff-name rule
    assert ds.load_gt(1)[0, :8].tolist() == [0, 1, 59, 255, 3, 3, 3, 3]


def _coco(root):
    base = root / "coco_stuff164k"
    _img(base / "images" / "val2017" / "000000000139.jpg")
    _ann(base / "annotations" / "val2017" / "000000000139_labelTrainIds.png",
         np.array([[0, 79, 80, 170, 255, 5, 5, 5]] * 6))
    return base


def test_coco_stuff_and_coco_object(tmp_path):
    _coco(tmp_path)
    stuff = open_dataset("coco_stuff171", str(tmp_path))
    assert stuff.num_classes == 171 and stuff.load_gt(0)[0, :8].tolist() == [0, 79, 80, 170, 255, 5, 5, 5]
    obj = open_dataset("coco_object", str(tmp_path / "coco_stuff164k"))
    assert obj.num_classes == 81 and obj.background_rule and obj.class_names[:2] == ("background", "person")
    # TCL's convert_coco_object.py: unlabelled (255) is background too, COCO-Object has no ignored pixels
    assert obj.load_gt(0)[0, :8].tolist() == [1, 80, 0, 0, 0, 6, 6, 6]


def test_coco_object_reads_tcl_converted_files(tmp_path):
    """A tree converted by TCL's script holds `_instanceTrainIds.png` (already 0..80): read as is."""
    base = tmp_path / "coco_stuff164k"
    _img(base / "images" / "val2017" / "000000000139.jpg")
    _ann(base / "annotations" / "val2017" / "000000000139_instanceTrainIds.png",
         np.array([[0, 1, 80, 0, 7, 7, 7, 7]] * 6))
    obj = open_dataset("coco_object", str(tmp_path))
    assert obj.load_gt(0)[0, :8].tolist() == [0, 1, 80, 0, 7, 7, 7, 7]
    with pytest.raises(DatasetError, match="no annotation"):
        open_dataset("coco_stuff171", str(tmp_path))     # COCO-Stuff itself needs the labelTrainIds files


def test_cityscapes_recursive_and_ade150(tmp_path):
    city = tmp_path / "cityscapes"
    for town in ("frankfurt", "lindau"):
        _img(city / "leftImg8bit" / "val" / town / f"{town}_000000_000019_leftImg8bit.png")
        _ann(city / "gtFine" / "val" / town / f"{town}_000000_000019_gtFine_labelTrainIds.png",
             np.array([[0, 18, 255, 1, 1, 1, 1, 1]] * 6))
    ds = open_dataset("cityscapes", str(tmp_path))
    assert [s[0] for s in ds.samples] == ["frankfurt/frankfurt_000000_000019", "lindau/lindau_000000_000019"]
    assert ds.num_classes == 19 and ds.load_gt(1)[0, :3].tolist() == [0, 18, 255]
    ade = tmp_path / "ade" / "ADEChallengeData2016"
    _img(ade / "images" / "validation" / "ADE_val_00000001.jpg")
    _ann(ade / "annotations" / "validation" / "ADE_val_00000001.png", np.array([[0, 1, 150, 2, 2, 2, 2, 2]] * 6))
    ds = open_dataset("ade150", str(tmp_path))
    assert ds.class_names[7] == "bed" and ds.load_gt(0)[0, :3].tolist() == [255, 0, 149]


def test_data_root_with_glob_characters(tmp_path):
    _coco(tmp_path / "data[v2]")
    ds = open_dataset("coco_stuff171", str(tmp_path / "data[v2]"))
    assert [s[0] for s in ds.samples] == ["000000000139"]


def _custom(root, n=2, classes="red\ngreen: lime, emerald\nblue\n", value=2):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "classes.txt").write_text(classes)
    for i in range(n):
        _img(root / "images" / f"im{i}.{'png' if i % 2 else 'jpg'}")
        _ann(root / "annotations" / f"im{i}.png", np.full((16, 16), value))


def test_custom_layout_with_synonyms(tmp_path):
    _custom(tmp_path)
    ds = open_dataset("custom", str(tmp_path))
    assert ds.class_names == ("red", "green", "blue")
    assert ds.prompts == [["red"], ["green", "lime", "emerald"], ["blue"]]
    assert [s[0] for s in ds.samples] == ["im0", "im1"]
    ids = [image_id for image_id, _, gt in ds]
    assert ids == ["im0", "im1"]


def test_clear_errors_before_any_model(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'voc'"):
        open_dataset("voc", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        open_dataset("voc21", str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="no image folder under"):
        open_dataset("ade150", str(tmp_path))
    _custom(tmp_path / "c1", value=3)
    with pytest.raises(DatasetError, match=r"class-count mismatch.*labels \[3\].*3 classes"):
        open_dataset("custom", str(tmp_path / "c1"))
    _custom(tmp_path / "c2")
    (tmp_path / "c2" / "annotations" / "im1.png").unlink()
    with pytest.raises(DatasetError, match="1 of 2 images have no annotation.*im1.png"):
        open_dataset("custom", str(tmp_path / "c2"))
    _custom(tmp_path / "c3")
    (tmp_path / "c3" / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="classes.txt not found"):
        open_dataset("custom", str(tmp_path / "c3"))
    base = _voc(tmp_path / "v")
    (base / "SegmentationClass" / "2007_000039.png").unlink()
    with pytest.raises(DatasetError, match="voc21: 1 of 2 images have no annotation"):
        open_dataset("voc21", str(base))
    (base / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetError, match="split file"):
        open_dataset("voc21", str(base))
