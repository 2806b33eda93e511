"""`campaign.json`: what a campaign was labelled with, and the Stage-1 config hash that decides "done".

The Stage-1 config hash is the sha256 of the canonical JSON (sorted keys, no whitespace) of exactly the fields
that define Stage 1's output (`STAGE1_HASH_FIELDS`): the Stage-1 settings, the vocabulary (names and synonyms),
the preset, the model ids and weight hashes, and the seed. The code version and the input location are recorded
but not hashed: a new release or a moved image folder does not by itself relabel a campaign.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from storage.fs import CampaignRoot, canonical_json
from storage.layout import CAMPAIGN_JSON

FORMAT = "fmbseg-campaign"
FORMAT_VERSION = 1
STAGE1_HASH_FIELDS = ("stage1", "vocabulary", "preset", "models", "seed")


@dataclass
class CampaignManifest:
    """The content of `campaign.json`.

    `stage1`: every Stage-1 setting (nested dicts allowed); `vocabulary`: `{"names": [...], "synonyms": [[...]]}`;
    `models`: `{"clip": {"id": str, "weights_sha256": str | None}, "sam": {...}}`; `inputs`: where the images
    came from (`{"images": path, "image_root": path | None}`)."""

    stage1: dict[str, Any]
    vocabulary: dict[str, Any]
    preset: str
    models: dict[str, dict[str, Any]]
    seed: int
    code_version: str
    inputs: dict[str, Any] = field(default_factory=dict)
    # Every shard also commits a relabel store (`relabel.zarr/`, `fmbseg label --relabel-store`): recorded, not
    # hashed (it adds an output, it changes none). Absent in campaign.json written before it: False.
    relabel_store: bool = False

    @property
    def class_names(self) -> list[str]:
        return list(self.vocabulary["names"])

    def hashed_fields(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in STAGE1_HASH_FIELDS}

    def stage1_hash(self) -> str:
        return hashlib.sha256(canonical_json(self.hashed_fields())).hexdigest()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.relabel_store:
            del d["relabel_store"]  # campaigns without the store keep the campaign.json they always had
        d["format"] = FORMAT
        d["format_version"] = FORMAT_VERSION
        d["stage1_hash"] = self.stage1_hash()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CampaignManifest":
        if d.get("format") != FORMAT:
            raise ValueError(f"not an fmbseg campaign manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"campaign format version {d.get('format_version')} is not supported (need {FORMAT_VERSION})")
        m = cls(**{k: d[k] for k in ("stage1", "vocabulary", "preset", "models", "seed", "code_version")},
                inputs=d.get("inputs") or {}, relabel_store=bool(d.get("relabel_store", False)))
        if d.get("stage1_hash") != m.stage1_hash():
            raise ValueError("campaign.json was edited by hand: its stage1_hash does not match its content")
        return m


def read_manifest(root: CampaignRoot) -> CampaignManifest | None:
    """The campaign's manifest, or None when the root holds no campaign yet."""
    if not root.exists(CAMPAIGN_JSON):
        return None
    return CampaignManifest.from_json(root.read_json(CAMPAIGN_JSON))


def write_manifest(root: CampaignRoot, manifest: CampaignManifest) -> None:
    """Write `campaign.json` whole. The content has no timestamps, so concurrent workers write identical bytes."""
    root.write_json(CAMPAIGN_JSON, manifest.to_json())


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out[prefix] = value


_MISSING = object()


def differing_fields(old: CampaignManifest | dict, new: CampaignManifest | dict) -> list[str]:
    """The Stage-1-defining fields that differ, as dotted names with both values, e.g.
    `"stage1.points_per_class: 5 -> 3"`. Empty when the two configs produce the same Stage-1 output."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten("", old.hashed_fields() if isinstance(old, CampaignManifest) else old, a)
    _flatten("", new.hashed_fields() if isinstance(new, CampaignManifest) else new, b)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va is _MISSING or vb is _MISSING or canonical_json(va) != canonical_json(vb):
            show = lambda v: "(absent)" if v is _MISSING else _short(v)  # noqa: E731
            out.append(f"{key}: {show(va)} -> {show(vb)}")
    return out


def _short(v: Any, limit: int = 60) -> str:
    s = canonical_json(v).decode()
    return s if len(s) <= limit else s[: limit - 3] + "..."
