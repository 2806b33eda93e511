"""`CampaignDataset`: a campaign's committed pseudo-labels as a PyTorch map-style dataset.

```python
from storage.dataset import CampaignDataset
ds = CampaignDataset("campaign/")                  # committed shards only, ok images only
image, label = ds[0]                               # (H, W, 3) uint8 RGB upright, (H, W) int64, 255 = ignore
loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=4, shuffle=True)
```
It lives in `storage` (not `fmbseg`) because reading a campaign is storage's job and the one-way import rule
(docs/ARCHITECTURE.md) forbids `fmbseg` from importing `storage`.

Random access: the index (shard, position, image id, path) is built once from the `images` tables; label groups
and the reader are opened lazily in each process (on first use after a fork, never pickled), so the dataset is
safe with `num_workers > 0`. Images are read with Pillow, EXIF orientation applied and converted to RGB — the
frame the label maps are in.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import torch
from PIL import Image, ImageOps

from storage.labels import IGNORE
from storage.reader import CampaignReader
from storage.tables import decode_rle

Image.MAX_IMAGE_PIXELS = 250_000_000  # as the labeller (DESIGN §5: huge images are processed up to 250 MP)


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied, of a local path or fsspec URL."""
    with fsspec.open(path, "rb") as f, Image.open(f) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = (np.asarray(im, np.float64) * (255.0 / 65535.0)).round().clip(0, 255).astype(np.uint8)
            return np.repeat(arr[..., None], 3, axis=2)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")  # drop alpha, keep the stored colours
        return np.asarray(im.convert("RGB"))


class CampaignDataset(torch.utils.data.Dataset):
    """Map-style dataset of `(image, label)` over every ok image of a campaign's committed shards, in shard order.

    - `image`: (H, W, 3) uint8 RGB; `label`: (H, W) int64 class ids into `class_names`, uncovered pixels =
      `ignore_index` (default 255; the campaign stores 65535).
    - `transform(image, label) -> anything` is applied last (e.g. to tensors, crops).
    - `image_ids[i]`, `paths[i]`, `class_names` describe the items; `len(ds)` is their number.
    The set of shards is fixed when the dataset is built: shards committed later need a new dataset."""

    def __init__(self, campaign: str | os.PathLike, transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
                 ignore_index: int = 255):
        self.campaign = os.fspath(campaign)
        self.transform = transform
        self.ignore_index = int(ignore_index)
        reader = CampaignReader(self.campaign)
        self.class_names: list[str] = reader.vocabulary
        if self.ignore_index < len(self.class_names) and self.ignore_index >= 0:
            raise ValueError(f"ignore_index {self.ignore_index} is a class id of this {len(self.class_names)}-class "
                             "campaign; pick a value outside 0..K-1 (e.g. -1 or 65535)")
        self.shards: list[int] = sorted(reader.done())
        self.image_ids: list[str] = []
        self.paths: list[str] = []
        self._items: list[tuple[int, int]] = []  # (shard id, position in the shard's label group)
        for sid in self.shards:
            t = reader.images([sid]).select(["image_id", "path", "status"]).to_pydict()
            pos = 0
            # The label group holds the shard's ok images in the `images` rows' order (storage/labels.py).
            for image_id, path, status in zip(t["image_id"], t["path"], t["status"]):
                if status != "ok":
                    continue
                self.image_ids.append(image_id)
                self.paths.append(path)
                self._items.append((sid, pos))
                pos += 1
        self._pid: int | None = None
        self._reader: CampaignReader | None = None
        self._groups: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _reader=None, _groups={})  # open handles stay in the process that made them
        return state

    def _open(self) -> CampaignReader:
        if self._pid != os.getpid() or self._reader is None:
            self._pid, self._reader, self._groups = os.getpid(), CampaignReader(self.campaign), {}
        return self._reader

    def _group(self, shard_id: int):
        reader = self._open()
        group = self._groups.get(shard_id)
        if group is None:
            group = self._groups[shard_id] = reader.labels(shard_id)
        return group

    def label(self, index: int) -> np.ndarray:
        """(H, W) int64 label map of item `index`, ignore = `ignore_index`."""
        sid, pos = self._items[index]
        group = self._group(sid)
        if group.image_ids[pos] != self.image_ids[index]:
            raise ValueError(f"shard {sid}: label group order differs from the images table at "
                             f"{self.image_ids[index]!r}")
        raw = group.label(pos)
        label = raw.astype(np.int64)
        label[raw == IGNORE] = self.ignore_index
        return label

    def image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of item `index`."""
        return read_rgb(self.paths[index])

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, label = self.image(index), self.label(index)
        if image.shape[:2] != label.shape:
            raise ValueError(f"{self.paths[index]} is {image.shape[1]}x{image.shape[0]} but its label map is "
                             f"{label.shape[1]}x{label.shape[0]} (file changed since labeling?)")
        if self.transform is not None:
            return self.transform(image, label)
        return image, label

    def iter_masks(self, selected_only: bool = False) -> Iterator[dict]:
        """Instance-level view, one dict per ok image in dataset order: `image_id`, `path`, `masks` (n, H, W) bool,
        `class_id` (n,) int64, `score` (n,) float32, `sam_score` (n,) float32, `stage` list of "1.1"/"1.2",
        `selected` (n,) bool, `mask_id` (n,) int32. Reads one shard's masks table at a time."""
        reader = self._open()
        cols = ["image_id", "mask_id", "stage", "class_id", "score", "sam_score", "height", "width", "rle", "selected"]
        per_shard: dict[int, int] = {}
        for s, _ in self._items:
            per_shard[s] = per_shard.get(s, 0) + 1
        start = 0
        for sid in self.shards:
            n = per_shard.get(sid, 0)
            ids = self.image_ids[start:start + n]
            t = reader.masks([sid], columns=cols)
            if selected_only:
                t = t.filter(t.column("selected"))
            d = t.to_pydict()
            rows: dict[str, list[int]] = {}
            for r, image_id in enumerate(d["image_id"]):
                rows.setdefault(image_id, []).append(r)
            for k, image_id in enumerate(ids):
                rs = rows.get(image_id, [])
                h, w = (int(d["height"][rs[0]]), int(d["width"][rs[0]])) if rs else self._group(sid).hw[
                    self._items[start + k][1]].tolist()
                masks = np.zeros((len(rs), h, w), bool)
                for j, r in enumerate(rs):
                    masks[j] = decode_rle(d["rle"][r], h, w)
                yield {
                    "image_id": image_id,
                    "path": self.paths[start + k],
                    "masks": masks,
                    "class_id": np.asarray([d["class_id"][r] for r in rs], np.int64),
                    "score": np.asarray([d["score"][r] for r in rs], np.float32),
                    "sam_score": np.asarray([d["sam_score"][r] for r in rs], np.float32),
                    "stage": [d["stage"][r] for r in rs],
                    "selected": np.asarray([d["selected"][r] for r in rs], bool),
                    "mask_id": np.asarray([d["mask_id"][r] for r in rs], np.int32),
                }
            start += n
