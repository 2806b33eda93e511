"""Reading a campaign back: `CampaignReader(root)` (DESIGN §5). Only committed shards (a done marker whose
Stage-1 config hash equals the campaign's) are read; a shard being written or left half-written is invisible."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import pyarrow as pa

from storage.campaign import CampaignManifest, read_manifest
from storage.fs import CampaignRoot
from storage.labels import LabelGroup, open_label_group
from storage.layout import images_path, masks_path
from storage.markers import DoneMarker, done_shards
from storage.planning import ImageEntry, planned_shards, read_shard
from storage.tables import images_schema, masks_schema, parquet_bytes_to_table


class CampaignReader:
    """Read-only view of a campaign. `root` is a local path, an fsspec URL or a `CampaignRoot`."""

    def __init__(self, root: str | os.PathLike | CampaignRoot):
        self.root = root if isinstance(root, CampaignRoot) else CampaignRoot(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"no campaign at {self.root.url} (campaign.json missing)")
        self.manifest: CampaignManifest = manifest
        self.stage1_hash = manifest.stage1_hash()

    @property
    def vocabulary(self) -> list[str]:
        """Class names in `class_id` order."""
        return self.manifest.class_names

    def shards(self) -> list[int]:
        """Every planned shard id (done or not), ascending."""
        return planned_shards(self.root)

    def shard_images(self, shard_id: int) -> list[ImageEntry]:
        return read_shard(self.root, shard_id)

    def done(self) -> dict[int, DoneMarker]:
        """Committed shards' markers by shard id."""
        return done_shards(self.root, self.stage1_hash)

    def _select(self, shards: list[int] | None) -> list[int]:
        done = self.done()
        if shards is None:
            return list(done)
        missing = [s for s in shards if s not in done]
        if missing:
            raise ValueError(f"shards {missing} are not done in {self.root.url}")
        return list(shards)

    def images(self, shards: list[int] | None = None) -> pa.Table:
        """The `images` rows of the given (default: all done) shards, in shard order."""
        tables = [parquet_bytes_to_table(self.root.read_bytes(images_path(s))) for s in self._select(shards)]
        return pa.concat_tables(tables) if tables else images_schema(self.vocabulary).empty_table()

    def masks(self, shards: list[int] | None = None, columns: list[str] | None = None) -> pa.Table:
        """The `masks` rows of the given (default: all done) shards, in shard order."""
        tables = [parquet_bytes_to_table(self.root.read_bytes(masks_path(s))) for s in self._select(shards)]
        table = pa.concat_tables(tables) if tables else masks_schema(self.vocabulary).empty_table()
        return table.select(columns) if columns is not None else table

    def labels(self, shard_id: int) -> LabelGroup:
        """A done shard's `labels.zarr` group."""
        self._select([shard_id])
        return open_label_group(self.root, shard_id)

    def iter_labels(self, shards: list[int] | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
        """(image_id, path, label (H, W) uint16) for every ok image of the done shards, in shard order."""
        for sid in self._select(shards):
            rows = self.images([sid])
            paths = dict(zip(rows.column("image_id").to_pylist(), rows.column("path").to_pylist()))
            group = open_label_group(self.root, sid)
            for i, image_id in enumerate(group.image_ids):
                yield image_id, paths[image_id], group.label(i)
