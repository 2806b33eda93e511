"""`fmbseg weights list|check|download --preset P`: all of a preset's checkpoints at once, so a machine without
weights learns what it needs in one step instead of one failed run per model."""

from __future__ import annotations

import os

from flows.cli import UsageError


def register(subparsers) -> None:
    w = subparsers.add_parser(
        "weights", help="list, check or download the checkpoints a preset needs",
        description="list: every checkpoint of the preset (file, size, source, sha256, where it is looked for, "
        "found or not). check: read every file that is present and verify its sha256 when one is published; exit 1 "
        "if any is missing or bad. download: fetch every missing file (Hugging Face files into the Hugging Face "
        "cache, the SAM release into $FMBSEG_WEIGHTS_DIR), with progress bars and sha256 checks.")
    w.add_argument("action", choices=("list", "check", "download"))
    w.add_argument("--preset", default="base", help="paper or base (tiny and oracle need no files; default base)")
    w.set_defaults(func=cmd_weights)


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def cmd_weights(args) -> int:
    from fmbseg.models.weights import (CorruptWeightsError, WeightsNotFoundError, file_sha256, find_local,
                                       offline, resolve_weights, search_locations, weights_dir)
    from fmbseg.presets import PRESETS, preset_weights

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    entries = preset_weights(args.preset)
    if not entries:
        print(f"preset {args.preset} loads no checkpoint files (seeded random or oracle models): nothing to do")
        return 0
    print(f"preset {args.preset}: {len(entries)} checkpoint files; weights directory {weights_dir()}"
          + (" (offline: FMBSEG_OFFLINE/HF_HUB_OFFLINE set)" if offline() else ""))
    problems = 0
    for role, entry in entries:
        found = find_local(entry)
        print(f"\n{role:5s} {entry.key}")
        print(f"      file    {entry.filename} ({_size(entry.size_bytes)})")
        print(f"      source  {entry.source}: {entry.url}")
        print(f"      sha256  {entry.sha256 or 'not published (the Hugging Face LFS etag is checked on download)'}")
        print("      looks   " + "\n              ".join(search_locations(entry)))
        if args.action == "download" and found is None:
            try:
                found = resolve_weights(entry)
            except (WeightsNotFoundError, CorruptWeightsError) as e:
                print(f"      FAILED  {e}")
                problems += 1
                continue
        if found is None:
            print("      MISSING")
            problems += args.action != "list"
            continue
        status = f"found   {found} ({_size(os.path.getsize(found))})"
        if args.action in ("check", "download"):
            got = file_sha256(found)
            if entry.sha256 and got != entry.sha256:
                print(f"      BAD     {found}: sha256 {got}, expected {entry.sha256}; delete it and run "
                      f"`fmbseg weights download --preset {args.preset}`")
                problems += 1
                continue
            status += f", sha256 {got}" + (" (matches)" if entry.sha256 else "")
        print("      " + status)
    if args.action != "list":
        print(f"\n{len(entries) - problems}/{len(entries)} ready" + ("" if not problems else
              f"; {problems} missing or bad"))
    return 1 if problems else 0
