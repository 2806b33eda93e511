"""Where each file of a campaign lives (DESIGN §5), as paths relative to the campaign root.

```
campaign.json
shards/000042.json
images/shard=000042/part-0.parquet
masks/shard=000042/part-0.parquet
labels.zarr/000042/
relabel.zarr/000042/            (campaigns labelled with --relabel-store)
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
RELABEL_ZARR = "relabel.zarr"

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


def relabel_group_path(shard_id: int) -> str:
    return f"{RELABEL_ZARR}/{shard_name(shard_id)}"


def done_path(shard_id: int) -> str:
    return f"{DONE_DIR}/{shard_name(shard_id)}.json"


def parse_shard_file(name: str) -> int | None:
    """`"000042.json"` -> 42; anything else (temporaries, stray files) -> None."""
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


ATTEMPTS_DIR = "_attempts"


def attempts_dir(shard_id: int) -> str:
    """Where the shard's attempts stage their outputs (`_attempts/000042/`): outside `images/`, `masks/` and
    `labels.zarr/`, so no dataset reader of those folders ever lists a staged file."""
    return f"{ATTEMPTS_DIR}/{shard_name(shard_id)}"


def attempt_dir(shard_id: int, attempt: str) -> str:
    return f"{attempts_dir(shard_id)}/{attempt}"


def staged_path(shard_id: int, attempt: str, public_rel: str) -> str:
    """A public output's staged copy: the same relative path under the attempt's directory."""
    return f"{attempt_dir(shard_id, attempt)}/{public_rel}"


def public_dirs(shard_id: int) -> list[str]:
    """The folders that hold a shard's published outputs (and nothing of any other shard)."""
    name = shard_name(shard_id)
    return [f"{IMAGES_DIR}/shard={name}", f"{MASKS_DIR}/shard={name}", labels_group_path(shard_id),
            relabel_group_path(shard_id)]


_PUBLIC_DIR_RE = re.compile(r"^shard=(\d{6,})$")


def parse_public_dir(name: str) -> int | None:
    """`"shard=000042"` -> 42."""
    m = _PUBLIC_DIR_RE.match(name)
    return int(m.group(1)) if m else None
