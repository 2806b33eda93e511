"""Exporting a campaign's committed shards to the formats other tools read: COCO, mmseg/HF PNG folders, HF datasets.

`export_campaign(campaign, fmt, out, ...)` reads the campaign only through `CampaignReader` (committed shards
only) and works shard by shard, so memory is bounded by one shard. Each format writes the shard's outputs and
then a per-shard record `out/.fmbseg-export/shard=NNNNNN.json` (written last, like a done marker); a rerun
after a kill skips recorded shards and then (re)builds the final, whole-campaign files from the records, so it
ends with the same output as an uninterrupted run. Shards committed after an export are exported by the next
run. An export folder belongs to one campaign, format and option set (`out/.fmbseg-export/config.json`);
another combination is refused.

Formats (all local folders):
- `coco`: `out/annotations.json`, COCO instances (see `coco_records`); the stored RLE strings go into the JSON
  unchanged (no re-encoding).
- `png`: the mmsegmentation / HF layout: `img_dir/<stem><ext>` (symlinks to the campaign's images, or copies),
  `ann_dir/<stem>.png` label maps, `classes.txt` (one class per line, index order), `palette.json`.
  Label maps are uint8 palette PNGs with 255 = ignore when the vocabulary has at most 255 classes, else 16-bit
  grey PNGs with 65535 = ignore. `<stem>` is the image id without its extension, `/` replaced by `__`.
- `hf`: a Hugging Face `datasets.Dataset` written with `save_to_disk(out)`: `image_id`, `image` (Image, the
  original file's bytes), `label` (Image, the PNG of the `png` format), `width`, `height`, `objects` (a list of
  {`mask_id`, `rle`, `class` (ClassLabel over the vocabulary), `score`, `sam_score`, `stage`, `selected`, `area`,
  `bbox`}).

Only `ok` images are exported (failed images have no masks nor label map).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Literal

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image

from storage.fs import CampaignRoot, dumps_json
from storage.labels import IGNORE
from storage.layout import shard_name
from storage.reader import CampaignReader

EXPORT_FORMATS = ("coco", "png", "hf")
ExportFormat = Literal[EXPORT_FORMATS]
STATE_DIR = ".fmbseg-export"
COCO_FILE = "annotations.json"
PNG_IGNORE = 255
MASK_COLUMNS = ["image_id", "mask_id", "stage", "class_id", "score", "sam_score", "area", "bbox", "height", "width",
                "rle", "selected"]


@dataclass(frozen=True)
class ExportOptions:
    """What defines an export folder: a rerun with other options is refused rather than mixed in."""

    campaign: str
    format: str
    stage1_hash: str
    selected_only: bool = False
    copy: bool = False


# -- small helpers -----------------------------------------------------------------------------------------------
def _write_whole(path: str, data: bytes) -> None:
    CampaignRoot(os.path.dirname(path) or ".").write_bytes(os.path.basename(path), data)


def _state_path(out: str, name: str) -> str:
    return os.path.join(out, STATE_DIR, name)


def _record_name(shard_id: int) -> str:
    return f"shard={shard_name(shard_id)}.json"


def _read_record(out: str, shard_id: int) -> dict | None:
    path = _state_path(out, _record_name(shard_id))
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def label_to_png(label: np.ndarray, num_classes: int, palette: np.ndarray | None = None) -> bytes:
    """(H, W) uint16 campaign label map (65535 = ignore) -> PNG bytes. At most 255 classes: 8-bit with 255 = ignore,
    a palette image when `palette` ((num_classes, 3) uint8) is given (ignore drawn black), else grey; more
    classes: 16-bit grey, 65535 = ignore. `np.array(PIL.Image.open(...))` gives the class indices back."""
    if label.ndim != 2:
        raise ValueError(f"a label map is (H, W), got {label.shape}")
    if num_classes <= 255:
        im = Image.fromarray(np.where(label == IGNORE, PNG_IGNORE, label).astype(np.uint8))  # mode L
        if palette is not None:
            full = np.zeros((256, 3), np.uint8)
            full[: len(palette)] = np.asarray(palette, np.uint8)[:256]
            im.putpalette(full.ravel().tolist())  # L -> P, indices unchanged
    else:
        im = Image.fromarray(label.astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def png_ignore_value(num_classes: int) -> int:
    return PNG_IGNORE if num_classes <= 255 else IGNORE


def image_stem(image_id: str) -> str:
    """File stem of an image in the `png` export: the id without its extension, `/` -> `__`."""
    stem = posixpath.splitext(image_id)[0] if posixpath.splitext(image_id)[1] else image_id
    return stem.replace("\\", "__").replace("/", "__") or "_"


def _input_root(reader: CampaignReader) -> str | None:
    """The folder the campaign's image ids are relative to (COCO `file_name` root)."""
    inputs = reader.manifest.inputs or {}
    images = inputs.get("images")
    if inputs.get("image_root"):
        return inputs["image_root"]
    if images and images.lower().endswith(".json"):
        return posixpath.dirname(images) if "://" in images else os.path.dirname(images)
    return images


