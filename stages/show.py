"""`fmbseg show`: pictures of a campaign's pseudo-labels (one PNG per image, see `fmbseg.show.show_image`).

Reads committed shards only, through `CampaignReader`: the label map from `labels.zarr`, the masks (decoded from
their RLE) from the `masks` table, the image from its recorded path.
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from fmbseg.images import load_image
from fmbseg.show import MaskDrawing, show_image
from storage.fs import write_file
from storage.reader import CampaignReader
from storage.tables import decode_rle

MASK_COLUMNS = ["image_id", "mask_id", "stage", "class_id", "height", "width", "rle", "selected", "score"]


def _file_name(image_id: str) -> str:
    """`sub/dir/a.jpg` -> `sub_dir_a.png` (the id's extension dropped, anything not file-safe -> `_`)."""
    stem = os.path.splitext(image_id)[0] or image_id
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") + ".png"


def show_campaign(campaign: str, out: str, images: int | None = 8, ids: list[str] | None = None,
                  scale: int | None = None) -> list[str]:
    """Write `out/<image id, made file-safe>.png` for the first `images` ok images of the committed shards (shard
    order), or for the given `ids` (an unknown or uncommitted id is an error naming it). Returns the paths."""
    reader = CampaignReader(campaign)
    names = reader.vocabulary
    wanted = list(dict.fromkeys(ids)) if ids else None
    if wanted is None and (images is None or images < 1):
        raise ValueError(f"--images must be >= 1, got {images}")
    os.makedirs(out, exist_ok=True)
    written: list[str] = []
    found: set[str] = set()
    for sid in sorted(reader.done()):
        if wanted is None and len(written) >= images:
            break
        if wanted is not None and len(found) == len(wanted):
            break
        rows = reader.images([sid]).to_pydict()
        paths = {i: p for i, p, s in zip(rows["image_id"], rows["path"], rows["status"]) if s == "ok"}
        group = reader.labels(sid)
        take = [(k, i) for k, i in enumerate(group.image_ids) if wanted is None or i in wanted]
        if wanted is None:
            take = take[: images - len(written)]
        if not take:
            continue
        masks = reader.masks([sid], columns=MASK_COLUMNS).to_pydict()
        for k, image_id in take:
            rs = [r for r, i in enumerate(masks["image_id"]) if i == image_id]
            drawings = [MaskDrawing(decode_rle(masks["rle"][r], masks["height"][r], masks["width"][r]),
                                    masks["stage"][r], names[masks["class_id"][r]], bool(masks["selected"][r]))
                        for r in rs]
            picture = show_image(load_image(paths[image_id]), group.label(k), drawings, names,
                                 title=f"{image_id}  ({len(rs)} masks, shard {sid})", scale=scale)
            path = os.path.join(out, _file_name(image_id))
            write_file(path, _png_bytes(picture))
            written.append(path)
            found.add(image_id)
    if wanted is not None:
        missing = [i for i in wanted if i not in found]
        if missing:
            raise ValueError(f"images not found among the committed ok images of {campaign}: {missing[:10]}")
    return written


def _png_bytes(picture: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()
