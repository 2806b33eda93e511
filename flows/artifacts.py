"""Prefect artifacts of the flows: a labeling progress bar updated per shard, a summary table per labeling run,
the training summary and the evaluation table.

Artifact keys are derived from the campaign (or output) location so that the runs of one campaign line up as
versions of the same artifact in the Prefect UI, and different campaigns never share a key. Prefect allows only
lowercase letters, digits and dashes in a key.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Sequence
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

_KEY_CHARS = re.compile(r"[^a-z0-9]+")


def artifact_key(kind: str, location: str, rank: int | None = None) -> str:
    """`<kind>-<readable tail of location>-<8 hex of sha256(location)>[-rank<r>]`, a valid Prefect key.

    A local `location` is made absolute first, so `./c1` and `/work/c1` name the same campaign."""
    if "://" not in location:
        location = os.path.abspath(location)
    tail = location.rstrip("/").rsplit("/", 1)[-1]
    readable = _KEY_CHARS.sub("-", tail.lower()).strip("-")[:40] or "root"
    digest = hashlib.sha256(location.encode("utf-8")).hexdigest()[:8]
    key = f"{_KEY_CHARS.sub('-', kind.lower()).strip('-')}-{readable}-{digest}"
    return f"{key}-rank{rank}" if rank is not None else key


class ShardProgress:
    """A progress artifact (0-100 %) over a fixed list of shards, updated after each shard."""

    def __init__(self, key: str, total: int, what: str):
        self.total = total
        self.what = what
        self.done = 0
        self.artifact_id: UUID = create_progress_artifact(
            progress=100.0 if total == 0 else 0.0, key=key, description=self._describe()
        )

    def _describe(self) -> str:
        return f"{self.what}: {self.done}/{self.total} shards"

    def advance(self, n: int = 1) -> float:
        """Count `n` more shards finished (done or failed); returns the new percentage."""
        self.done = min(self.total, self.done + n)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        update_progress_artifact(self.artifact_id, progress=pct, description=self._describe())
        return pct


def summarize_label_results(results: Sequence[dict], failed_shards: Sequence[int], seconds: float) -> dict:
    """Totals of one labeling run from `label_shard`'s per-shard dicts.

    Skipped (already done) shards count as shards but add no images: `images_per_s` is the throughput of the work
    this run actually did, over the run's wall time `seconds`."""
    labeled = [r for r in results if not r.get("skipped")]
    images = sum(int(r.get("images", 0)) for r in labeled)
    return {
        "shards": len(results) + len(failed_shards),
        "shards_labeled": len(labeled),
        "shards_skipped": len(results) - len(labeled),
        "shards_failed": len(failed_shards),
        "images": images,
        "images_ok": sum(int(r.get("ok", 0)) for r in labeled),
        "images_failed": sum(int(r.get("failed", 0)) for r in labeled),
        "masks": sum(int(r.get("masks", 0)) for r in labeled),
        "seconds": round(float(seconds), 3),
        "images_per_s": round(images / seconds, 3) if seconds > 0 and images else 0.0,
    }


def publish_label_summary(summary: dict, key: str, campaign: str, rank: int, world_size: int) -> UUID:
    """One-row table: images, masks, failed images, images/s (and shard counts) of this labeling run."""
    row = {"campaign": campaign, "rank": f"{rank}/{world_size}", **summary}
    return create_table_artifact(
        table=[row], key=key, description=f"Labeling run summary for {campaign} (rank {rank} of {world_size})"
    )


def publish_markdown(markdown: str, key: str, description: str) -> UUID:
    return create_markdown_artifact(markdown=markdown, key=key, description=description)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub-flavoured markdown table of dict rows (columns in first-seen order)."""
    if not rows:
        return "_(empty)_"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")
