"""The shard commit protocol (docs/STORAGE.md "Commit protocol"): stage, commit by one marker, publish.

1. **Stage.** An attempt (`attempt_id()`: time, host, pid, random) writes every output of the shard under its own
   directory `_attempts/000042/<attempt>/` (same relative paths as the public ones), fsynced. Nothing public
   changes; no reader of `images/`, `masks/` or `labels.zarr/` lists this directory.
2. **Commit.** One whole-file create of `done/000042.json` that names the attempt and the sha256 of every output
   file: exclusive (hard link locally, `If-None-Match: *` PUT on object stores), so the first attempt wins and
   every other attempt of the shard sees the winner's marker and deletes its own staging. A deliberate relabel
   (`--retry-failed`, `--overwrite`, a marker of another Stage-1 config) first un-commits the shard (`uncommit`).
3. **Publish** (idempotent, roll-forward): the winner's staged files are moved to the public paths
   (`zarr.json` files last), files of the shard not named by the marker are removed, then the attempt directory.
   Whoever finds a committed marker whose attempt directory still exists (a crash mid-publish) finishes it:
   the next `label` run's done check, `fmbseg verify --repair`; readers read a not-yet-published file from the
   staged copy, checked against the marker's hash.

A crash before step 2 changes nothing public; after step 2 the shard is committed and complete in staging.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid

import pyarrow as pa

from storage import faults
from storage.fs import CampaignRoot, dumps_json
from storage.labels import PackedLabels, build_label_group, ensure_root_group, group_digest
from storage.layout import (RELABEL_ZARR, attempt_dir, attempts_dir, done_path, images_path, labels_group_path,
                            masks_path, public_dirs, relabel_group_path, staged_path)
from storage.markers import MARKER_FORMAT, CorruptMarker, DoneMarker, read_done
from storage.tables import table_to_parquet_bytes, table_vocabulary


class ShardDamaged(Exception):
    """A committed shard whose files do not match its done marker (deleted, truncated or replaced files) and
    cannot be rolled forward from its staged attempt. The message names the file and the repair."""


def attempt_id() -> str:
    """Unique per attempt and sortable by start time: `20261201T074000Z-host-1234-1a2b3c4d`."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:32] or "host"
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_files(shard_id: int, images: pa.Table, masks: pa.Table, labels: PackedLabels) -> dict[str, bytes]:
    """Every public output file of the shard (campaign-relative path -> bytes)."""
    files = {images_path(shard_id): table_to_parquet_bytes(images), masks_path(shard_id): table_to_parquet_bytes(masks)}
    group = labels_group_path(shard_id)
    for key, data in build_label_group(labels, shard_id, table_vocabulary(masks)).items():
        files[f"{group}/{key}"] = data
    return files


def _outputs(shard_id: int, hashes: dict[str, str]) -> dict[str, str]:
    """The format-1 per-output digests (parquet files, and the zarr group as one digest)."""
    group = labels_group_path(shard_id) + "/"
    return {images_path(shard_id): hashes[images_path(shard_id)], masks_path(shard_id): hashes[masks_path(shard_id)],
            labels_group_path(shard_id): group_digest({k[len(group):]: v for k, v in hashes.items()
                                                       if k.startswith(group)})}


