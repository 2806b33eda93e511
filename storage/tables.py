"""The `images` and `masks` Parquet tables of DESIGN §5: exact Arrow schemas, COCO RLE encoding, write and read.

Both tables carry schema metadata `fmbseg_schema_version` = "1" and `vocabulary` = JSON list of class names in
`class_id` order, so a trainer needs nothing but pyarrow (and pycocotools for the masks) to consume them.
Masks are COCO compressed RLE: `pycocotools.mask.decode({"size": [height, width], "counts": rle})`.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

SCHEMA_VERSION = "1"

IMAGES_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" | "failed"
    pa.field("error", pa.string()),  # null when ok
    pa.field("height", pa.int32()),  # null when the file could not be decoded at all
    pa.field("width", pa.int32()),
    pa.field("n_masks", pa.int32(), nullable=False),
]

MASKS_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("mask_id", pa.int32(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),  # "1.1" | "1.2"
    pa.field("class_id", pa.int32(), nullable=False),
    pa.field("class_name", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("sam_score", pa.float32(), nullable=False),
    pa.field("area", pa.int64(), nullable=False),
    pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),  # x, y, w, h (pycocotools toBbox)
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("rle", pa.binary(), nullable=False),
    pa.field("selected", pa.bool_(), nullable=False),
]

# pycocotools 2.0.11 under numpy 2 overflows (`OverflowError ... uint8`) when `area` gets more than 255 RLEs.
_AREA_CHUNK = 255


def _metadata(vocabulary: Sequence[str]) -> dict[bytes, bytes]:
    return {b"fmbseg_schema_version": SCHEMA_VERSION.encode(), b"vocabulary": json.dumps(list(vocabulary)).encode()}


def images_schema(vocabulary: Sequence[str]) -> pa.Schema:
    return pa.schema(IMAGES_FIELDS, metadata=_metadata(vocabulary))


def masks_schema(vocabulary: Sequence[str]) -> pa.Schema:
    return pa.schema(MASKS_FIELDS, metadata=_metadata(vocabulary))


@dataclass
class EncodedMasks:
    """COCO RLEs of n masks of one image, with the figures the `masks` table stores."""

    counts: list[bytes]  # compressed RLE counts
    area: np.ndarray  # (n,) int64 pixel counts
    bbox: np.ndarray  # (n, 4) float32 XYWH, pycocotools `toBbox`


def encode_masks(masks: np.ndarray) -> EncodedMasks:
    """(n, H, W) bool -> COCO compressed RLEs (row-major masks go to pycocotools as Fortran-ordered uint8)."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (n, H, W), got shape {masks.shape}")
    n = masks.shape[0]
    if n == 0:
        return EncodedMasks([], np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8, copy=False))
    rles = mask_utils.encode(fortran)
    area = np.concatenate(
        [np.asarray(mask_utils.area(rles[i : i + _AREA_CHUNK]), np.int64) for i in range(0, n, _AREA_CHUNK)]
    )
    bbox = np.asarray(mask_utils.toBbox(rles), np.float32).reshape(n, 4)
    return EncodedMasks([r["counts"] for r in rles], area, bbox)


def decode_rle(rle: bytes, height: int, width: int) -> np.ndarray:
    """A `masks` row's `rle` -> (H, W) bool."""
    with warnings.catch_warnings():
        # pycocotools 2.0.11 trips numpy 2's `copy` keyword deprecation on every decode; harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode({"size": [int(height), int(width)], "counts": rle}).astype(bool)


def images_table(rows: Sequence[dict], vocabulary: Sequence[str]) -> pa.Table:
    """Rows are dicts with the `images` columns (missing optional values -> null)."""
    schema = images_schema(vocabulary)
    cols = {f.name: [r.get(f.name) for r in rows] for f in IMAGES_FIELDS}
    for r in rows:
        if r["status"] not in ("ok", "failed"):
            raise ValueError(f"image status must be 'ok' or 'failed', got {r['status']!r}")
    return pa.Table.from_pydict(cols, schema=schema)


def masks_table(columns: dict[str, Sequence], vocabulary: Sequence[str]) -> pa.Table:
    """Columns of the `masks` table (every required column; `bbox` as an (n, 4) array or list of 4-lists)."""
    schema = masks_schema(vocabulary)
    missing = [f.name for f in MASKS_FIELDS if f.name not in columns]
    if missing:
        raise ValueError(f"masks table lacks columns {missing}")
    arrays = []
    for f in MASKS_FIELDS:
        v = columns[f.name]
        if f.name == "bbox":
            flat = pa.array(np.asarray(v, np.float32).reshape(-1), pa.float32())
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, 4))
        else:
            arrays.append(pa.array(v, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """One Parquet file in memory (zstd), ready for a whole-file write."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def parquet_bytes_to_table(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def table_vocabulary(table: pa.Table) -> list[str]:
    """The `vocabulary` schema metadata of an `images`/`masks` table."""
    meta = table.schema.metadata or {}
    if meta.get(b"fmbseg_schema_version") != SCHEMA_VERSION.encode():
        raise ValueError(f"not an fmbseg table of schema version {SCHEMA_VERSION}")
    return json.loads(meta[b"vocabulary"])
