"""`relabel.zarr/NNNNNN/`: one shard's relabel store — per image, the named arrays of Stage 1's
vocabulary-independent results (`fmbseg.kept`), so `fmbseg relabel` can label the shard with another vocabulary
without running the image encoders (docs/STORAGE.md "Relabel store").

Images have arrays of different shapes (crop counts, grid sizes, mask counts), so each name is stored flat:
- `<name>/values`: 1-D, every image's array flattened (C order) and concatenated in image order;
- `<name>/shape`: (n, ndim) int64, each image's shape; a row of -1 when the image has no such array (e.g. no SAM
  pass); the offset of image i is the sum of the sizes of images before it;
- group attributes: `image_ids` (the n images, in the order of the shard's `ok` rows), `shard_id`,
  `format` ("fmbseg-relabel-store"), `format_version` (1), `arrays` ({name: {"dtype", "encoding"}}).

Encoding is lossless: a float32 array whose every value is a bfloat16 (the low 16 bits of each float are zero,
as for SAM's encoder output under CUDA bf16 autocast) is stored as uint16 bit patterns, `encoding` "bfloat16"
(value = uint16 << 16 reinterpreted as float32); everything else is stored in its own dtype, `encoding` "raw".
Chunks are zstd-compressed. The group is built in memory (`build_relabel_group`) and committed with the shard's
other outputs (storage/shard_writer.py), every file's sha256 in the done marker.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import zarr

from storage.layout import RELABEL_ZARR, relabel_group_path

FORMAT = "fmbseg-relabel-store"
FORMAT_VERSION = 1
CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per chunk file


def _encode(values: np.ndarray) -> tuple[np.ndarray, str]:
    if values.dtype == np.float32:
        bits = values.view(np.uint32)
        if not (bits & np.uint32(0xFFFF)).any():
            return (bits >> np.uint32(16)).astype(np.uint16), "bfloat16"
    return values, "raw"


def _decode(values: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "bfloat16":
        return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if encoding != "raw":
        raise ValueError(f"unknown relabel-store encoding {encoding!r}")
    return values


def build_relabel_group(image_ids: Sequence[str], records: Sequence[dict[str, np.ndarray]],
                        shard_id: int) -> dict[str, bytes]:
    """The group's files (group-relative key -> bytes) for `records[i]` = image i's {name: array}. A name's dtype
    and number of dimensions must be the same in every image that has it."""
    if len(image_ids) != len(records):
        raise ValueError(f"{len(image_ids)} image ids for {len(records)} records")
    n = len(records)
    names = sorted({k for r in records for k in r})
    store: dict = {}
    arrays_meta: dict[str, dict] = {}
    group = zarr.create_group(store=zarr.storage.MemoryStore(store))
    for name in names:
        present = [np.asarray(r[name]) for r in records if name in r]
        dtypes = {a.dtype.str for a in present}
        ndims = {a.ndim for a in present}
        if len(dtypes) != 1 or len(ndims) != 1:
            raise ValueError(f"relabel store: {name!r} has dtypes {sorted(dtypes)} / ndims {sorted(ndims)} across "
                             "images; one of each is required")
        ndim = ndims.pop()
        shape = np.full((n, ndim), -1, np.int64)
        for i, r in enumerate(records):
            if name in r:
                shape[i] = np.asarray(r[name]).shape
        values = np.concatenate([a.reshape(-1) for a in present])
        values, encoding = _encode(values)
        arrays_meta[name] = {"dtype": np.dtype(dtypes.pop()).name, "encoding": encoding}
        sub = group.create_group(name)
        v = sub.create_array("values", shape=values.shape, chunks=(max(1, min(values.size, CHUNK_ELEMENTS)),),
                             dtype=values.dtype, fill_value=0, compressors=zarr.codecs.ZstdCodec(level=1),
                             config={"write_empty_chunks": True})
        if values.size:
            v[:] = values
        s = sub.create_array("shape", shape=shape.shape, chunks=(max(n, 1), max(ndim, 1)), dtype="int64",
                             fill_value=-1)
        if shape.size:
            s[:] = shape
    group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "shard_id": int(shard_id),
                        "image_ids": list(image_ids), "arrays": arrays_meta})
    return {k: v.to_bytes() for k, v in store.items()}


def read_relabel_group(files: dict[str, bytes]) -> dict[str, dict[str, np.ndarray]]:
    """The group's files (group-relative key -> bytes, e.g. checked against the done marker) -> {image_id: {name:
    array}}, arrays in their original dtype and shape."""
    proto = zarr.core.buffer.default_buffer_prototype()
    store = zarr.storage.MemoryStore({k: proto.buffer.from_bytes(v) for k, v in files.items()}, read_only=True)
    group = zarr.open_group(store=store, mode="r")
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"not a relabel store of format {FORMAT} v{FORMAT_VERSION} (got {attrs.get('format')!r} "
                         f"v{attrs.get('format_version')!r})")
    ids = list(attrs["image_ids"])
    out: dict[str, dict[str, np.ndarray]] = {i: {} for i in ids}
    for name, meta in attrs["arrays"].items():
        values = _decode(np.asarray(group[name]["values"][:]), meta["encoding"]).astype(meta["dtype"], copy=False)
        shapes = np.asarray(group[name]["shape"][:], np.int64).reshape(len(ids), -1)
        start = 0
        for image_id, shape in zip(ids, shapes):
            if (shape < 0).any():
                continue
            size = int(np.prod(shape))
            out[image_id][name] = values[start : start + size].reshape(tuple(int(d) for d in shape))
            start += size
    return out


def relabel_file_prefix(shard_id: int) -> str:
    """The campaign-relative prefix of the shard's relabel-store files (as its done marker names them)."""
    return relabel_group_path(shard_id) + "/"


def has_relabel_store(files: dict[str, str], shard_id: int) -> bool:
    """Whether a done marker's `files` (path -> sha256) commit a relabel store for the shard."""
    prefix = relabel_file_prefix(shard_id)
    return any(rel.startswith(prefix) for rel in files)


__all__ = ["RELABEL_ZARR", "build_relabel_group", "read_relabel_group", "has_relabel_store", "relabel_file_prefix"]
