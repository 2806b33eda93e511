"""The Stage-2 feature cache `features/<encoder-key>.zarr` (DESIGN §1, §5): frozen DINOv2 patch features of
every training image, fp16, so epochs after the first read them from disk instead of recomputing them. On by
default when the disk has room (`stages.train.resolve_cache`); `fmbseg train --no-cache` opts out.

Zarr v3 group with one array `features` (N, h, w, C) float16, one uncompressed chunk per image (random fp16
features do not compress; uncompressed chunks read fastest), and attributes `image_ids`, `encoder`, `train_size`
and `complete`. `complete` is set only after every image has been written, so a cache left half-written by an
interrupted first epoch is rebuilt rather than read.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import torch
import zarr

from storage.fs import CampaignRoot


def encoder_key(model_id: str, weights_sha256: str | None, train_size: int, image_ids: list[str]) -> str:
    """`<model id, filename-safe>-<train size>-<12 hex of the encoder, size and image list>`."""
    digest = hashlib.sha256(json.dumps([model_id, weights_sha256, train_size, image_ids]).encode()).hexdigest()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")
    return f"{safe}-{train_size}-{digest[:12]}"


def cache_nbytes(n: int, grid: int, channels: int) -> int:
    """Bytes of the cached features: N · h · w · C · 2 (fp16)."""
    return n * grid * grid * channels * 2


class FeatureCache:
    """features (N, grid, grid, C) fp16 for the campaign's training images, in the training image order."""

    def __init__(self, root: CampaignRoot, key: str, image_ids: list[str], grid: int, channels: int):
        self.rel = f"features/{key}.zarr"
        self.url = root.full_url(self.rel)
        self.image_ids = list(image_ids)
        self.shape = (len(image_ids), grid, grid, channels)
        self._array = None

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self.shape[0], self.shape[1], self.shape[3])

    def is_complete(self) -> bool:
        """True when a finished cache of exactly these images and shape exists."""
        try:
            group = zarr.open_group(self.url, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
            return False
        attrs = dict(group.attrs)
        if not attrs.get("complete") or attrs.get("image_ids") != self.image_ids or "features" not in group:
            return False
        arr = group["features"]
        if tuple(arr.shape) != self.shape:
            return False
        self._array = arr
        return True

    def create(self) -> None:
        """Start a fresh cache (any previous one at this key is replaced)."""
        group = zarr.open_group(self.url, mode="w", attributes={
            "image_ids": self.image_ids, "complete": False, "dtype": "float16"})
        self._array = group.create_array(
            "features", shape=self.shape, chunks=(1, *self.shape[1:]), dtype="float16", compressors=None,
            fill_value=0.0, dimension_names=("image", "y", "x", "channel"))

    def write(self, indices: list[int], feats: torch.Tensor) -> None:
        """feats (B, grid, grid, C) for the images at `indices` (positions in the training order)."""
        data = feats.detach().to("cpu", torch.float16).numpy()
        for i, f in zip(indices, data):
            self._array[int(i)] = f

    def read(self, indices: list[int]) -> torch.Tensor:
        """-> (B, grid, grid, C) float16 CPU tensor."""
        return torch.from_numpy(np.stack([self._array[int(i)] for i in indices]))

    def read_host(self, indices: list[int], pin: bool = False) -> torch.Tensor:
        """`read`, in page-locked memory when `pin` (so the copy to a CUDA device can run asynchronously)."""
        feats = self.read(indices)
        return feats.pin_memory() if pin else feats

    def mark_complete(self) -> None:
        group = zarr.open_group(self.url, mode="r+")
        group.attrs["complete"] = True
