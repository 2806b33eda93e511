"""Campaign-wide maintenance: clearing Stage-1 outputs for `--overwrite`, repointing moved images (`--relocate`).
"""

from __future__ import annotations

from storage.campaign import read_manifest, write_manifest
from storage.fs import CampaignRoot
from storage.layout import (ATTEMPTS_DIR, DONE_DIR, IMAGES_DIR, LABELS_ZARR, MASKS_DIR, RELABEL_ZARR, SHARDS_DIR,
                            images_path)
from storage.markers import read_done_or_none
from storage.planning import (input_root, planned_shards, relative_to_root, resolve, shard_list_path,
                              stored_entries)


def reset_stage1_outputs(root: CampaignRoot) -> None:
    """Remove every Stage-1 output so the campaign is planned and labelled afresh: markers first (nothing stays
    committed), then the public parts and groups (plain readers see none of them), staging, shard lists.
    `campaign.json` is rewritten by the caller afterwards, so a crash in between leaves the old manifest and
    the rerun is refused until `--overwrite` is given again."""
    for rel in (DONE_DIR, IMAGES_DIR, MASKS_DIR, LABELS_ZARR, RELABEL_ZARR, ATTEMPTS_DIR, SHARDS_DIR):
        root.remove(rel, recursive=True)


def _file_size(path: str) -> int | None:
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(path)
        info = fs.info(p)
    except (FileNotFoundError, OSError):
        return None
    return int(info["size"]) if info.get("type") == "file" or "size" in info else None


def relocate_campaign(campaign: str, new_root: str, images: str | None = None, limit: int = 5) -> dict:
    """Repoint a campaign whose images moved to `new_root` (same relative layout). Every planned image must be
    at `new_root/<relative path>` with the size recorded at planning (images of lists without sizes: with the
    height and width recorded in `images`). Refuses, naming the first mismatches, when any is not; otherwise
    rewrites `campaign.json`'s inputs (and turns old absolute-path lists into relative ones, same images in the
    same order). Returns {"images": n, "root": new_root}."""
    from storage.reader import ImageChanged, check_image_size
    from storage.shard_writer import ShardDamaged, read_committed
    from storage.tables import parquet_bytes_to_table

    root = CampaignRoot(campaign)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"no campaign at {campaign} (campaign.json missing)")
    new_root = input_root(new_root) if not new_root.lower().endswith(".json") else input_root(new_root)
    old_root = manifest.inputs.get("root") or (input_root(manifest.inputs["images"], manifest.inputs.get("image_root"))
                                               if manifest.inputs.get("images") else None)
    problems: list[str] = []
    rewrites: dict[int, list[dict]] = {}
    n = 0
    for sid in planned_shards(root):
        entries, relative = stored_entries(root, sid)
        hw = {}
        if not relative or any("size" not in e for e in entries):
            marker = read_done_or_none(root, sid)
            if marker is not None:
                try:
                    t = parquet_bytes_to_table(read_committed(root, marker, images_path(sid)))
                    hw = {i: (h, w) for i, h, w in zip(t.column("image_id").to_pylist(), t.column("height").to_pylist(),
                                                       t.column("width").to_pylist()) if h is not None}
                except ShardDamaged:
                    pass
        fixed = []
        for e in entries:
            n += 1
            rel = e["path"] if relative else (relative_to_root(e["path"], old_root) if old_root else None)
            if rel is None or rel.startswith("../") and not relative:
                problems.append(f"{e['image_id']}: {e['path']} is not under the old root {old_root}")
                continue
            path = resolve(rel, new_root)
            size = _file_size(path)
            if size is None:
                problems.append(f"{e['image_id']}: {path} not found")
            elif e.get("size") is not None and size != e["size"]:
                problems.append(f"{e['image_id']}: {path} has {size} bytes, {e['size']} were planned")
            elif e.get("size") is None and e["image_id"] in hw:
                try:
                    check_image_size(path, hw[e["image_id"]], e["image_id"])
                except ImageChanged as err:
                    problems.append(str(err))
            fixed.append({**e, "path": rel})
        if not relative:
            rewrites[sid] = fixed
    if problems:
        raise ValueError(f"cannot relocate {campaign} to {new_root}: {len(problems)} of {n} images do not match "
                         f"(first: {'; '.join(problems[:limit])})")
    for sid, fixed in rewrites.items():
        root.write_json(shard_list_path(sid), {"shard_id": sid, "images": fixed, "paths": "relative"})
    inputs = dict(manifest.inputs)
    if inputs.get("images", "").lower().endswith(".json"):
        inputs["image_root"] = new_root
        if images:
            inputs["images"] = images
    else:
        inputs["images"] = new_root
    inputs["root"] = new_root
    manifest.inputs = inputs
    write_manifest(root, manifest)
    return {"images": n, "root": new_root}