def _from_coco(reader: CampaignReader) -> bool:
    images = (reader.manifest.inputs or {}).get("images") or ""
    return images.lower().endswith(".json")


# -- per-shard reading -------------------------------------------------------------------------------------------
@dataclass
class ShardData:
    """One committed shard: ok image rows and their masks (in image order), label maps read on demand."""

    shard_id: int
    image_ids: list[str]
    paths: list[str]
    hw: list[tuple[int, int]]
    masks: pa.Table
    labels: object  # storage.labels.LabelGroup

    def label(self, i: int) -> np.ndarray:
        """(H, W) uint16 label map of the i-th ok image (looked up by id in the shard's label group)."""
        if not hasattr(self, "_pos"):
            self._pos = {image_id: k for k, image_id in enumerate(self.labels.image_ids)}
        pos = self._pos.get(self.image_ids[i])
        if pos is None:
            raise ValueError(f"shard {self.shard_id}: image {self.image_ids[i]!r} has no label map")
        return self.labels.label(pos)

    def masks_of(self) -> dict[str, pa.Table]:
        ids = self.masks.column("image_id").to_pylist()
        starts: dict[str, list[int]] = {}
        for row, image_id in enumerate(ids):
            starts.setdefault(image_id, []).append(row)
        return {k: self.masks.take(pa.array(v)) for k, v in starts.items()}


def read_shard_data(reader: CampaignReader, shard_id: int, selected_only: bool = False) -> ShardData:
    images = reader.images([shard_id])
    ok = [i for i, s in enumerate(images.column("status").to_pylist()) if s == "ok"]
    ids = images.column("image_id").to_pylist()
    paths = images.column("path").to_pylist()
    hs, ws = images.column("height").to_pylist(), images.column("width").to_pylist()
    masks = reader.masks([shard_id], columns=MASK_COLUMNS)
    if selected_only:
        masks = masks.filter(masks.column("selected"))
    return ShardData(shard_id, [ids[i] for i in ok], [paths[i] for i in ok], [(hs[i], ws[i]) for i in ok], masks,
                     reader.labels(shard_id))


# -- coco --------------------------------------------------------------------------------------------------------
def coco_categories(class_names: list[str]) -> list[dict]:
    """COCO categories: `id` = class_id + 1 (COCO ids start at 1), `name` = the class name."""
    return [{"id": k + 1, "name": n, "supercategory": ""} for k, n in enumerate(class_names)]


ANN_IDS_PER_IMAGE = 100_000


def plan_offsets(reader: CampaignReader) -> dict[int, int]:
    """shard id -> number of planned images in the shards before it. An image's 1-based position in the plan is
    its shard's offset + its index in the shard list + 1; shard lists never change once written, so positions are
    stable across exports, reruns and shards committed later. Holds one shard list at a time."""
    offsets, n = {}, 0
    for sid in reader.shards():
        offsets[sid] = n
        n += len(reader.shard_images(sid))
    return offsets


def plan_positions(reader: CampaignReader, shard_id: int, offsets: dict[int, int]) -> dict[str, int]:
    """image_id -> 1-based plan position, for the images of one shard."""
    return {e.image_id: offsets[shard_id] + k + 1 for k, e in enumerate(reader.shard_images(shard_id))}


