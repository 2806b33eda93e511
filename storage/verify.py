"""`fmbseg verify`: check a campaign's committed data against its done markers, and repair what can be repaired.

Checks (cheap to expensive): shard lists (missing in the id range, corrupt), done markers (corrupt, of another
Stage-1 config), every committed shard's files against the sha256 its marker records (missing, changed, extra
files, an unfinished publish), public files of shards with no marker (uncommitted rows plain readers would see),
and abandoned attempt directories. With `repair`:
- a lost shard list is rebuilt from the shard's committed `images` rows, else retired (an empty list noting why;
  its images are planned anew by the next `label`);
- an unfinished publish is rolled forward from the staged attempt; a shard whose files cannot be restored from
  it, a corrupt marker, or a marker of another config is un-committed (marker, then public files), so the next
  `fmbseg label` redoes just that shard;
- orphaned public files and attempts older than `attempts_grace_s` (default one hour: younger ones may belong to
  a writer still running) are removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from storage.campaign import read_manifest
from storage.fs import CampaignRoot
from storage.layout import ATTEMPTS_DIR, attempt_dir, attempts_dir, shard_list_path
from storage.markers import scan_markers
from storage.planning import damaged_lists, known_shard_ids, recover_list, stored_entries
from storage.shard_writer import (ShardDamaged, check_shard, discard_attempt, needs_publish, public_files, publish,
                                  uncommit)


@dataclass
class Problem:
    shard: int | None
    path: str
    problem: str
    fix: str
    fixed: bool = False

    def line(self) -> str:
        state = "fixed: " if self.fixed else "fix: "
        return f"{self.path}: {self.problem} ({state}{self.fix})"


def _newest_mtime(root: CampaignRoot, rel: str) -> float:
    newest = 0.0
    for f in root.find(rel) or []:
        try:
            newest = max(newest, root.mtime(f"{rel}/{f}"))
        except (KeyError, FileNotFoundError, OSError):
            newest = time.time()  # unknown: treat as fresh
    return newest


def verify_campaign(campaign: str | CampaignRoot, repair: bool = False, attempts_grace_s: float = 3600.0) -> dict:
    """Returns {"campaign", "shards", "committed", "checked_files", "problems": [Problem], "clean": bool}."""
    root = campaign if isinstance(campaign, CampaignRoot) else CampaignRoot(campaign)
    manifest = read_manifest(root)  # a corrupt campaign.json is an error of its own (no shard can be judged)
    if manifest is None:
        raise FileNotFoundError(f"no campaign at {root.url} (campaign.json missing)")
    stage1_hash = manifest.stage1_hash()
    problems: list[Problem] = []
    cmd = f"fmbseg verify --campaign {root.url} --repair"

    # shard lists
    for sid, why in damaged_lists(root).items():
        p = Problem(sid, shard_list_path(sid), f"shard list {why}",
                    "rebuilt from the committed images table, or retired when the shard never committed")
        if repair:
            if recover_list(root, sid):
                p.fix, p.fixed = "rebuilt from the committed images table", True
            else:
                uncommit(root, sid)
                root.write_json(shard_list_path(sid), {"shard_id": sid, "images": [], "retired": f"list {why}; "
                                "its images were not committed and are planned anew by the next label run"})
                p.fix, p.fixed = "retired; its images are planned anew by the next `fmbseg label`", True
        problems.append(p)
    seen: dict[str, int] = {}
    for sid in sorted(known_shard_ids(root)):
        try:
            entries, _ = stored_entries(root, sid)
        except (FileNotFoundError, ValueError):
            continue
        for e in entries:
            if e["image_id"] in seen:
                problems.append(Problem(sid, shard_list_path(sid), f"image {e['image_id']} is also planned in shard "
                                        f"{seen[e['image_id']]}", "relabel the campaign with --overwrite"))
            seen.setdefault(e["image_id"], sid)

    # markers
    good, corrupt = scan_markers(root)
    for sid, err in corrupt.items():
        p = Problem(sid, err.rel, f"done marker corrupt ({err.reason})",
                    f"marker dropped; the next `fmbseg label` redoes shard {sid}")
        if repair:
            uncommit(root, sid)
            p.fixed = True
        problems.append(p)
    committed = {}
    checked = 0
    for sid, marker in good.items():
        if marker.stage1_hash != stage1_hash:
            p = Problem(sid, f"done/{sid:06d}.json", "done marker of another Stage-1 config",
                        f"marker and files dropped; the next `fmbseg label` redoes shard {sid}")
            if repair:
                uncommit(root, sid, expect=marker)
                p.fixed = True
            problems.append(p)
            continue
        committed[sid] = marker
        if needs_publish(root, marker):
            p = Problem(sid, attempt_dir(sid, marker.attempt), "committed but not fully published (a crash)",
                        "rolled forward from the staged attempt")
            if repair:
                try:
                    publish(root, marker)
                    p.fixed = True
                except ShardDamaged:
                    pass
            problems.append(p)
        bad = check_shard(root, marker)
        checked += len(marker.files) or 3
        if bad:
            if repair:
                try:
                    publish(root, marker)  # restores from staging when the attempt is still there
                    bad = check_shard(root, marker)
                    fixed = not bad
                except ShardDamaged:
                    fixed = False
                if not fixed:
                    uncommit(root, sid, expect=marker)
            for rel, what in bad or []:
                problems.append(Problem(sid, rel, what, f"marker dropped; the next `fmbseg label` redoes shard {sid}",
                                        fixed=repair))
            if repair and not bad:
                problems.append(Problem(sid, f"shard {sid}", "damaged files", "restored from the staged attempt",
                                        fixed=True))

    # orphans: public files without a marker, abandoned attempts
    now = time.time()
    for sid in sorted(known_shard_ids(root)):
        if sid in committed:
            continue
        orphans = public_files(root, sid)
        if orphans:
            p = Problem(sid, orphans[0], f"{len(orphans)} public file(s) of an uncommitted shard (plain readers see "
                        "them)", "removed")
            if repair:
                for rel in orphans:
                    root.remove(rel)
                p.fixed = True
            problems.append(p)
    for name in root.listdir(ATTEMPTS_DIR):
        if not name.isdigit():
            continue
        sid = int(name)
        live = committed.get(sid)
        for attempt in root.listdir(attempts_dir(sid)):
            if live is not None and live.attempt == attempt:
                continue
            rel = attempt_dir(sid, attempt)
            age = now - _newest_mtime(root, rel)
            if age < attempts_grace_s:
                continue  # may belong to a writer that is still running
            p = Problem(sid, rel, "abandoned attempt (a killed or losing writer)", "removed")
            if repair:
                discard_attempt(root, sid, attempt)
                p.fixed = True
            problems.append(p)

    return {"campaign": root.url, "shards": len(known_shard_ids(root)), "committed": len(committed),
            "checked_files": checked, "problems": problems,
            "clean": all(p.fixed for p in problems), "repair_command": cmd}


def format_verify(report: dict) -> str:
    lines = [f"campaign  {report['campaign']}: {report['committed']} committed shards of {report['shards']}, "
             f"{report['checked_files']} files checked against their done markers"]
    if not report["problems"]:
        lines.append("clean")
        return "\n".join(lines)
    for p in report["problems"][:50]:
        lines.append("  " + p.line())
    if len(report["problems"]) > 50:
        lines.append(f"  ... {len(report['problems']) - 50} more")
    if report["clean"]:
        lines.append("repaired; run `fmbseg label` again to redo the dropped shards")
    else:
        lines.append(f"not clean: run `{report['repair_command']}`, then `fmbseg label` again")
    return "\n".join(lines)
