"""Self-describing Stage-2 checkpoints, written atomically and loaded with `weights_only=True`.

A checkpoint is one dict:
`{"model": state_dict, "config": {"alignment": ..., "train": ...}, "vocabulary": {"names", "synonyms"},
  "text": (K, D) float32 text anchors, "encoders": {"dino": {"model_id", "weights_sha256"},
  "clip": {...}, "preset": str}, "temperature": τ, "version": fmbseg.__version__, "epoch": finished epochs,
  "epochs": planned epochs, "train_hash": str}`, plus `"resume": {"optimizer", "scheduler", "rng"}` so an
interrupted run continues from its last finished epoch.
"""

from __future__ import annotations

import io
import os
import tempfile

import fsspec
import torch

REQUIRED_KEYS = ("model", "config", "vocabulary", "encoders", "temperature", "version", "epoch")


def _is_url(path: str) -> bool:
    return "://" in str(path)


def save_checkpoint(path: str, payload: dict) -> None:
    """Write `payload` whole: locally a temp file in the same folder, fsync, then rename over `path`; on an fsspec
    URL one PUT of the whole file."""
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    buf = io.BytesIO()
    torch.save(payload, buf)
    if _is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        fs.pipe_file(p, buf.getvalue())
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Load on CPU with `weights_only=True`; a missing file or a file that is not an fmbseg checkpoint is a clear error."""
    if not checkpoint_exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if _is_url(path):
            with fsspec.open(path, "rb") as f:
                payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt or foreign file
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from e
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        raise ValueError(f"{path} is not an fmbseg Stage-2 checkpoint (needs keys {list(REQUIRED_KEYS)})")
    return payload


def checkpoint_exists(path: str) -> bool:
    if _is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        return fs.isfile(p)
    return os.path.isfile(path)


def is_finished(payload: dict) -> bool:
    return int(payload.get("epoch", 0)) >= int(payload.get("epochs", payload.get("epoch", 0)))