def coco_records(data: ShardData, image_ids: dict[str, int] | None, input_root: str | None
                 ) -> tuple[list[dict], list[dict]]:
    """COCO `images` and `annotations` of one shard. Image `id`: the campaign's COCO id when it was labelled from a
    COCO JSON (`image_ids` None), else `image_ids[image_id]` (the plan position); `file_name`: the path relative
    to the campaign's input root (absolute when outside it); `fmbseg_image_id`: the campaign id. Annotation `id` =
    image id * 100000 + mask_id (stable, unique); stored RLE string as `segmentation.counts`, stored
    `area`/`bbox`, `iscrowd` 0, `category_id` = class_id + 1, plus `score`, `sam_score`, `stage`, `selected`,
    `mask_id`."""
    per_image = data.masks_of()
    images, anns = [], []
    for i, image_id in enumerate(data.image_ids):
        cid = int(image_id) if image_ids is None else image_ids[image_id]
        path = data.paths[i]
        if input_root and _is_local(path) and _is_local(input_root):
            rel = os.path.relpath(path, input_root)
            file_name = path if rel.startswith("..") else rel.replace(os.sep, "/")
        elif input_root and path.startswith(input_root.rstrip("/") + "/"):
            file_name = path[len(input_root.rstrip("/")) + 1 :]
        else:
            file_name = path
        h, w = data.hw[i]
        images.append({"id": cid, "file_name": file_name, "height": int(h), "width": int(w),
                       "fmbseg_image_id": image_id})
        t = per_image.get(image_id)
        if t is None:
            continue
        cols = t.to_pydict()
        for k in range(t.num_rows):
            anns.append({
                "id": cid * ANN_IDS_PER_IMAGE + int(cols["mask_id"][k]),
                "image_id": cid,
                "category_id": int(cols["class_id"][k]) + 1,
                "segmentation": {"size": [int(cols["height"][k]), int(cols["width"][k])],
                                 "counts": cols["rle"][k].decode("ascii")},
                "area": int(cols["area"][k]),
                "bbox": [float(v) for v in cols["bbox"][k]],
                "iscrowd": 0,
                "score": float(cols["score"][k]),
                "sam_score": float(cols["sam_score"][k]),
                "stage": cols["stage"][k],
                "selected": bool(cols["selected"][k]),
                "mask_id": int(cols["mask_id"][k]),
            })
    return images, anns


def _coco_shard(reader, data, out, offsets, opts) -> dict:
    positions = None if offsets is None else plan_positions(reader, data.shard_id, offsets)
    images, anns = coco_records(data, positions, _input_root(reader))
    part = _state_path(out, f"coco-{shard_name(data.shard_id)}.json")
    _write_whole(part, json.dumps({"images": images, "annotations": anns}, separators=(",", ":")).encode())
    return {"images": len(images), "masks": len(anns), "part": os.path.basename(part)}


def _coco_finish(reader, out, records: list[dict], opts) -> list[str]:
    """Stream every shard's part into one `annotations.json` (one part in memory at a time)."""
    target = os.path.join(out, COCO_FILE)
    tmp = target + ".tmp"
    info = {"description": f"fmbseg campaign {reader.root.url}", "fmbseg_campaign": reader.root.url,
            "stage1_hash": reader.stage1_hash, "image_root": _input_root(reader),
            "category_id": "class_id + 1", "selected_only": opts.selected_only}
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('{"info":' + json.dumps(info, sort_keys=True) + ',"licenses":[],"categories":'
                + json.dumps(coco_categories(reader.vocabulary)))
        for key in ("images", "annotations"):
            f.write(f',"{key}":[')
            first = True
            for rec in records:
                with open(_state_path(out, rec["part"]), encoding="utf-8") as p:
                    items = json.load(p)[key]
                for item in items:
                    f.write(("" if first else ",") + json.dumps(item, separators=(",", ":")))
                    first = False
            f.write("]")
        f.write("}\n")
    os.replace(tmp, target)
    return [target]


# -- png ---------------------------------------------------------------------------------------------------------
def _link_or_copy(src: str, dst: str, copy: bool) -> None:
    tmp = os.path.join(os.path.dirname(dst), ".tmp-" + os.path.basename(dst))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    if not copy and _is_local(src):
        os.symlink(os.path.abspath(src.removeprefix("file://")), tmp)
    else:
        with fsspec.open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo)
    os.replace(tmp, dst)


