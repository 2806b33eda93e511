"""Planning a campaign: list the input images and cut them into immutable shards (DESIGN §5 "Planning").

Inputs are either a folder (searched recursively for files whose extension, case-insensitive, is one of
`IMAGE_EXTENSIONS`; `image_id` = the path relative to the folder, POSIX separators; sorted by that id) or a COCO
JSON (`image_id` = the COCO image id as a string; `path` = `file_name` under `image_root`, which defaults to the
JSON's folder; sorted by numeric id). A shard list `shards/NNNNNN.json` never changes once written: images not yet
in any shard are appended as new shards, in input order.

Shard lists store each image's path relative to the campaign's image root (`campaign.json` `inputs.root`) and its
size in bytes at planning time, so a moved image folder is repointed with `fmbseg label --relocate NEW_ROOT`
(checked by size) without touching the lists' membership. Lists written before (absolute paths) read as is.
A lost or corrupt list is never replanned: `load_plan` rebuilds it from the shard's committed `images` rows, or
stops with the repair to run (`fmbseg verify --repair` retires a list whose shard never committed).
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.campaign import read_manifest
from storage.fs import CampaignRoot
from storage.layout import (ATTEMPTS_DIR, DONE_DIR, IMAGES_DIR, MASKS_DIR, SHARDS_DIR, parse_public_dir,
                            parse_shard_file, shard_list_path)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageEntry:
    """One input image: its campaign-wide id and where to read it (absolute local path or fsspec URL)."""

    image_id: str
    path: str
    size: int | None = field(default=None, compare=False)  # bytes at planning time (None: unknown)


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
                    entries.append(ImageEntry(rel, full, _local_size(full)))
    else:
        proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        root = fs._strip_protocol(base).rstrip("/")
        for p, info in fs.find(base, detail=True).items():
            p = fs._strip_protocol(p)
            if is_image_name(p):
                rel = p[len(root) + 1 :]
                entries.append(ImageEntry(rel, f"{proto}://{p}" if proto != "memory" else f"memory://{p}",
                                          info.get("size")))
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
        rows.append((img["id"], ImageEntry(image_id, path, _local_size(path) if local else None)))
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


def _local_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def input_root(images: str, image_root: str | None = None) -> str:
    """The folder image paths are stored relative to: the image folder itself, or a COCO file's `--image-root`
    (default: the JSON's own folder). Local roots are absolute."""
    if images.lower().endswith(".json"):
        if image_root is None:
            return os.path.dirname(os.path.abspath(images)) if "://" not in images else images.rsplit("/", 1)[0]
        return os.path.abspath(image_root) if "://" not in image_root else image_root.rstrip("/")
    return os.path.abspath(images) if "://" not in images else images.rstrip("/")


def relative_to_root(path: str, root: str) -> str:
    """`path` relative to `root` as POSIX (may start with `../` for a COCO name that leaves the root)."""
    if "://" in root:
        prefix = root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path
    return os.path.relpath(os.path.normpath(path), root).replace(os.sep, "/")


def resolve(rel: str, root: str) -> str:
    """A stored relative path under `root` (a local path or URL)."""
    if "://" in root:
        return f"{root.rstrip('/')}/{rel}"
    return os.path.join(root, *rel.split("/"))


def outside_root(path: str, root: str) -> str | None:
    """Why `path` is not inside `root` (`..`, an absolute name, a symlink that leads out), or None when inside.
    Local paths are compared after resolving symlinks."""
    if "://" in root:
        rel = relative_to_root(path, root)
        norm = posixpath.normpath(rel)
        if "://" in rel or rel.startswith("/") or norm == ".." or norm.startswith("../"):
            return "the path leaves the image root"
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
        return None
    lexical = os.path.normpath(path)
    if lexical == real_root or lexical.startswith(real_root.rstrip(os.sep) + os.sep) or \
            lexical.startswith(os.path.normpath(root).rstrip(os.sep) + os.sep):
        return "a symbolic link leads out of the image root"
    return "the path leaves the image root"


class PlanDamaged(ValueError):
    """Shard lists that are missing or corrupt and cannot be rebuilt from committed outputs."""


@dataclass
class _RawList:
    shard_id: int
    images: list[dict]
    relative: bool
    retired: str | None = None


def _parse_list(root: CampaignRoot, shard_id: int) -> _RawList:
    rel = shard_list_path(shard_id)
    data = root.read_bytes(rel)
    if not data:
        raise ValueError("zero bytes")
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("images"), list):
        raise ValueError("no 'images' list")
    if d.get("shard_id") != shard_id:
        raise ValueError(f"names shard {d.get('shard_id')!r}")
    for e in d["images"]:
        if not isinstance(e, dict) or not isinstance(e.get("image_id"), str) or not isinstance(e.get("path"), str):
            raise ValueError("an entry lacks image_id/path")
    return _RawList(shard_id, d["images"], d.get("paths") == "relative", d.get("retired"))


def planned_shards(root: CampaignRoot) -> list[int]:
    """The ids of every shard list in the campaign, ascending."""
    ids = (parse_shard_file(n) for n in root.listdir(SHARDS_DIR))
    return sorted(i for i in ids if i is not None)


def known_shard_ids(root: CampaignRoot) -> set[int]:
    """Every shard id anything in the campaign mentions: lists, markers, public outputs, attempts."""
    ids = set(planned_shards(root))
    ids.update(i for i in (parse_shard_file(n) for n in root.listdir(DONE_DIR)) if i is not None)
    for d in (IMAGES_DIR, MASKS_DIR):
        ids.update(i for i in (parse_public_dir(n) for n in root.listdir(d)) if i is not None)
    ids.update(int(n) for n in root.listdir(ATTEMPTS_DIR) if n.isdigit())
    return ids


