"""`done/NNNNNN.json`: a shard's commit marker, written after every other output of the shard (DESIGN §5 "Done").

A shard is done iff its marker exists and the marker's Stage-1 config hash equals the campaign's. The marker
carries the shard's counts (so `fmbseg status` reads markers only, never the tables), the sha256 of each output,
and how long the shard took.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from storage.fs import CampaignRoot
from storage.layout import DONE_DIR, done_path, parse_shard_file


@dataclass
class DoneMarker:
    shard_id: int
    stage1_hash: str
    images: int
    ok: int
    failed: int
    masks: int
    outputs: dict[str, str]  # output path (relative to the campaign root) -> sha256 of its bytes
    masks_per_class: dict[str, int] = field(default_factory=dict)  # all masks (both stages) by class name
    selected_per_class: dict[str, int] = field(default_factory=dict)  # masks in the merged label maps
    failure_reasons: dict[str, int] = field(default_factory=dict)  # reason kind -> images
    seconds: float = 0.0
    code_version: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DoneMarker":
        return cls(**d)


def write_done(root: CampaignRoot, marker: DoneMarker) -> None:
    """Commit the shard. Call only after all its outputs are written."""
    root.write_json(done_path(marker.shard_id), marker.to_json())


def read_done(root: CampaignRoot, shard_id: int) -> DoneMarker | None:
    if not root.exists(done_path(shard_id)):
        return None
    return DoneMarker.from_json(root.read_json(done_path(shard_id)))


def remove_done(root: CampaignRoot, shard_id: int) -> None:
    """Un-commit a shard before rewriting its outputs (readers then ignore the half-written shard)."""
    root.remove(done_path(shard_id))


def is_done(root: CampaignRoot, shard_id: int, stage1_hash: str) -> bool:
    marker = read_done(root, shard_id)
    return marker is not None and marker.stage1_hash == stage1_hash


def done_shards(root: CampaignRoot, stage1_hash: str) -> dict[int, DoneMarker]:
    """Every marker of the campaign whose hash matches `stage1_hash`, by shard id."""
    out = {}
    for name in root.listdir(DONE_DIR):
        sid = parse_shard_file(name)
        if sid is None:
            continue
        marker = read_done(root, sid)
        if marker is not None and marker.stage1_hash == stage1_hash:
            out[sid] = marker
    return dict(sorted(out.items()))