def commit_shard(
    root: CampaignRoot,
    shard_id: int,
    stage1_hash: str,
    images: pa.Table,
    masks: pa.Table,
    labels: PackedLabels,
    *,
    failure_reasons: dict[str, int],
    seconds: float,
    code_version: str,
    relabel_files: dict[str, bytes] | None = None,
) -> DoneMarker:
    """Stage the outputs, commit them by creating the done marker, publish them. Returns the shard's committed
    marker: this attempt's, or — when another attempt committed first — the winner's (this attempt's files are
    then discarded; compare `marker.attempt`). `relabel_files`: the shard's relabel store (group-relative key ->
    bytes, `storage.relabel_store.build_relabel_group`), committed with the rest when given."""
    t0 = time.perf_counter()
    attempt = attempt_id()
    files = shard_files(shard_id, images, masks, labels)
    if relabel_files is not None:
        files.update({f"{relabel_group_path(shard_id)}/{k}": v for k, v in relabel_files.items()})
        ensure_root_group(root, RELABEL_ZARR)
    hashes = {rel: sha256(data) for rel, data in files.items()}
    ensure_root_group(root)
    for rel, data in files.items():
        root.write_private(staged_path(shard_id, attempt, rel), data)
    root.sync_dirs(staged_path(shard_id, attempt, rel) for rel in files)
    faults.checkpoint("staged")

    status = images.column("status").to_pylist()
    per_class: dict[str, int] = {}
    sel_per_class: dict[str, int] = {}
    for name, sel in zip(masks.column("class_name").to_pylist(), masks.column("selected").to_pylist()):
        per_class[name] = per_class.get(name, 0) + 1
        if sel:
            sel_per_class[name] = sel_per_class.get(name, 0) + 1
    marker = DoneMarker(
        shard_id=shard_id,
        stage1_hash=stage1_hash,
        images=len(status),
        ok=status.count("ok"),
        failed=status.count("failed"),
        masks=masks.num_rows,
        outputs=_outputs(shard_id, hashes),
        masks_per_class=dict(sorted(per_class.items())),
        selected_per_class=dict(sorted(sel_per_class.items())),
        failure_reasons=dict(sorted(failure_reasons.items())),
        seconds=round(seconds + time.perf_counter() - t0, 4),
        code_version=code_version,
        attempt=attempt,
        files=dict(sorted(hashes.items())),
        format=MARKER_FORMAT,
    )
    winner = _create_marker(root, marker)
    if winner.attempt != attempt:
        discard_attempt(root, shard_id, attempt)
        return winner
    faults.checkpoint("committed")
    publish(root, winner)
    return winner


def _create_marker(root: CampaignRoot, marker: DoneMarker) -> DoneMarker:
    """Create the marker exclusively; returns the marker that holds the name afterwards (ours or the winner's)."""
    rel = done_path(marker.shard_id)
    data = dumps_json(marker.to_json()).encode("utf-8")
    for _ in range(8):
        if root.create_exclusive(rel, data):
            if root.is_local:
                return marker
            # Object stores without conditional writes: last writer wins; read back who that is.
            current = _read_marker(root, marker.shard_id)
            return current if current is not None else marker
        current = _read_marker(root, marker.shard_id)
        if current is None:
            continue  # removed meanwhile (a corrupt one we dropped, or an un-commit): try again
        if current.stage1_hash != marker.stage1_hash:
            # A marker of another Stage-1 config (a zombie of the campaign's previous config): not a commit of
            # this config; replace it.
            uncommit(root, marker.shard_id, expect=current)
            continue
        return current
    raise RuntimeError(f"could not commit {rel}: the marker keeps changing under this writer")


def _read_marker(root: CampaignRoot, shard_id: int) -> DoneMarker | None:
    try:
        return read_done(root, shard_id)
    except CorruptMarker:
        # A torn or zeroed marker commits nothing (our creates are whole-file); drop it so a commit can land.
        root.remove(done_path(shard_id))
        return None


def discard_attempt(root: CampaignRoot, shard_id: int, attempt: str) -> None:
    root.remove(attempt_dir(shard_id, attempt), recursive=True)
    _rmdir_if_empty(root, attempts_dir(shard_id))


def _rmdir_if_empty(root: CampaignRoot, rel: str) -> None:
    if root.is_local:
        try:
            os.rmdir(root.full(rel))
        except OSError:
            pass


def public_files(root: CampaignRoot, shard_id: int) -> list[str]:
    """Every file now in the shard's public folders (campaign-relative)."""
    return [f"{d}/{f}" for d in public_dirs(shard_id) for f in root.find(d)]


def _matches(root: CampaignRoot, rel: str, expected: str) -> bool:
    try:
        return sha256(root.read_bytes(rel)) == expected
    except FileNotFoundError:
        return False


def publish(root: CampaignRoot, marker: DoneMarker) -> None:
    """Make the public files of a committed shard equal to the marker's (idempotent; safe to repeat after a crash
    at any point). Raises `ShardDamaged` when a file is neither public-and-right nor in the attempt's staging."""
    if not marker.files:
        return  # a format-1 marker: its outputs were written in place
    sid = marker.shard_id
    for rel in public_files(root, sid):
        if rel not in marker.files:
            root.remove(rel)  # an older attempt's chunk, a stray temporary
    for rel in sorted(marker.files, key=lambda r: (r.endswith("zarr.json"), r)):
        if root.exists(rel) and _matches(root, rel, marker.files[rel]):
            continue
        src = staged_path(sid, marker.attempt, rel)
        try:
            if not _matches(root, src, marker.files[rel]):
                raise FileNotFoundError(src)
            root.move(src, rel)
        except FileNotFoundError:
            if _matches(root, rel, marker.files[rel]):
                continue  # another roll-forward of the same marker moved it first
            raise ShardDamaged(_damage_message(root, sid, rel, "missing or changed, and no staged copy"))
        faults.checkpoint("publishing")
    root.sync_dirs(marker.files)
    faults.checkpoint("published")
    discard_attempt(root, sid, marker.attempt)


