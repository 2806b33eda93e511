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

from fmbseg.files import is_url, read_bytes

class CheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read back (truncated, corrupt, or not a PyTorch file). The
    message names the file and what to do; the command line reports it as a failure (exit 1), not a usage error."""


REQUIRED_KEYS = ("model", "config", "vocabulary", "encoders", "temperature", "version", "epoch")


def save_checkpoint(path: str, payload: dict) -> None:
    """Write `payload` whole: locally a temp file in the same folder, fsync, then rename over `path`; on an fsspec
    URL one PUT of the whole file."""
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    buf = io.BytesIO()
    torch.save(payload, buf)
    if is_url(path):
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


def _short_reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(". ")[0][:120]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_checkpoint(path: str) -> dict:
    """Load on CPU with `weights_only=True`. Errors: FileNotFoundError (no file), `CheckpointError` (a truncated
    or corrupt file: torch raises RuntimeError, OSError `[Errno 22]`, EOFError or UnpicklingError for those),
    ValueError (a readable file that is not an fmbseg Stage-2 checkpoint)."""
    if not is_url(path) and os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is a directory; give the model.pt file inside it")
    if not checkpoint_exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = read_bytes(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt or foreign file
        what = ("empty (0 bytes)" if not data else
                f"truncated or corrupt ({len(data)} bytes; {_short_reason(e)})" if data[:4] == b"PK\x03\x04" else
                f"not a PyTorch checkpoint or corrupt ({len(data)} bytes; {_short_reason(e)})")
        raise CheckpointError(f"checkpoint {path} is {what}: delete it and run `fmbseg train` again, or give "
                              "another checkpoint") from None
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        raise ValueError(f"{path} is not an fmbseg Stage-2 checkpoint (needs keys {list(REQUIRED_KEYS)})")
    return payload


def checkpoint_exists(path: str) -> bool:
    if is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        return fs.isfile(p)
    return os.path.isfile(path)


def is_finished(payload: dict) -> bool:
    return int(payload.get("epoch", 0)) >= int(payload.get("epochs", payload.get("epoch", 0)))
