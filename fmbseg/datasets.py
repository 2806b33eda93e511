"""Readers for the evaluation benchmarks of DESIGN §2, in mmsegmentation's on-disk layouts, plus `custom`.

`open_dataset(name, data_root)` finds the images and annotations and checks them all (folders, one annotation
per image, label values within the class count) before any model is built, so a wrong `--data-root` fails in
seconds with a message that says what is missing. Iterating yields `(image_id, image (H, W, 3) uint8,
gt (H, W) int64)` with class indices into `class_names` and 255 = ignore, at the annotation's resolution.

`data_root` is the folder mmsegmentation's config calls `data_root` (e.g. `.../VOCdevkit/VOC2012`); a parent
holding the conventional folder name (`VOCdevkit/VOC2012`, `coco_stuff164k`, `ADEChallengeData2016`, ...) also works.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
from PIL import Image

from fmbseg.vocab import read_vocab_file
from fmbseg.vocab_builtin import BUILTIN_VOCABULARIES

IGNORE_INDEX = 255
DATASET_NAMES = ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff171", "cityscapes", "ade150",
                 "custom")
DatasetName = Literal[DATASET_NAMES]


class DatasetError(ValueError):
    """A benchmark folder that cannot be evaluated (missing folders or annotations, wrong class count)."""


class SampleError(DatasetError):
    """One image of a checked benchmark cannot be scored (unreadable, or its annotation's size differs from the
    upright image's); an evaluation skips it and reports it."""


def _identity(gt: np.ndarray) -> np.ndarray:
    return gt.astype(np.int64)


def _reduce_zero_label(gt: np.ndarray) -> np.ndarray:
    """mmsegmentation's reduce_zero_label: 0 -> ignore, c -> c - 1, 255 stays ignore."""
    g = gt.astype(np.int64)
    return np.where((g == 0) | (g == IGNORE_INDEX), IGNORE_INDEX, g - 1)


def _coco_object(gt: np.ndarray) -> np.ndarray:
    """COCO-Stuff train ids (`_labelTrainIds.png`) -> COCO-Object as TCL's `convert_coco_object.py` writes it:
    things 0..79 -> 1..80; stuff 80..170 *and unlabelled 255* -> 0 (background). COCO-Object has no ignore."""
    g = gt.astype(np.int64)
    return np.where(g < 80, g + 1, 0)


@dataclass(frozen=True)
class _Layout:
    """Where a benchmark keeps its validation images and annotations, relative to its data root."""

    folder_names: tuple[str, ...]   # conventional data-root names, tried below a parent folder
    img_dir: str
    ann_dir: str
    img_suffix: str
    ann_suffix: str
    split: str | None               # file listing the image stems, or None for every image of img_dir
    convert: Callable[[np.ndarray], np.ndarray]
    background_rule: bool = False
    recursive: bool = False
    # Other annotation files accepted when no `ann_suffix` file exists at all: (suffix, convert) in order of
    # preference (COCO-Object: TCL's own converted `_instanceTrainIds.png`, already 0..80).
    alt_annotations: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = ()


_VOC = ("VOCdevkit/VOC2012", "VOC2012")
_COCO = ("coco_stuff164k", "coco_stuff")
_CONTEXT = ("VOCdevkit/VOC2010", "VOC2010")
LAYOUTS: dict[str, _Layout] = {
    "voc21": _Layout(_VOC, "JPEGImages", "SegmentationClass", ".jpg", ".png",
                     "ImageSets/Segmentation/val.txt", _identity, background_rule=True),
    "voc20": _Layout(_VOC, "JPEGImages", "SegmentationClass", ".jpg", ".png",
                     "ImageSets/Segmentation/val.txt", _reduce_zero_label),
    # mmseg's PascalContextDataset (TCL's "context"): 0 = background is a class; no background rule (its 91 stuff
    # prompts would take the sky, wall, grass... pixels that context60 scores as their own classes).
    "context60": _Layout(_CONTEXT, "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
                         "ImageSets/SegmentationContext/val.txt", _identity),
    "context59": _Layout(_CONTEXT, "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
                         "ImageSets/SegmentationContext/val.txt", _reduce_zero_label),
    "coco_object": _Layout(_COCO, "images/val2017", "annotations/val2017", ".jpg", "_labelTrainIds.png",
                           None, _coco_object, background_rule=True,
                           alt_annotations=(("_instanceTrainIds.png", _identity),)),
    "coco_stuff171": _Layout(_COCO, "images/val2017", "annotations/val2017", ".jpg", "_labelTrainIds.png",
                             None, _identity),
    "cityscapes": _Layout(("cityscapes",), "leftImg8bit/val", "gtFine/val", "_leftImg8bit.png",
                          "_gtFine_labelTrainIds.png", None, _identity, recursive=True),
    "ade150": _Layout(("ade/ADEChallengeData2016", "ADEChallengeData2016"), "images/validation",
                      "annotations/validation", ".jpg", ".png", None, _reduce_zero_label),
}


@dataclass
class SegDataset:
    """A validated benchmark split. `prompts[k]` are the text prompts of class k (name first, then synonyms)."""

    name: str
    root: str
    class_names: tuple[str, ...]
    samples: list[tuple[str, str, str]]            # (image_id, image path, annotation path), sorted by id
    convert: Callable[[np.ndarray], np.ndarray] = _identity
    background_rule: bool = False
    prompts: list[list[str]] = field(default_factory=list)

    def __post_init__(self):
        if not self.prompts:
            self.prompts = [[n] for n in self.class_names]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def load_gt(self, index: int) -> np.ndarray:
        """(H, W) int64 class indices, 255 = ignore."""
        return self.convert(_read_annotation(self.samples[index][2]))

    def load(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        from fmbseg.images import load_image

        image_id, img_path, _ = self.samples[index]
        try:
            image = load_image(img_path)
        except ValueError as e:   # ImageDecodeError: a benchmark image that cannot be scored
            raise SampleError(f"cannot read the image {img_path}: {e}") from e
        gt = self.load_gt(index)
        if image.shape[:2] != gt.shape:
            raise SampleError(f"the image is {image.shape[1]}x{image.shape[0]} (upright, after EXIF orientation) but "
                              f"its annotation is {gt.shape[1]}x{gt.shape[0]}")
        return image_id, image, gt

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self.load(i)

    def check_labels(self) -> None:
        """Every annotation's labels are < num_classes or 255; else a class-count mismatch error naming the file."""
        for i, (_, _, ann) in enumerate(self.samples):
            g = self.load_gt(i)
            bad = (g != IGNORE_INDEX) & ((g < 0) | (g >= self.num_classes))
            if bad.any():
                values = np.unique(g[bad])[:5].tolist()
                raise DatasetError(
                    f"class-count mismatch in {self.name}: {ann} has labels {values} but the dataset has "
                    f"{self.num_classes} classes (0..{self.num_classes - 1}, 255 = ignore)")


def _read_annotation(path: str) -> np.ndarray:
    """Raw annotation indices: palette PNGs give their indices, not colours (VOC's are palette images)."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16", "1"):
            raise DatasetError(f"annotation {path} is a {im.mode} image; expected a single-channel index PNG")
        return np.array(im)


def _resolve_root(name: str, layout: _Layout, data_root: str) -> str:
    if os.path.isdir(os.path.join(data_root, layout.img_dir)):
        return data_root
    for folder in layout.folder_names:
        candidate = os.path.join(data_root, folder)
        if os.path.isdir(os.path.join(candidate, layout.img_dir)):
            return candidate
    tried = [os.path.join(data_root, layout.img_dir)] + [
        os.path.join(data_root, f, layout.img_dir) for f in layout.folder_names]
    raise DatasetError(f"{name}: no image folder under {data_root} (looked for {', '.join(tried)})")


def _missing(name: str, missing: list[str], total: int) -> DatasetError:
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    return DatasetError(f"{name}: {len(missing)} of {total} images have no annotation (expected {shown})")


def _open_builtin(name: str, data_root: str) -> SegDataset:
    layout = LAYOUTS[name]
    root = _resolve_root(name, layout, data_root)
    img_dir, ann_dir = os.path.join(root, layout.img_dir), os.path.join(root, layout.ann_dir)
    if not os.path.isdir(ann_dir):
        raise DatasetError(f"{name}: annotation folder {ann_dir} not found")
    if layout.split is not None:
        split = os.path.join(root, layout.split)
        if not os.path.isfile(split):
            raise DatasetError(f"{name}: split file {split} not found")
        with open(split, encoding="utf-8") as f:
            stems = [line.strip() for line in f if line.strip()]
        pairs = [(s, os.path.join(img_dir, s + layout.img_suffix)) for s in stems]
        absent = [p for _, p in pairs if not os.path.isfile(p)]
        if absent:
            raise DatasetError(f"{name}: {len(absent)} images listed in {split} are missing (e.g. {absent[0]})")
    else:
        base = glob.escape(img_dir)     # a data root such as `data[v2]` is a folder name, not a glob pattern
        pattern = os.path.join(base, "**", "*" + layout.img_suffix) if layout.recursive else \
            os.path.join(base, "*" + layout.img_suffix)
        paths = sorted(glob.glob(pattern, recursive=layout.recursive))
        pairs = [(os.path.relpath(p, img_dir)[: -len(layout.img_suffix)], p) for p in paths]
    if not pairs:
        raise DatasetError(f"{name}: no *{layout.img_suffix} images in {img_dir}")
    ann_suffix, convert = layout.ann_suffix, layout.convert
    for alt_suffix, alt_convert in layout.alt_annotations:
        if not any(os.path.isfile(os.path.join(ann_dir, s + ann_suffix)) for s, _ in pairs) and \
                any(os.path.isfile(os.path.join(ann_dir, s + alt_suffix)) for s, _ in pairs):
            ann_suffix, convert = alt_suffix, alt_convert
    samples, missing = [], []
    for stem, img in pairs:
        ann = os.path.join(ann_dir, stem + ann_suffix)
        if os.path.isfile(ann):
            samples.append((stem, img, ann))
        else:
            missing.append(ann)
    if missing:
        raise _missing(name, missing, len(pairs))
    return SegDataset(name, root, tuple(BUILTIN_VOCABULARIES[name]), sorted(samples), convert,
                      layout.background_rule)


def _open_custom(data_root: str) -> SegDataset:
    from fmbseg.images import IMAGE_EXTENSIONS

    img_dir, ann_dir = os.path.join(data_root, "images"), os.path.join(data_root, "annotations")
    if not os.path.isdir(img_dir) and os.path.isdir(os.path.join(data_root, "img_dir")):
        # mmseg's layout (what `fmbseg export --format png` writes): img_dir/ and ann_dir/ beside classes.txt
        img_dir, ann_dir = os.path.join(data_root, "img_dir"), os.path.join(data_root, "ann_dir")
    classes = os.path.join(data_root, "classes.txt")
    for path, what in ((img_dir, "image folder"), (ann_dir, "annotation folder")):
        if not os.path.isdir(path):
            raise DatasetError(f"custom: {what} {path} not found (layout: DIR/images/*, DIR/annotations/<stem>.png, "
                               "DIR/classes.txt)")
    if not os.path.isfile(classes):
        raise DatasetError(f"custom: class list {classes} not found (one class name per line)")
    vocab = read_vocab_file(classes)  # UTF-8 (BOM skipped); a bad file's error names it
    exts = {e.lower().lstrip(".") for e in IMAGE_EXTENSIONS}
    images = sorted(p for p in os.listdir(img_dir)
                    if os.path.isfile(os.path.join(img_dir, p)) and p.rsplit(".", 1)[-1].lower() in exts)
    if not images:
        raise DatasetError(f"custom: no images in {img_dir}")
    stems: dict[str, str] = {}
    for p in images:
        stem = os.path.splitext(p)[0]
        if stem in stems:
            raise DatasetError(f"custom: {stems[stem]} and {p} share the annotation name {stem}.png")
        stems[stem] = p
    samples, missing = [], []
    for stem, p in stems.items():
        ann = os.path.join(ann_dir, stem + ".png")
        if os.path.isfile(ann):
            samples.append((stem, os.path.join(img_dir, p), ann))
        else:
            missing.append(ann)
    if missing:
        raise _missing("custom", missing, len(stems))
    return SegDataset("custom", data_root, vocab.names, sorted(samples), _identity,
                      background_rule=False, prompts=vocab.prompts())


def open_dataset(name: str, data_root: str, check_labels: bool = True) -> SegDataset:
    """Find and check a benchmark split. Raises `DatasetError` (a ValueError) or FileNotFoundError, never later."""
    if name not in DATASET_NAMES:
        from fmbseg.suggest import did_you_mean

        raise DatasetError(f"unknown dataset {name!r}; {did_you_mean(name, DATASET_NAMES, 'datasets')}")
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"--data-root {data_root} is not a folder")
    ds = _open_custom(data_root) if name == "custom" else _open_builtin(name, data_root)
    if check_labels:
        ds.check_labels()
    return ds