def damaged_lists(root: CampaignRoot) -> dict[int, str]:
    """Shard ids whose list is missing (a gap below the highest known id) or unreadable -> the reason."""
    known = known_shard_ids(root)
    out = {}
    for sid in range(max(known) + 1 if known else 0):
        try:
            _parse_list(root, sid)
        except FileNotFoundError:
            out[sid] = "missing"
        except ValueError as e:
            out[sid] = f"corrupt ({e})"
    return out


def recover_list(root: CampaignRoot, shard_id: int) -> bool:
    """Rebuild a lost shard list from the shard's committed `images` rows (one row per image, in list order).
    True when it was rebuilt; False when the shard has no committed, intact `images` file."""
    from storage.markers import read_done_or_none
    from storage.layout import images_path
    from storage.shard_writer import ShardDamaged, read_committed
    from storage.tables import parquet_bytes_to_table

    marker = read_done_or_none(root, shard_id)
    if marker is None:
        return False
    try:
        table = parquet_bytes_to_table(read_committed(root, marker, images_path(shard_id)))
    except ShardDamaged:
        return False
    manifest = read_manifest(root)
    base = (manifest.inputs.get("root") if manifest else None)
    images = []
    for image_id, path in zip(table.column("image_id").to_pylist(), table.column("path").to_pylist()):
        images.append({"image_id": image_id, "path": relative_to_root(path, base) if base else path})
    doc = {"shard_id": shard_id, "images": images, "recovered": "rebuilt from the committed images table"}
    if base:
        doc["paths"] = "relative"
    root.write_json(shard_list_path(shard_id), doc)
    return True


def load_plan(root: CampaignRoot) -> dict[int, _RawList]:
    """Every shard list, after rebuilding lost ones from committed outputs. Raises `PlanDamaged` naming the
    lists that cannot be rebuilt and the repair."""
    bad = damaged_lists(root)
    unrecoverable = {sid: why for sid, why in bad.items() if not recover_list(root, sid)}
    if unrecoverable:
        names = ", ".join(f"{shard_list_path(s)} ({why})" for s, why in sorted(unrecoverable.items())[:5])
        raise PlanDamaged(
            f"campaign {root.url}: shard lists {names} cannot be rebuilt (their shards never committed); planning "
            f"again would give their images a second shard. Run `fmbseg verify --campaign {root.url} --repair` "
            "to retire them (their images are planned anew by the next `fmbseg label`)"
        )
    return {sid: _parse_list(root, sid) for sid in planned_shards(root)}


def read_shard(root: CampaignRoot, shard_id: int, image_root: str | None = None) -> list[ImageEntry]:
    """The shard's images with paths resolved against `image_root` (default: the campaign's `inputs.root`)."""
    try:
        raw = _parse_list(root, shard_id)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"shard {shard_id} is not planned in {root.url} (no {shard_list_path(shard_id)})") from None
    except ValueError as e:
        raise PlanDamaged(f"{root.full_url(shard_list_path(shard_id))} is {e}; run `fmbseg verify --campaign "
                          f"{root.url} --repair`") from None
    if raw.relative:
        if image_root is None:
            manifest = read_manifest(root)
            image_root = manifest.inputs.get("root") if manifest else None
        if not image_root:
            raise ValueError(f"{shard_list_path(shard_id)} holds relative paths but campaign.json names no image root")
        return [ImageEntry(e["image_id"], resolve(e["path"], image_root), e.get("size")) for e in raw.images]
    return [ImageEntry(e["image_id"], e["path"], e.get("size")) for e in raw.images]


def stored_entries(root: CampaignRoot, shard_id: int) -> tuple[list[dict], bool]:
    """The list's raw entries (`image_id`, `path` as stored, `size`) and whether paths are root-relative."""
    raw = _parse_list(root, shard_id)
    return raw.images, raw.relative


def append_shards(root: CampaignRoot, entries: list[ImageEntry], shard_size: int,
                  image_root: str | None = None) -> tuple[list[int], list[int]]:
    """Put every entry not yet planned into new shards of `shard_size` (in `entries` order).

    Returns (all shard ids, the new ones). Existing shard lists are never rewritten (lost ones are rebuilt from
    committed outputs, see `load_plan`); two workers planning the same inputs at once write byte-identical lists.
    With `image_root`, paths are stored relative to it."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard size must be a positive integer, got {shard_size!r}")
    plan = load_plan(root)
    existing = sorted(plan)
    planned: set[str] = set()
    for raw in plan.values():
        planned.update(e["image_id"] for e in raw.images)
    fresh = [e for e in entries if e.image_id not in planned]
    if len({e.image_id for e in fresh}) != len(fresh):
        raise ValueError("duplicate image ids in the input")
    next_id = max(known_shard_ids(root) | set(existing), default=-1) + 1
    new_ids = []
    for start in range(0, len(fresh), shard_size):
        chunk = fresh[start : start + shard_size]
        sid = next_id + len(new_ids)
        doc: dict = {"shard_id": sid, "images": []}
        for e in chunk:
            item = {"image_id": e.image_id, "path": relative_to_root(e.path, image_root) if image_root else e.path}
            if e.size is not None:
                item["size"] = e.size
            doc["images"].append(item)
        if image_root:
            doc["paths"] = "relative"
        root.write_json(shard_list_path(sid), doc)
        new_ids.append(sid)
    return existing + new_ids, new_ids