def _png_shard(reader, data, out, opts, palette) -> dict:
    k = len(reader.vocabulary)
    stems = [image_stem(i) for i in data.image_ids]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"images of shard {data.shard_id} share export file names {dup[:5]}")
    for d in ("img_dir", "ann_dir"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    for i, stem in enumerate(stems):
        src = data.paths[i]
        ext = posixpath.splitext(src)[1] or ".jpg"
        _link_or_copy(src, os.path.join(out, "img_dir", stem + ext), opts.copy)
        _write_whole(os.path.join(out, "ann_dir", stem + ".png"), label_to_png(data.label(i), k, palette))
    return {"images": len(stems), "stems": stems}


def _png_finish(reader, out, records, opts, palette) -> list[str]:
    names = reader.vocabulary
    seen: dict[str, int] = {}
    for rec in records:
        for s in rec["stems"]:
            if s in seen:
                raise ValueError(f"two images of the campaign export to the same file name {s!r} (shards "
                                 f"{seen[s]} and {rec['shard_id']}); rename one of the input files")
            seen[s] = rec["shard_id"]
    classes = os.path.join(out, "classes.txt")
    _write_whole(classes, ("\n".join(names) + "\n").encode())
    pal = {"ignore": png_ignore_value(len(names)), "classes": names,
           "colours": np.asarray(palette).astype(int).tolist() if palette is not None else None}
    _write_whole(os.path.join(out, "palette.json"), dumps_json(pal).encode())
    return [os.path.join(out, "img_dir"), os.path.join(out, "ann_dir"), classes]


# -- hf ----------------------------------------------------------------------------------------------------------
def hf_features(class_names: list[str]):
    """The `datasets.Features` of the `hf` export."""
    from datasets import ClassLabel, Features, Image as HFImage, List, Value

    return Features({
        "image_id": Value("string"),
        "image": HFImage(),
        "label": HFImage(),
        "width": Value("int32"),
        "height": Value("int32"),
        "objects": List({
            "mask_id": Value("int32"),
            "rle": Value("string"),
            "class": ClassLabel(names=list(class_names)),
            "score": Value("float32"),
            "sam_score": Value("float32"),
            "stage": Value("string"),
            "selected": Value("bool"),
            "area": Value("int64"),
            "bbox": List(Value("float32"), length=4),
        }),
    })


def _hf_rows(data: ShardData, k: int, palette) -> Iterator[dict]:
    per_image = data.masks_of()
    for i, image_id in enumerate(data.image_ids):
        with fsspec.open(data.paths[i], "rb") as f:
            image_bytes = f.read()
        objects = []
        t = per_image.get(image_id)
        if t is not None:
            cols = t.to_pydict()
            for j in range(t.num_rows):
                objects.append({"mask_id": cols["mask_id"][j], "rle": cols["rle"][j].decode("ascii"),
                                "class": cols["class_id"][j], "score": cols["score"][j],
                                "sam_score": cols["sam_score"][j], "stage": cols["stage"][j],
                                "selected": cols["selected"][j], "area": cols["area"][j],
                                "bbox": list(cols["bbox"][j])})
        h, w = data.hw[i]
        yield {"image_id": image_id, "image": {"bytes": image_bytes, "path": None},
               "label": {"bytes": label_to_png(data.label(i), k, palette), "path": None},
               "width": int(w), "height": int(h), "objects": objects}


class _QuietDatasets:
    """Silence `datasets`' per-save progress bars (one per shard) for the duration of the export."""

    def __enter__(self):
        import datasets as hf_tqdm

        self.was_disabled = hf_tqdm.are_progress_bars_disabled()
        hf_tqdm.disable_progress_bars()

    def __exit__(self, *exc):
        import datasets as hf_tqdm

        if not self.was_disabled:
            hf_tqdm.enable_progress_bars()


def _hf_dataset(rows: list[dict], class_names: list[str]):
    from datasets import Dataset

    features = hf_features(class_names)
    # `from_list([])` would drop the schema (a shard whose images all failed): build empty columns instead.
    return Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def _hf_shard(reader, data, out, opts, palette) -> dict:
    from datasets import Dataset

    part = _state_path(out, f"hf-{shard_name(data.shard_id)}")
    if os.path.isdir(part):  # left by a killed run: its record was never written
        shutil.rmtree(part)
    rows = list(_hf_rows(data, len(reader.vocabulary), palette))
    ds = _hf_dataset(rows, reader.vocabulary)
    ds.save_to_disk(part)
    return {"images": len(rows), "masks": sum(len(r["objects"]) for r in rows), "part": os.path.basename(part)}


def _hf_finish(reader, out, records, opts) -> list[str]:
    from datasets import concatenate_datasets, load_from_disk

    # Parts of shards without ok images hold no table; `concatenate_datasets` cannot take them.
    parts = [load_from_disk(_state_path(out, r["part"])) for r in records if r["images"]]
    ds = concatenate_datasets(parts) if parts else _hf_dataset([], reader.vocabulary)
    tmp = _state_path(out, "hf-final")
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    ds.save_to_disk(tmp)
    # Swap the new files in: old data files first out, then the new ones; state.json + dataset_info.json last.
    for name in os.listdir(out):
        if name.startswith("data-") and name.endswith(".arrow"):
            os.unlink(os.path.join(out, name))
    names = sorted(os.listdir(tmp), key=lambda n: n.endswith(".json"))
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)
    return [out]


