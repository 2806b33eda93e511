"""A stable name for a campaign's newest trained checkpoint: `<campaign>/train/latest.json`.

Checkpoints live in folders named after their training hash (`<campaign>/train/<hash>/model.pt`). After every
`train` that ends with a finished checkpoint (a new run, a resumed one, or one that found its checkpoint already
trained), `train/latest.json` is rewritten whole (temp file + rename locally, one PUT on an object store, so a
reader sees the old or the new pointer, never half of one):

    {"checkpoint": "train/<hash>/model.pt", "train_hash": "<hash>", "epochs": 400, "written_at": "...Z"}

`checkpoint` is relative to the campaign root when the checkpoint is inside it (the campaign can move), else the
full path or URL (`train --out` elsewhere). A pointer file rather than a `train/latest/` copy or symlink: object
stores have no symlinks, and a copy of a large checkpoint per training would be wasteful.

`resolve_checkpoint(ref)` turns what a user may pass as `--checkpoint` into a checkpoint path: a `model.pt` path or
URL as is; a campaign folder (holding `campaign.json`), its `train` folder, `<campaign>/train/latest` or
`<campaign>/train/latest.json` through the pointer.
"""

from __future__ import annotations

import datetime
import os

import fsspec

from storage.fs import CampaignRoot

LATEST = "train/latest.json"


def write_latest(campaign: str, checkpoint: str, train_hash: str, epochs: int) -> dict:
    """Point `<campaign>/train/latest.json` at `checkpoint` (a path or URL); returns the pointer written."""
    root = CampaignRoot(campaign)
    fs, path = fsspec.core.url_to_fs(checkpoint)          # the same normal form as the root's (URL or OS path)
    base = root.path.rstrip("/\\")
    inside = type(fs) is type(root.fs) and path.startswith(base) and path[len(base):len(base) + 1] in ("/", "\\")
    # outside the campaign: absolute, since read_latest resolves a relative pointer against the campaign
    outside = checkpoint if "://" in checkpoint else os.path.abspath(checkpoint)
    rel = path[len(base) + 1:].replace("\\", "/") if inside else outside
    pointer = {"checkpoint": rel, "train_hash": train_hash, "epochs": int(epochs),
               "written_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    root.write_json(LATEST, pointer)
    return pointer


def read_latest(campaign: str) -> str | None:
    """The checkpoint path or URL `<campaign>/train/latest.json` names, or None when there is no pointer."""
    root = CampaignRoot(campaign)
    if not root.exists(LATEST):
        return None
    pointer = root.read_json(LATEST)
    target = pointer.get("checkpoint") if isinstance(pointer, dict) else None
    if not isinstance(target, str) or not target:
        raise ValueError(f"{root.full_url(LATEST)} names no checkpoint (got {pointer!r})")
    # written relative to the campaign unless the checkpoint was saved outside it (`train --out`)
    return target if "://" in target or os.path.isabs(target) else root.full_url(target)


def _campaign_of(ref: str) -> str | None:
    """The campaign folder `ref` names through the pointer (see the module docstring), else None."""
    stripped = ref.rstrip("/\\") or ref
    if stripped.endswith(".pt"):
        return None
    candidates = [stripped] + [stripped[: -len(suffix)] for suffix in ("/train/latest.json", "/train/latest", "/train")
                               if stripped.replace("\\", "/").endswith(suffix)]
    return next((c for c in candidates if c and CampaignRoot(c).exists("campaign.json")), None)


def resolve_checkpoint(ref: str) -> str:
    """`--checkpoint` as given -> a checkpoint path or URL (a campaign, `.../train/latest` or
    `.../train/latest.json` through `train/latest.json`; anything else unchanged). FileNotFoundError when it names
    a campaign that has no trained checkpoint yet."""
    campaign = _campaign_of(ref)
    if campaign is None:
        return ref
    target = read_latest(campaign)
    if target is None:
        raise FileNotFoundError(f"{ref}: campaign {campaign} has no {LATEST} yet (no finished `fmbseg train`); "
                                "train first or give the model.pt path")
    return target
