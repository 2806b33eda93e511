"""A campaign root on any fsspec filesystem, with whole-file writes (DESIGN §5 "Writes", docs/STORAGE.md).

A reader never sees half a file: locally a file is written to a temporary name in the same directory, fsynced,
given the mode the umask asks for, and moved into place with `os.replace` (atomic on POSIX), then the directory
is fsynced (a power loss cannot leave a zero-byte file under the final name); on object stores it is one `pipe`
(a single PUT), which object stores publish atomically. `create_exclusive` is the one compare-and-set the commit
protocol needs: a hard link locally, a conditional PUT (`If-None-Match: *`) on object stores. Paths inside a
root are relative POSIX paths such as `shards/000042.json`.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from typing import Any, Iterable

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _read_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is process-wide and racy)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file (0o666 minus the umask)."""
    return 0o666 & ~_read_umask()


def fsync_dir(directory: str) -> None:
    """Make a rename or link inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CampaignNotWritable(OSError):
    """The campaign root cannot be written (read-only mount, permissions, a file in the way)."""


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
        tmp = self._local_temp(directory, target, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            _unlink(tmp)
            raise
        fsync_dir(directory)

    def _local_temp(self, directory: str, target: str, data: bytes) -> str:
        """`data` in a durable temporary file next to `target`, with the umask's mode; returns its path."""
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(target))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                # mkstemp makes 0600; outputs are read by trainers running as other users.
                os.fchmod(f.fileno(), file_mode())
        except BaseException:
            # Leave no temporary behind when the write fails or the worker is interrupted mid-write.
            _unlink(tmp)
            raise
        return tmp

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` whole only if it does not exist yet; True when this call created it.

        Locally: a durable temporary file hard-linked to the name (`link` fails when the name exists, and a
        reader sees either no file or the whole file). Object stores: one PUT with `If-None-Match: *`; a store
        that rejects conditional writes gets a plain PUT after an existence check, and the caller must read the
        object back to learn who won (see docs/STORAGE.md)."""
        target = self.full(rel)
        if not self.is_local:
            try:
                self.fs.pipe_file(target, bytes(data), mode="create")
                return True
            except FileExistsError:
                return False
            except (TypeError, NotImplementedError, ValueError):
                pass  # this filesystem has no exclusive mode
            except OSError as e:
                if "PreconditionFailed" in str(e) or "412" in str(e):
                    return False
                if "NotImplemented" not in str(e) and "501" not in str(e):
                    raise
            if self.fs.exists(target):
                return False
            self.fs.pipe_file(target, bytes(data))
            return True
        directory = os.path.dirname(target)
        tmp = self._local_temp(directory, target, data)
        try:
            os.link(tmp, target)
            created = True
        except FileExistsError:
            created = False
        except OSError:
            # Filesystems without hard links: O_EXCL claims the name; the content follows (fsynced).
            created = self._create_excl_fallback(target, data)
        finally:
            _unlink(tmp)
        if created:
            fsync_dir(directory)
        return created

    @staticmethod
    def _create_excl_fallback(target: str, data: bytes) -> bool:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def write_private(self, rel: str, data: bytes) -> None:
        """Write a file nobody reads until a later commit names it (an attempt's staging area): written in
        place and fsynced locally (no rename needed: a torn file is caught by its hash), one PUT elsewhere."""
        target = self.full(rel)
        if not self.is_local:
            self.fs.pipe_file(target, bytes(data))
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def sync_dirs(self, rels: Iterable[str]) -> None:
        """fsync the (local) directories holding `rels`, each once."""
        if not self.is_local:
            return
        for d in sorted({os.path.dirname(self.full(r)) for r in rels}):
            fsync_dir(d)

    def move(self, src: str, dst: str) -> None:
        """Put `src`'s bytes at `dst` whole: `os.replace` locally (atomic), a server-side copy elsewhere (the
        source stays until its attempt directory is removed)."""
        if self.is_local:
            target = self.full(dst)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(self.full(src), target)
        else:
            self.fs.copy(self.full(src), self.full(dst))

    def check_writable(self) -> None:
        """Raise `CampaignNotWritable` (one line, naming the root) unless a file can be created and removed."""
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            if self.is_local:
                if os.path.exists(self.path) and not os.path.isdir(self.path):
                    raise NotADirectoryError(f"{self.path} is a file")
                self.write_private(probe, b"")
            else:
                self.fs.pipe_file(self.full(probe), b"")
            self.remove(probe)
        except OSError as e:
            raise CampaignNotWritable(
                f"campaign {self.url} is not writable ({e.strerror or e}); fix its permissions or mount, or "
                "label into another --campaign directory"
            ) from None

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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
