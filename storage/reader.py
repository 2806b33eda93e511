"""Reading a campaign back: `CampaignReader(root)` — THE committed view (DESIGN §5, docs/STORAGE.md).

Only committed shards (a readable done marker whose Stage-1 config hash equals the campaign's) are read, and
every file read is checked against the sha256 its marker records: a deleted zarr chunk, a truncated or replaced
Parquet part raises `ShardDamaged` naming the file and the repair, never a silent gap. A committed shard whose
publish has not finished yet is read from its staged copy. Image paths come from the shard lists, resolved against
the campaign's current image root (so `fmbseg label --relocate` repoints every reader).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import pyarrow as pa

from storage.campaign import CampaignManifest, read_manifest
from storage.fs import CampaignRoot
from storage.labels import LabelGroup, label_group_from_files
from storage.layout import images_path, masks_path
from storage.markers import DoneMarker, done_shards
from storage.planning import ImageEntry, planned_shards, read_shard
from storage.shard_writer import ShardDamaged, read_committed, read_committed_group
from storage.tables import images_schema, masks_schema, parquet_bytes_to_table

__all__ = ["CampaignReader", "ShardDamaged", "ImageChanged", "check_image_size"]


class ImageChanged(ValueError):
    """An input image whose size is no longer the one recorded when it was labelled (replaced, rotated, moved)."""


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file as the labeller saw it (EXIF orientations 5-8 swap the axes); reads the
    header only."""
    import fsspec
    from PIL import Image

    with fsspec.open(path, "rb") as f, Image.open(f) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def check_image_size(path: str, hw: tuple[int, int], image_id: str = "") -> None:
    """Raise `ImageChanged` unless the image at `path` still has the (height, width) recorded in `images`."""
    try:
        got = image_size(path)
    except FileNotFoundError:
        raise ImageChanged(f"image {image_id or path} is gone from {path}; if the images moved, repoint the "
                           "campaign with `fmbseg label --campaign C --relocate NEW_ROOT`") from None
    except Exception as e:
        raise ImageChanged(f"image {image_id or path} at {path} no longer reads as an image "
                           f"({type(e).__name__})") from None
    if tuple(got) != tuple(int(v) for v in hw):
        raise ImageChanged(f"image {image_id or path} at {path} is {got[0]}x{got[1]} (HxW) but was labelled at "
                           f"{hw[0]}x{hw[1]}: the file was replaced; relabel it (`fmbseg label --overwrite`) or "
                           "restore the original")


class CampaignReader:
    """Read-only view of a campaign. `root` is a local path, an fsspec URL or a `CampaignRoot`."""

    def __init__(self, root: str | os.PathLike | CampaignRoot):
        self.root = root if isinstance(root, CampaignRoot) else CampaignRoot(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"no campaign at {self.root.url} (campaign.json missing)")
        self.manifest: CampaignManifest = manifest
        self.stage1_hash = manifest.stage1_hash()
        self._done: dict[int, DoneMarker] | None = None

    @property
    def vocabulary(self) -> list[str]:
        """Class names in `class_id` order."""
        return self.manifest.class_names

    @property
    def image_root(self) -> str | None:
        """The folder stored image paths are relative to (None for campaigns planned before relative paths)."""
        return self.manifest.inputs.get("root")

    def shards(self) -> list[int]:
        """Every planned shard id (done or not), ascending."""
        return planned_shards(self.root)

    def shard_images(self, shard_id: int) -> list[ImageEntry]:
        return read_shard(self.root, shard_id, self.image_root)

    def done(self) -> dict[int, DoneMarker]:
        """Committed shards' markers by shard id (read once per reader)."""
        if self._done is None:
            self._done = done_shards(self.root, self.stage1_hash)
        return self._done

    def _select(self, shards: list[int] | None) -> list[int]:
        done = self.done()
        if shards is None:
            return list(done)
        missing = [s for s in shards if s not in done]
        if missing:
            raise ValueError(f"shards {missing} are not done in {self.root.url}")
        return list(shards)

    def _table(self, sid: int, rel: str) -> pa.Table:
        data = read_committed(self.root, self.done()[sid], rel)
        try:
            return parquet_bytes_to_table(data)
        except Exception as e:  # bytes match the marker, yet do not parse: written broken
            raise ShardDamaged(f"shard {sid}: {rel} does not parse as Parquet ({type(e).__name__}: {e})") from None

    def images(self, shards: list[int] | None = None) -> pa.Table:
        """The `images` rows of the given (default: all done) shards, in shard order."""
        tables = [self._table(s, images_path(s)) for s in self._select(shards)]
        return pa.concat_tables(tables) if tables else images_schema(self.vocabulary).empty_table()

    def masks(self, shards: list[int] | None = None, columns: list[str] | None = None) -> pa.Table:
        """The `masks` rows of the given (default: all done) shards, in shard order."""
        tables = [self._table(s, masks_path(s)) for s in self._select(shards)]
        table = pa.concat_tables(tables) if tables else masks_schema(self.vocabulary).empty_table()
        return table.select(columns) if columns is not None else table

    def labels(self, shard_id: int) -> LabelGroup:
        """A done shard's `labels.zarr` group, every file checked against the marker (held in memory: a shard's
        compressed maps are small)."""
        self._select([shard_id])
        files = read_committed_group(self.root, self.done()[shard_id])
        try:
            return label_group_from_files(files)
        except Exception as e:
            raise ShardDamaged(
                f"shard {shard_id}: labels.zarr group does not decode ({type(e).__name__}: {e})") from None

    def iter_labels(self, shards: list[int] | None = None,
                    check_images: bool = False) -> Iterator[tuple[str, str, np.ndarray]]:
        """(image_id, path, label (H, W) uint16) for every ok image of the done shards, in shard order. `path` is
        where the image is now (the shard list under the campaign's current image root). With `check_images` (for
        `train`), each image's header is read and an image whose size differs from the label map's raises
        `ImageChanged`."""
        for sid in self._select(shards):
            paths = {e.image_id: e.path for e in self.shard_images(sid)}
            group = self.labels(sid)
            for i, image_id in enumerate(group.image_ids):
                label = group.label(i)
                if check_images:
                    check_image_size(paths[image_id], label.shape, image_id)
                yield image_id, paths[image_id], label