# -- the driver --------------------------------------------------------------------------------------------------
def export_campaign(campaign: str | CampaignReader, fmt: str, out: str, *, selected_only: bool = False,
                    copy: bool = False, palette: np.ndarray | None = None,
                    on_shard: Callable[[int, dict], None] | None = None) -> dict:
    """Export every committed shard of `campaign` into the local folder `out` in format `fmt` (see module doc).

    `palette` ((K, 3) uint8) colours the PNG label maps (`png` and `hf`); `selected_only` keeps only the masks
    of the merged label maps (`coco`, `hf` objects); `copy` copies images instead of symlinking them (`png`).
    `on_shard(shard_id, record)` is called after each newly exported shard. Returns a summary: `shards`,
    `shards_exported` (this run), `shards_skipped`, `images`, `masks`, `files` (the final outputs)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not _is_local(out):
        raise ValueError(f"--out must be a local folder, got {out}")
    reader = campaign if isinstance(campaign, CampaignReader) else CampaignReader(campaign)
    opts = ExportOptions(campaign=reader.root.url if not reader.root.is_local else os.path.abspath(reader.root.url),
                         format=fmt, stage1_hash=reader.stage1_hash, selected_only=bool(selected_only),
                         copy=bool(copy))
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    cfg_path = _state_path(out, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            old = json.load(f)
        if old != asdict(opts):
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in asdict(opts).items() if old.get(k) != v]
            raise ValueError(f"{out} holds another export ({'; '.join(diff)}); use another --out folder")
    else:
        _write_whole(cfg_path, dumps_json(asdict(opts)).encode())
    if palette is not None:
        palette = np.asarray(palette, np.uint8).reshape(-1, 3)

    if fmt == "hf":
        with _QuietDatasets():
            return _export(reader, fmt, out, opts, palette, on_shard)
    return _export(reader, fmt, out, opts, palette, on_shard)


def _export(reader, fmt, out, opts, palette, on_shard) -> dict:
    selected_only = opts.selected_only
    shards = sorted(reader.done())
    records, exported, offsets = [], 0, False
    for sid in shards:
        rec = _read_record(out, sid)
        if rec is None:
            data = read_shard_data(reader, sid, selected_only)
            if fmt == "coco":
                if offsets is False:
                    offsets = None if _from_coco(reader) else plan_offsets(reader)
                rec = _coco_shard(reader, data, out, offsets, opts)
            elif fmt == "png":
                rec = _png_shard(reader, data, out, opts, palette)
            else:
                rec = _hf_shard(reader, data, out, opts, palette)
            rec["shard_id"] = sid
            _write_whole(_state_path(out, _record_name(sid)), dumps_json(rec).encode())
            exported += 1
            if on_shard is not None:
                on_shard(sid, rec)
        records.append(rec)
    if fmt == "coco":
        files = _coco_finish(reader, out, records, opts)
    elif fmt == "png":
        files = _png_finish(reader, out, records, opts, palette)
    else:
        files = _hf_finish(reader, out, records, opts)
    return {"format": fmt, "out": out, "shards": len(shards), "shards_exported": exported,
            "shards_skipped": len(shards) - exported, "images": sum(r["images"] for r in records),
            "masks": sum(r.get("masks", 0) for r in records), "files": files}
