"""Committing one shard: its `images` and `masks` Parquet files, its `labels.zarr` group, then the done marker.

Order matters (DESIGN §5): the marker is written last, so a worker killed at any moment leaves either a committed
shard or one a rerun recomputes. Every file is written whole.
"""

from __future__ import annotations

import hashlib
import time

import pyarrow as pa

from storage.fs import CampaignRoot
from storage.labels import PackedLabels, write_label_group
from storage.layout import images_path, labels_group_path, masks_path
from storage.markers import DoneMarker, write_done
from storage.tables import table_to_parquet_bytes, table_vocabulary


def write_shard_outputs(
    root: CampaignRoot, shard_id: int, images: pa.Table, masks: pa.Table, labels: PackedLabels
) -> dict[str, str]:
    """Write the shard's three outputs (not the marker); returns {output path: sha256}."""
    outputs = {}
    for rel, table in ((images_path(shard_id), images), (masks_path(shard_id), masks)):
        data = table_to_parquet_bytes(table)
        root.write_bytes(rel, data)
        outputs[rel] = hashlib.sha256(data).hexdigest()
    outputs[labels_group_path(shard_id)] = write_label_group(root, shard_id, labels, table_vocabulary(masks))
    return outputs


def commit_shard(
    root: CampaignRoot,
    shard_id: int,
    stage1_hash: str,
    images: pa.Table,
    masks: pa.Table,
    labels: PackedLabels,
    *,
    failure_reasons: dict[str, int],
    seconds: float,
    code_version: str,
) -> DoneMarker:
    """Write the outputs, then the marker. Counts are taken from the tables themselves."""
    t0 = time.perf_counter()
    outputs = write_shard_outputs(root, shard_id, images, masks, labels)
    status = images.column("status").to_pylist()
    names = masks.column("class_name").to_pylist()
    selected = masks.column("selected").to_pylist()
    per_class: dict[str, int] = {}
    sel_per_class: dict[str, int] = {}
    for name, sel in zip(names, selected):
        per_class[name] = per_class.get(name, 0) + 1
        if sel:
            sel_per_class[name] = sel_per_class.get(name, 0) + 1
    marker = DoneMarker(
        shard_id=shard_id,
        stage1_hash=stage1_hash,
        images=len(status),
        ok=status.count("ok"),
        failed=status.count("failed"),
        masks=masks.num_rows,
        outputs=outputs,
        masks_per_class=dict(sorted(per_class.items())),
        selected_per_class=dict(sorted(sel_per_class.items())),
        failure_reasons=dict(sorted(failure_reasons.items())),
        seconds=round(seconds + time.perf_counter() - t0, 4),
        code_version=code_version,
    )
    write_done(root, marker)
    return marker
