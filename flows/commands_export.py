"""`fmbseg export` and `fmbseg show`: a campaign's pseudo-labels as files other tools read, and as pictures.
They call stages directly (no Prefect server needed); flows/export_flow.py wires the same stage functions."""

from __future__ import annotations

import argparse

from flows.cli import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a campaign's committed shards as COCO JSON, mmseg/HF PNG folders or a Hugging Face dataset",
        description="Export every committed shard (shard by shard, resumable: a rerun skips exported shards). "
        "coco: OUT/annotations.json (stored RLE, score/stage/selected per annotation, category_id = class id + 1); "
        "png: OUT/img_dir, OUT/ann_dir/*.png (255 = ignore; 16-bit with 65535 = ignore above 255 classes), "
        "OUT/classes.txt; hf: a `datasets` dataset saved with save_to_disk (datasets.load_from_disk(OUT)).",
    )
    p.add_argument("--campaign", required=True, metavar="DIR", help="campaign directory or fsspec URL")
    p.add_argument("--format", required=True, choices=("coco", "png", "hf"), help="export format")
    p.add_argument("--out", required=True, metavar="DIR", help="local output folder (one export per folder)")
    p.add_argument("--selected-only", action="store_true",
                   help="only the masks that made the merged label maps (coco annotations, hf objects)")
    p.add_argument("--copy", action="store_true", help="png: copy the images into img_dir (default: symlinks)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="hf: also upload the dataset to this Hugging Face Hub repository. Needs network access "
                   "and a Hub token; NOT covered by the test suite (it runs offline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    s = subparsers.add_parser(
        "show",
        help="draw a campaign's pseudo-labels: label map over the image, and every mask by stage",
        description="One PNG per image: left, the merged label map over the image (one colour per class); right, "
        "every mask outlined in its stage's colour (1.1 orange, 1.2 blue), selected masks solid and lightly "
        "filled, unselected dashed with the class name in parentheses; a legend below.",
    )
    s.add_argument("--campaign", required=True, metavar="DIR", help="campaign directory or fsspec URL")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--images", type=int, default=8, metavar="N", help="the first N committed ok images (default 8)")
    g.add_argument("--ids", metavar="ID,ID", help="comma-separated image ids to draw")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs")
    s.add_argument("--scale", type=int, default=None, metavar="K",
                   help="integer magnification (default: enough for a long side of 384 px)")
    s.set_defaults(func=cmd_show)


def cmd_export(args: argparse.Namespace) -> int:
    from stages.export import format_export_summary, run_export

    if args.push_to_hub and args.format != "hf":
        raise UsageError("--push-to-hub needs --format hf")
    if args.copy and args.format != "png":
        raise UsageError("--copy applies to --format png only")
    summary = run_export(args.campaign, args.format, args.out, selected_only=args.selected_only, copy=args.copy,
                         push_to_hub=args.push_to_hub, progress=not args.no_progress)
    print(format_export_summary(summary))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from stages.show import show_campaign

    if args.scale is not None and args.scale < 1:
        raise UsageError(f"--scale must be >= 1, got {args.scale}")
    ids = [i.strip() for i in args.ids.split(",") if i.strip()] if args.ids else None
    if args.ids is not None and not ids:
        raise UsageError("--ids is empty")
    if ids is None and args.images < 1:
        raise UsageError(f"--images must be >= 1, got {args.images}")
    paths = show_campaign(args.campaign, args.out, images=args.images, ids=ids, scale=args.scale)
    print(f"wrote {len(paths)} pictures to {args.out}")
    for p in paths:
        print(f"  {p}")
    return 0
