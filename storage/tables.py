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


def encode_masks(masks: np.ndarray | Sequence[np.ndarray]) -> EncodedMasks:
    """(n, H, W) bool, or a sequence of n (H, W) bool arrays -> COCO compressed RLEs with their area and box: byte
    for byte what pycocotools' `encode`, `area` and `toBbox` give for the stack as Fortran-ordered uint8.

    Vectorised instead of pycocotools' per-pixel loop over a column-major copy (a transposing copy of every mask
    cost more than the encoding itself): a run changes at column-major position p = c H + i wherever pixel (i, c)
    differs from the pixel before it in column-major order, i.e. from (i - 1, c) for i > 0 — one row-major
    comparison of the mask with itself shifted by a row — or from (H - 1, c - 1) for i = 0; the first run counts
    zeros. Counts, area, box and the 6-bit character coding then run on the few change positions of all masks at
    once. Numpy releases the GIL in every full-size pass. Non-bool masks are read as `mask != 0`."""
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3:
            raise ValueError(f"masks must be (n, H, W), got shape {masks.shape}")
        shape = masks.shape[1:]
    else:
        masks = list(masks)
        shape = np.shape(masks[0]) if masks else (0, 0)
        if len(shape) != 2:
            raise ValueError(f"each mask must be (H, W), got shape {shape}")
    n = len(masks)
    if n == 0:
        return EncodedMasks([], np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
    H, W = (int(v) for v in shape)
    a = H * W
    ends = []  # per mask: the column-major positions where a run ends, then a (= np.cumsum of its counts)
    for m in masks:
        m = np.asarray(m)
        if m.shape != (H, W):
            raise ValueError(f"masks must all be {(H, W)}, got one of shape {m.shape}")
        if m.dtype != np.bool_:
            m = m != 0
        if a == 0:
            ends.append(np.zeros(1, np.int64))
            continue
        within = np.flatnonzero(m[1:] != m[:-1])  # (i - 1) W + c: pixel (i, c) differs from (i - 1, c)
        rows, cols = np.divmod(within, W)
        tops = np.flatnonzero(m[0, 1:] != m[-1, :-1]) + 1  # columns c whose row 0 differs from (H - 1, c - 1)
        pos = np.concatenate([np.zeros(int(m[0, 0]), np.int64), tops * H, cols * H + rows + 1])
        pos.sort()
        ends.append(np.append(pos, a))
    n_counts = np.array([len(e) for e in ends], np.int64)
    start = np.cumsum(n_counts) - n_counts  # each mask's first count in the concatenation
    cum = np.concatenate(ends)
    local = np.arange(len(cum), dtype=np.int64) - np.repeat(start, n_counts)
    counts = np.diff(cum, prepend=0)
    counts[local == 0] = cum[local == 0]
    area = np.add.reduceat(np.where(local % 2 == 1, counts, 0), start)
    # rleToString: x = count, minus the count two before from the fourth count on; 5 bits per character, low
    # first, bit 5 set while more follow (sign-aware), + 48.
    x = counts.copy()
    x[local > 2] -= counts[np.flatnonzero(local > 2) - 2]
    chars = np.empty((len(x), 7), np.uint8)  # |x| < 2^32: at most 7 characters
    emit = np.empty((len(x), 7), bool)
    active = np.ones(len(x), bool)
    for r in range(7):
        c = x & 0x1F
        x >>= 5
        more = np.where(c & 0x10, x != -1, x != 0)
        chars[:, r] = (c | (more << 5)) + 48
        emit[:, r] = active
        active &= more
    text = chars[emit].tobytes()
    n_chars = np.add.reduceat(emit.sum(1), start)
    offsets = np.concatenate([[0], np.cumsum(n_chars)]).tolist()
    rles = [text[offsets[k] : offsets[k + 1]] for k in range(n)]
    return EncodedMasks(rles, area.astype(np.int64), _rle_boxes(cum, local, start, n_counts, H))


def _rle_boxes(cum: np.ndarray, local: np.ndarray, start: np.ndarray, n_counts: np.ndarray, H: int) -> np.ndarray:
    """pycocotools' `toBbox` from the run ends of all masks -> (n, 4) float32 XYWH. It visits each run of ones by
    its first and last pixel; a run that continues into the next column makes the box span every row (its quirk,
    kept), and an empty mask gets zeros."""
    n = len(n_counts)
    n_even = n_counts // 2 * 2  # toBbox drops a trailing run of zeros
    keep = local < np.repeat(n_even, n_counts)
    t = cum[keep] - (local[keep] % 2)  # first pixel of a run of ones, last pixel of it
    y, x = t % H, t // H
    box = np.zeros((n, 4), np.float64)
    has = n_even > 0
    if has.any():
        first = (np.cumsum(n_even) - n_even)[has]
        xs, xe = np.minimum.reduceat(x, first), np.maximum.reduceat(x, first)
        ys, ye = np.minimum.reduceat(y, first), np.maximum.reduceat(y, first)
        wraps = np.maximum.reduceat(x[1::2] > x[0::2], first // 2)
        ys, ye = np.where(wraps, 0, ys), np.where(wraps, H - 1, ye)
        box[has] = np.stack([xs, ys, xe - xs + 1, ye - ys + 1], axis=1)
    return box.astype(np.float32)


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
