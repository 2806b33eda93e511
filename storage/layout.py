"""Where each file of a campaign lives (DESIGN §5), as paths relative to the campaign root.

```
campaign.json
shards/000042.json
images/shard=000042/part-0.parquet
masks/shard=000042/part-0.parquet
labels.zarr/000042/
done/000042.json
```
"""

from __future__ import annotations

import re

CAMPAIGN_JSON = "campaign.json"
SHARDS_DIR = "shards"
DONE_DIR = "done"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
LABELS_ZARR = "labels.zarr"

_SHARD_RE = re.compile(r"^(\d{6,})\.json$")


def shard_name(shard_id: int) -> str:
    """`shard_name(42) == "000042"` (zero-padded to 6 digits, so names sort in shard order)."""
    if not isinstance(shard_id, int) or isinstance(shard_id, bool) or shard_id < 0:
        raise ValueError(f"a shard id is a non-negative int, got {shard_id!r}")
    return f"{shard_id:06d}"


def shard_list_path(shard_id: int) -> str:
    return f"{SHARDS_DIR}/{shard_name(shard_id)}.json"


def images_path(shard_id: int) -> str:
    return f"{IMAGES_DIR}/shard={shard_name(shard_id)}/part-0.parquet"


def masks_path(shard_id: int) -> str:
    return f"{MASKS_DIR}/shard={shard_name(shard_id)}/part-0.parquet"


def labels_group_path(shard_id: int) -> str:
    return f"{LABELS_ZARR}/{shard_name(shard_id)}"


def done_path(shard_id: int) -> str:
    return f"{DONE_DIR}/{shard_name(shard_id)}.json"


def parse_shard_file(name: str) -> int | None:
    """`"000042.json"` -> 42; anything else (temporaries, stray files) -> None."""
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None
