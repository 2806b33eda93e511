"""A campaign root on any fsspec filesystem, with whole-file writes (DESIGN §5 "Writes").

A reader never sees half a file: locally a file is written to a temporary name in the same directory and moved
into place with `os.replace` (atomic on POSIX); on object stores it is one `pipe` (a single PUT), which object
stores publish atomically. Paths inside a root are relative POSIX paths such as `shards/000042.json`.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class CampaignRoot:
    """A directory (local path or fsspec URL such as `memory://c1`, `s3://bucket/c1`) holding one campaign."""

    def __init__(self, url: str | os.PathLike):
        url = os.fspath(url)
        if not url:
            raise ValueError("empty campaign path")
        self.url = url
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.path = self.path.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"CampaignRoot({self.url!r})"

    def full(self, rel: str) -> str:
        """The filesystem path of `rel` (a local OS path when local)."""
        rel = rel.strip("/")
        if self.is_local:
            return os.path.join(self.path, *rel.split("/")) if rel else self.path
        return posixpath.join(self.path, rel) if rel else self.path

    def full_url(self, rel: str) -> str:
        """A URL another fsspec client can open (a plain path when local)."""
        p = self.full(rel)
        if self.is_local:
            return p
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return f"{proto}://{p.lstrip('/')}" if proto != "memory" else f"memory://{p}"

    # -- whole-file writes -------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `rel` whole: temp file + `os.replace` locally, a single `pipe` (PUT) elsewhere."""
        target = self.full(rel)
        if not self.is_local:
            self.fs.pipe_file(target, bytes(data))
            return
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(target))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            # Leave no temporary behind when the write fails or the worker is interrupted mid-write.
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def write_json(self, rel: str, obj: Any) -> bytes:
        """Write `obj` as indented, key-sorted JSON (byte-identical for equal objects); returns the bytes."""
        data = dumps_json(obj).encode("utf-8")
        self.write_bytes(rel, data)
        return data

    # -- reads -------------------------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.full(rel))

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.full_url(rel)} is not valid JSON ({e})") from None

    def _fresh(self, full: str) -> str:
        """`full`, with the filesystem's cached listings of it dropped: object-store clients (s3fs, gcsfs) cache
        directory listings per process, and other nodes write into the campaign (done markers) meanwhile."""
        if not self.is_local:
            self.fs.invalidate_cache(full)
        return full

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._fresh(self.full(rel)))

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under `rel`; [] when `rel` does not exist."""
        full = self._fresh(self.full(rel))
        if not self.fs.exists(full):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(full, detail=False))

    def find(self, rel: str) -> list[str]:
        """Every file under `rel`, as paths relative to `rel` (POSIX), sorted."""
        full = self._fresh(self.full(rel))
        if not self.fs.exists(full):
            return []
        base = self.fs._strip_protocol(full).rstrip("/")
        out = []
        for p in self.fs.find(full):
            p = self.fs._strip_protocol(p)
            out.append(p[len(base) + 1 :].replace(os.sep, "/") if self.is_local else p[len(base) + 1 :])
        return sorted(out)

    def remove(self, rel: str, recursive: bool = False) -> None:
        full = self.full(rel)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=recursive)

    def mtime(self, rel: str) -> float:
        """Modification time in seconds (local files; used to show that a rerun left a file alone)."""
        info = self.fs.info(self.full(rel))
        for key in ("mtime", "LastModified", "created"):
            if key in info:
                v = info[key]
                return v.timestamp() if hasattr(v, "timestamp") else float(v)
        raise KeyError(f"{self.full_url(rel)}: the filesystem reports no modification time")


def write_file(url: str | os.PathLike, data: bytes) -> None:
    """Write one file whole at a local path or fsspec URL, by the same rules as `CampaignRoot.write_bytes`."""
    url = os.fspath(url)
    CampaignRoot(os.path.dirname(url) or ".").write_bytes(os.path.basename(url), data)


def dumps_json(obj: Any) -> str:
    """Canonical-ish JSON for files people read: sorted keys, 1-space indent, UTF-8, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def canonical_json(obj: Any) -> bytes:
    """The canonical form that config hashes are taken over: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