def needs_publish(root: CampaignRoot, marker: DoneMarker) -> bool:
    """A committed attempt whose staging is still there: its publish did not finish (or its cleanup)."""
    return bool(marker.attempt) and root.exists(attempt_dir(marker.shard_id, marker.attempt))


def uncommit(root: CampaignRoot, shard_id: int, expect: DoneMarker | None = None) -> None:
    """Take a shard out of the committed view before relabelling it: the marker first, then its public files
    (plain readers stop seeing the rows), then its attempts' staging. With `expect`, only if the marker is still
    that one (another writer may have committed meanwhile)."""
    if expect is not None:
        try:
            current = read_done(root, shard_id)
        except CorruptMarker:
            current = None
        if current is not None and (current.attempt, current.stage1_hash) != (expect.attempt, expect.stage1_hash):
            return
    root.remove(done_path(shard_id))
    for rel in public_files(root, shard_id):
        root.remove(rel)
    if expect is not None and expect.attempt:
        discard_attempt(root, shard_id, expect.attempt)


def _damage_message(root: CampaignRoot, shard_id: int, rel: str, what: str) -> str:
    return (f"shard {shard_id} of {root.url} is damaged: {rel} is {what} (its done marker records another "
            f"sha256); run `fmbseg verify --campaign {root.url} --repair`, then `fmbseg label` again to redo it")


# -- reading committed files -----------------------------------------------------------------------------------
def read_committed(root: CampaignRoot, marker: DoneMarker, rel: str) -> bytes:
    """The bytes of one committed output file, checked against the marker: the public file, or the staged copy
    while the publish has not happened yet. Raises `ShardDamaged` naming the file otherwise."""
    expected = marker.files.get(rel) or (marker.outputs.get(rel) if not marker.files else None)
    if expected is None:
        raise ShardDamaged(_damage_message(root, marker.shard_id, rel, "not named by its done marker"))
    candidates = [rel] + ([staged_path(marker.shard_id, marker.attempt, rel)] if marker.attempt else [])
    what = "missing"
    for cand in candidates:
        try:
            data = root.read_bytes(cand)
        except FileNotFoundError:
            continue
        if sha256(data) == expected:
            return data
        what = f"changed ({len(data)} bytes)"
    raise ShardDamaged(_damage_message(root, marker.shard_id, rel, what))


def read_committed_group(root: CampaignRoot, marker: DoneMarker) -> dict[str, bytes]:
    """The shard's label group files (group-relative key -> bytes), every one checked against the marker."""
    base = labels_group_path(marker.shard_id)
    if marker.files:
        return {rel[len(base) + 1:]: read_committed(root, marker, rel)
                for rel in marker.files if rel.startswith(base + "/")}
    files = {k: root.read_bytes(f"{base}/{k}") for k in root.find(base)}
    if group_digest({k: sha256(v) for k, v in files.items()}) != marker.outputs.get(base):
        raise ShardDamaged(_damage_message(root, marker.shard_id, base, "missing files or changed"))
    return files


def check_shard(root: CampaignRoot, marker: DoneMarker) -> list[tuple[str, str]]:
    """Problems of a committed shard's public files, as (path, what): missing, changed, extra, unpublished."""
    problems = []
    sid = marker.shard_id
    if marker.files:
        for rel, expected in marker.files.items():
            try:
                data = root.read_bytes(rel)
            except FileNotFoundError:
                problems.append((rel, "missing"))
                continue
            if sha256(data) != expected:
                problems.append((rel, f"changed ({len(data)} bytes, sha256 differs)"))
        for rel in public_files(root, sid):
            if rel not in marker.files:
                problems.append((rel, "not part of the committed shard"))
        return problems
    for rel in (images_path(sid), masks_path(sid)):
        if not _matches(root, rel, marker.outputs.get(rel, "")):
            problems.append((rel, "missing" if not root.exists(rel) else "changed (sha256 differs)"))
    base = labels_group_path(sid)
    digest = group_digest({k: sha256(root.read_bytes(f"{base}/{k}")) for k in root.find(base)})
    if digest != marker.outputs.get(base):
        problems.append((base, "missing files or changed (group sha256 differs)"))
    return problems
