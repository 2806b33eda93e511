"""`done/NNNNNN.json`: a shard's commit marker — the commit point of the shard (docs/STORAGE.md).

A shard is done iff its marker exists, parses, and carries the campaign's Stage-1 config hash. The marker names
the attempt whose staged outputs it commits (`attempt`), the sha256 of every output file (`files`: public path ->
sha256; `outputs` keeps the per-output digests of format 1), the shard's counts (so `fmbseg status` reads markers
only) and how long the shard took. Markers written before the attempt protocol (no `attempt`, no `files`) are
read as is: their outputs are already public and are checked through `outputs`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from storage.fs import CampaignRoot
from storage.layout import DONE_DIR, done_path, parse_shard_file

MARKER_FORMAT = 2


class CorruptMarker(ValueError):
    """A done marker that cannot be read (zero bytes, torn or hand-edited JSON, wrong shard)."""

    def __init__(self, rel: str, reason: str):
        super().__init__(f"{rel} is corrupt ({reason})")
        self.rel = rel
        self.reason = reason


@dataclass
class DoneMarker:
    shard_id: int
    stage1_hash: str
    images: int
    ok: int
    failed: int
    masks: int
    outputs: dict[str, str]  # output (parquet file or zarr group) -> sha256 (groups: over sorted key + file hash)
    masks_per_class: dict[str, int] = field(default_factory=dict)  # all masks (both stages) by class name
    selected_per_class: dict[str, int] = field(default_factory=dict)  # masks in the merged label maps
    failure_reasons: dict[str, int] = field(default_factory=dict)  # reason kind -> images
    seconds: float = 0.0
    code_version: str = ""
    attempt: str = ""  # the attempt whose staged files this marker commits ("" = written before attempts)
    files: dict[str, str] = field(default_factory=dict)  # every public output file -> sha256 of its bytes
    format: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DoneMarker":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_marker(rel: str, data: bytes, shard_id: int) -> DoneMarker:
    """Raise `CorruptMarker` for anything but a well-formed marker of `shard_id`."""
    if not data:
        raise CorruptMarker(rel, "zero bytes")
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptMarker(rel, f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise CorruptMarker(rel, "not a JSON object")
    try:
        marker = DoneMarker.from_json(d)
    except TypeError as e:
        raise CorruptMarker(rel, f"missing fields: {e}") from None
    if marker.shard_id != shard_id or not isinstance(marker.stage1_hash, str) or not isinstance(marker.outputs, dict):
        raise CorruptMarker(rel, f"names shard {marker.shard_id!r}" if marker.shard_id != shard_id else "bad fields")
    return marker


def write_done(root: CampaignRoot, marker: DoneMarker) -> None:
    """Write the marker unconditionally (tests and format-1 tools; the commit protocol uses `create_done`)."""
    root.write_json(done_path(marker.shard_id), marker.to_json())


def read_done(root: CampaignRoot, shard_id: int) -> DoneMarker | None:
    """The shard's marker, None when absent; raises `CorruptMarker` when it cannot be read."""
    rel = done_path(shard_id)
    try:
        data = root.read_bytes(rel)
    except FileNotFoundError:
        return None
    return parse_marker(rel, data, shard_id)


def read_done_or_none(root: CampaignRoot, shard_id: int) -> DoneMarker | None:
    """Like `read_done`, but a corrupt marker counts as absent (it commits nothing)."""
    try:
        return read_done(root, shard_id)
    except CorruptMarker:
        return None


def remove_done(root: CampaignRoot, shard_id: int) -> None:
    """Un-commit a shard (readers then ignore it)."""
    root.remove(done_path(shard_id))


def is_done(root: CampaignRoot, shard_id: int, stage1_hash: str) -> bool:
    marker = read_done_or_none(root, shard_id)
    return marker is not None and marker.stage1_hash == stage1_hash


def scan_markers(root: CampaignRoot) -> tuple[dict[int, DoneMarker], dict[int, CorruptMarker]]:
    """Every marker of the campaign (any hash) by shard id, and the corrupt ones with their reason."""
    good: dict[int, DoneMarker] = {}
    bad: dict[int, CorruptMarker] = {}
    for name in root.listdir(DONE_DIR):
        sid = parse_shard_file(name)
        if sid is None:
            continue
        try:
            marker = read_done(root, sid)
        except CorruptMarker as e:
            bad[sid] = e
            continue
        if marker is not None:
            good[sid] = marker
    return dict(sorted(good.items())), dict(sorted(bad.items()))


def done_shards(root: CampaignRoot, stage1_hash: str) -> dict[int, DoneMarker]:
    """Every readable marker whose hash matches `stage1_hash`, by shard id (corrupt markers commit nothing:
    `fmbseg status` and `fmbseg verify` name them)."""
    good, _ = scan_markers(root)
    return {sid: m for sid, m in good.items() if m.stage1_hash == stage1_hash}
