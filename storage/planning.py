"""Planning a campaign: list the input images and cut them into immutable shards (DESIGN §5 "Planning").

Inputs are either a folder (searched recursively for files whose extension, case-insensitive, is one of
`IMAGE_EXTENSIONS`; `image_id` = the path relative to the folder, POSIX separators; sorted by that id) or a COCO
JSON (`image_id` = the COCO image id as a string; `path` = `file_name` under `image_root`, which defaults to the
JSON's folder; sorted by numeric id). A shard list `shards/NNNNNN.json` never changes once written: images not yet
in any shard are appended as new shards, in input order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.fs import CampaignRoot
from storage.layout import SHARDS_DIR, parse_shard_file, shard_list_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageEntry:
    """One input image: its campaign-wide id and where to read it (absolute local path or fsspec URL)."""

    image_id: str
    path: str


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_image_folder(folder: str) -> list[ImageEntry]:
    """Every image file under `folder` (recursive), sorted by relative POSIX path.

    Symbolic links count as files even when broken: the labeller then reports them as failed rather than
    dropping them silently."""
    fs, base = fsspec.core.url_to_fs(folder)
    if not fs.isdir(base):
        raise FileNotFoundError(f"image folder not found: {folder}")
    entries = []
    if isinstance(fs, LocalFileSystem):
        base = os.path.abspath(base)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if is_image_name(name):
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, base).replace(os.sep, "/")
                    entries.append(ImageEntry(rel, full))
    else:
        proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        root = fs._strip_protocol(base).rstrip("/")
        for p in fs.find(base):
            p = fs._strip_protocol(p)
            if is_image_name(p):
                rel = p[len(root) + 1 :]
                entries.append(ImageEntry(rel, f"{proto}://{p}" if proto != "memory" else f"memory://{p}"))
    entries.sort(key=lambda e: e.image_id)
    return entries


def list_coco_images(json_path: str, image_root: str | None = None) -> list[ImageEntry]:
    """The images of a COCO JSON (`{"images": [{"id": 7, "file_name": "a/b.jpg"}, ...]}`), sorted by id."""
    with fsspec.open(json_path, "rb") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path} is not a COCO file: it has no 'images' list")
    if image_root is None:
        image_root = os.path.dirname(os.path.abspath(json_path)) if "://" not in json_path else json_path.rsplit("/", 1)[0]
    fs, root = fsspec.core.url_to_fs(image_root)
    if not fs.isdir(root):
        raise FileNotFoundError(f"--image-root folder not found: {image_root}")
    local = isinstance(fs, LocalFileSystem)
    seen: set[str] = set()
    rows = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not img.get("file_name"):
            raise ValueError(f"{json_path}: images[{i}] needs an 'id' and a 'file_name'")
        image_id = str(img["id"])
        if image_id in seen:
            raise ValueError(f"{json_path}: image id {image_id} appears twice")
        seen.add(image_id)
        name = str(img["file_name"])
        path = os.path.join(os.path.abspath(image_root), name) if local else f"{image_root.rstrip('/')}/{name}"
        rows.append((img["id"], ImageEntry(image_id, path)))
    # Numeric ids sort numerically (COCO's are ints); string ids after them, in string order.
    rows.sort(key=lambda r: (0, r[0], "") if isinstance(r[0], int) else (1, 0, str(r[0])))
    return [e for _, e in rows]


def list_inputs(images: str, image_root: str | None = None) -> list[ImageEntry]:
    """A folder or a COCO JSON (by extension `.json`), as described in the module docstring."""
    if images.lower().endswith(".json"):
        fs, p = fsspec.core.url_to_fs(images)
        if not fs.isfile(p):
            raise FileNotFoundError(f"COCO file not found: {images}")
        return list_coco_images(images, image_root)
    if image_root is not None:
        raise ValueError("--image-root only applies when --images is a COCO JSON file")
    return list_image_folder(images)


def planned_shards(root: CampaignRoot) -> list[int]:
    """The ids of every shard list in the campaign, ascending."""
    ids = (parse_shard_file(n) for n in root.listdir(SHARDS_DIR))
    return sorted(i for i in ids if i is not None)


def read_shard(root: CampaignRoot, shard_id: int) -> list[ImageEntry]:
    if not root.exists(shard_list_path(shard_id)):
        raise FileNotFoundError(f"shard {shard_id} is not planned in {root.url} (no {shard_list_path(shard_id)})")
    d = root.read_json(shard_list_path(shard_id))
    if d.get("shard_id") != shard_id:
        raise ValueError(f"{shard_list_path(shard_id)} names shard {d.get('shard_id')}")
    return [ImageEntry(e["image_id"], e["path"]) for e in d["images"]]


def append_shards(root: CampaignRoot, entries: list[ImageEntry], shard_size: int) -> tuple[list[int], list[int]]:
    """Put every entry not yet planned into new shards of `shard_size` (in `entries` order).

    Returns (all shard ids, the new ones). Existing shard lists are never rewritten; two workers planning the
    same inputs at once write byte-identical lists."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard size must be a positive integer, got {shard_size!r}")
    existing = planned_shards(root)
    planned: set[str] = set()
    for sid in existing:
        planned.update(e.image_id for e in read_shard(root, sid))
    fresh = [e for e in entries if e.image_id not in planned]
    if len({e.image_id for e in fresh}) != len(fresh):
        raise ValueError("duplicate image ids in the input")
    next_id = existing[-1] + 1 if existing else 0
    new_ids = []
    for start in range(0, len(fresh), shard_size):
        chunk = fresh[start : start + shard_size]
        sid = next_id + len(new_ids)
        root.write_json(
            shard_list_path(sid),
            {"shard_id": sid, "images": [{"image_id": e.image_id, "path": e.path} for e in chunk]},
        )
        new_ids.append(sid)
    return existing + new_ids, new_ids
