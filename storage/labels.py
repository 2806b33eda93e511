"""`labels.zarr/NNNNNN/`: one shard's merged pseudo-label maps as a Zarr v3 group (DESIGN §5).

The group holds
- `label` (n, Hmax, Wmax) uint16, image i in `label[i, :h_i, :w_i]`, padding and uncovered pixels 65535;
  chunks of (1, ≤1024, ≤1024), zstd; chunks that are all padding are not stored (Zarr's fill value);
- `hw` (n, 2) int32: each image's (height, width);
- attribute `image_ids`: the n image ids, in the order of the shard's `ok` rows of the `images` table;
- `label` attributes `class_names` (the vocabulary, class-id order) and `ignore_label` (65535), so the array
  explains itself to any Zarr reader.

One shard = one group = one writer. The group is built in memory (`build_label_group`), staged by the commit
protocol under the attempt's directory and published file by file, `zarr.json` files last, with any file of an
older group removed (storage/shard_writer.py); no two writers ever write one public group. Any Zarr v3 reader
opens it, e.g.
`zarr.open_group("campaign/labels.zarr/000042", mode="r")`.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import zarr

from storage.fs import CampaignRoot
from storage.layout import LABELS_ZARR, labels_group_path

IGNORE = 65535
MAX_CHUNK_SIDE = 1024


@dataclass
class PackedLabels:
    """Label maps of one shard held zlib-compressed until the shard is written (a shard of large images would
    otherwise hold hundreds of MB of uint16 maps). `add` in image order."""

    image_ids: list[str] = field(default_factory=list)
    hw: list[tuple[int, int]] = field(default_factory=list)
    _blobs: list[bytes] = field(default_factory=list)

    def add(self, image_id: str, label: np.ndarray) -> None:
        if label.ndim != 2 or label.dtype != np.uint16:
            raise ValueError(f"a label map is (H, W) uint16, got {label.shape} {label.dtype}")
        self.image_ids.append(image_id)
        self.hw.append((int(label.shape[0]), int(label.shape[1])))
        self._blobs.append(zlib.compress(np.ascontiguousarray(label).tobytes(), 1))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for image_id, (h, w), blob in zip(self.image_ids, self.hw, self._blobs):
            yield image_id, np.frombuffer(zlib.decompress(blob), np.uint16).reshape(h, w)


def _root_group_files() -> dict[str, bytes]:
    store: dict = {}
    zarr.create_group(store=zarr.storage.MemoryStore(store))
    return {k: v.to_bytes() for k, v in store.items()}


def build_label_group(labels: PackedLabels, shard_id: int, class_names: list[str] | None = None) -> dict[str, bytes]:
    """The group's files (relative keys such as `zarr.json`, `label/c/0/0/0`) -> bytes. `class_names` (the
    vocabulary in class-id order) and the ignore value go into the `label` array's attributes."""
    n = len(labels)
    hmax = max((h for h, _ in labels.hw), default=0)
    wmax = max((w for _, w in labels.hw), default=0)
    store: dict = {}
    group = zarr.create_group(
        store=zarr.storage.MemoryStore(store),
        attributes={"image_ids": list(labels.image_ids), "shard_id": shard_id, "ignore_label": IGNORE},
    )
    arr = group.create_array(
        "label",
        shape=(n, hmax, wmax),
        chunks=(1, max(1, min(hmax, MAX_CHUNK_SIDE)), max(1, min(wmax, MAX_CHUNK_SIDE))),
        dtype="uint16",
        fill_value=IGNORE,
        dimension_names=("image", "y", "x"),
        config={"write_empty_chunks": False},
        attributes={"ignore_label": IGNORE, **({"class_names": list(class_names)} if class_names is not None else {})},
    )
    for i, (_, label) in enumerate(labels):
        h, w = label.shape
        arr[i, :h, :w] = label
    hw = group.create_array("hw", shape=(n, 2), chunks=(max(n, 1), 2), dtype="int32", fill_value=0,
                            dimension_names=("image", "hw"))
    if n:
        hw[:] = np.asarray(labels.hw, np.int32)
    return {k: v.to_bytes() for k, v in store.items()}


def group_digest(file_hashes: dict[str, str]) -> str:
    """The group's sha256 as done markers record it: over (key, sha256 of the file) of every file, sorted by key.
    `file_hashes`: group-relative key (`label/c/0/0/0`) -> hex sha256."""
    digest = hashlib.sha256()
    for key in sorted(file_hashes):
        digest.update(key.encode() + b"\0" + bytes.fromhex(file_hashes[key]))
    return digest.hexdigest()


def ensure_root_group(root: CampaignRoot, base: str = LABELS_ZARR) -> None:
    """`labels.zarr/zarr.json` (or `base`'s: the parent group; identical bytes from every writer, so a race is
    harmless)."""
    if not root.exists(f"{base}/zarr.json"):
        for key, data in _root_group_files().items():
            root.write_bytes(f"{base}/{key}", data)


def write_label_group(root: CampaignRoot, shard_id: int, labels: PackedLabels,
                      class_names: list[str] | None = None) -> str:
    """Replace the shard's public group with `labels` directly (tools and tests; the commit protocol stages and
    publishes instead); returns the group digest."""
    files = build_label_group(labels, shard_id, class_names)
    base = labels_group_path(shard_id)
    root.remove(base, recursive=True)
    ensure_root_group(root)
    # zarr.json last: a reader that lists the group before the chunks land sees no array yet.
    for key in sorted(files, key=lambda k: (k.endswith("zarr.json"), k)):
        root.write_bytes(f"{base}/{key}", files[key])
    return group_digest({k: hashlib.sha256(v).hexdigest() for k, v in files.items()})


@dataclass
class LabelGroup:
    """A shard's group opened for reading; `label(i)` is image i's (H, W) uint16 map, padding cut off."""

    image_ids: list[str]
    hw: np.ndarray  # (n, 2) int32
    array: zarr.Array

    def label(self, i: int) -> np.ndarray:
        h, w = (int(v) for v in self.hw[i])
        return np.asarray(self.array[i, :h, :w], dtype=np.uint16)


def _label_group(group: zarr.Group) -> LabelGroup:
    image_ids = list(group.attrs["image_ids"])
    hw = np.asarray(group["hw"][:], np.int32).reshape(-1, 2)
    return LabelGroup(image_ids, hw, group["label"])


def label_group_from_files(files: dict[str, bytes]) -> LabelGroup:
    """A group from its files held in memory (group-relative key -> bytes), e.g. after checking their hashes."""
    proto = zarr.core.buffer.default_buffer_prototype()
    store = zarr.storage.MemoryStore({k: proto.buffer.from_bytes(v) for k, v in files.items()}, read_only=True)
    return _label_group(zarr.open_group(store=store, mode="r"))


def open_label_group(root: CampaignRoot, shard_id: int) -> LabelGroup:
    base = labels_group_path(shard_id)
    if not root.exists(f"{base}/zarr.json"):
        raise FileNotFoundError(f"{root.full_url(base)} has no Zarr group")
    if not root.is_local:
        # Object stores: one group is one shard, small once compressed; read it whole into memory.
        return label_group_from_files({k: root.read_bytes(f"{base}/{k}") for k in root.find(base)})
    return _label_group(zarr.open_group(store=zarr.storage.LocalStore(root.full(base), read_only=True), mode="r"))
