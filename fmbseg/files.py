"""Reading a whole small file that may live on any fsspec filesystem (vocabulary files, checkpoints)."""

from __future__ import annotations


def is_url(path: str) -> bool:
    return "://" in str(path)


def read_bytes(path: str) -> bytes:
    """The bytes of a local path or an fsspec URL (`s3://...`); OSError as the filesystem raises it."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()
