"""A real writer process for the commit-protocol tests: commits one synthetic shard of a campaign through
`storage.shard_writer.commit_shard` (the code path `label_shard` ends with). Usage:

    python commit_writer.py CAMPAIGN SHARD_ID TAG

The content depends on TAG (each writer's rows are distinguishable); fault points come from the environment
(storage/faults.py). Prints the attempt that holds the marker afterwards and whether it is this writer's."""

from __future__ import annotations

import json
import sys

import numpy as np

from storage.campaign import read_manifest
from storage.fs import CampaignRoot
from storage.labels import IGNORE, PackedLabels
from storage.planning import read_shard
from storage.shard_writer import commit_shard
from storage.tables import encode_masks, images_table, masks_table

COLUMNS = ["image_id", "mask_id", "stage", "class_id", "class_name", "score", "sam_score", "area", "bbox", "height",
           "width", "rle", "selected"]


def shard_content(root: CampaignRoot, shard_id: int, tag: int):
    """(images table, masks table, PackedLabels) of the shard; every image gets 2 masks, `score` = tag."""
    vocab = read_manifest(root).class_names
    rows, cols, packed = [], {k: [] for k in COLUMNS}, PackedLabels()
    for i, e in enumerate(read_shard(root, shard_id)):
        h, w = 20 + i, 24 + tag  # the writers' label maps differ in width: a mixed shard cannot hide
        masks = np.zeros((2, h, w), bool)
        masks[0, : h // 2] = True
        masks[1, h // 2 :, : w // 2] = True
        enc = encode_masks(masks)
        packed.add(e.image_id, np.where(masks[1], 1, np.where(masks[0], 0, IGNORE)).astype(np.uint16))
        rows.append({"image_id": e.image_id, "path": e.path, "status": "ok", "height": h, "width": w, "n_masks": 2})
        for j in range(2):
            for k, v in dict(image_id=e.image_id, mask_id=j, stage="1.1", class_id=j, class_name=vocab[j],
                             score=float(tag), sam_score=0.9, area=enc.area[j], bbox=enc.bbox[j], height=h, width=w,
                             rle=enc.counts[j], selected=True).items():
                cols[k].append(v)
    return images_table(rows, vocab), masks_table(cols, vocab), packed


def main(campaign: str, shard_id: int, tag: int) -> None:
    root = CampaignRoot(campaign)
    images, masks, labels = shard_content(root, shard_id, tag)
    marker = commit_shard(root, shard_id, read_manifest(root).stage1_hash(), images, masks, labels,
                          failure_reasons={}, seconds=0.0, code_version=f"writer-{tag}")
    print(json.dumps({"attempt": marker.attempt, "won": marker.code_version == f"writer-{tag}"}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
