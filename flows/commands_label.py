"""`fmbseg label` and `fmbseg status` (DESIGN §7). They call stages directly: no Prefect server is needed to
label a folder on one machine; the Prefect flow (flows/label_flow.py) wires the same stage functions."""

from __future__ import annotations

import argparse

from flows.cli import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "label",
        help="run Stage 1 (pseudo-labels) over a folder of images or a COCO JSON into a campaign directory",
        description="Label every image not yet done: CLIP crop detection + SAM point queries (1.1), SAM "
        "automatic masks labelled by CLIP (1.2), merged label maps. Reruns skip done shards.",
    )
    p.add_argument("--images", required=True, metavar="PATH", help="folder of images (recursive) or a COCO JSON")
    p.add_argument("--vocab", required=True, metavar="VOCAB",
                   help="comma-separated names, a file (`name: synonym, synonym` lines) or a built-in name")
    p.add_argument("--campaign", required=True, metavar="DIR", help="campaign directory or fsspec URL")
    p.add_argument("--preset", default="base", help="model preset: paper, base, tiny, oracle (default: base)")
    p.add_argument("--shard-size", type=int, default=256, metavar="N", help="images per new shard (default 256)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (the 75%% Stage-1.2 draw; default 0)")
    p.add_argument("--rank", type=int, default=0, help="this worker's index, 0..world-size-1")
    p.add_argument("--world-size", type=int, default=1, help="number of workers sharing the campaign")
    p.add_argument("--retry-failed", action="store_true", help="relabel done shards that have failed images")
    p.add_argument("--overwrite", action="store_true",
                   help="accept a changed Stage-1 config for this campaign (relabels every shard)")
    p.add_argument("--image-root", metavar="DIR", help="folder the COCO JSON's file names are relative to")
    p.add_argument("--dense-mode", default="maskclip", choices=("maskclip", "clearclip", "sclip"),
                   help="dense CLIP features of Stage 1: maskclip (default), clearclip (q-q attention, no residual "
                   "or FFN in the last block) or sclip (q-q + k-k attention); part of the Stage-1 config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true",
                   help="print the per-part time split and the pipeline's idle fractions (GPU waiting for host, "
                   "host waiting for GPU)")
    p.add_argument("--sam-batch", type=int, default=None, metavar="N",
                   help="images per SAM encoder batch (default: 1 on CPU, 4 on CUDA); never changes outputs on CPU")
    p.add_argument("--serial", action="store_true",
                   help="label image after image without the decode-ahead/write-behind pipeline (same outputs)")
    p.set_defaults(func=cmd_label)

    s = subparsers.add_parser("status", help="show a campaign's progress, failures and masks per class")
    s.add_argument("--campaign", required=True, metavar="DIR", help="campaign directory or fsspec URL")
    s.set_defaults(func=cmd_status)


def cmd_label(args: argparse.Namespace) -> int:
    from stages.label import LabelConfig, format_label_summary, run_label

    if args.shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {args.world_size}")
    if not 0 <= args.rank < args.world_size:
        raise UsageError(f"--rank must be in 0..{args.world_size - 1}, got {args.rank}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    from fmbseg.device import resolve_device
    from fmbseg.presets import get_preset

    try:
        get_preset(args.preset)     # an unknown name fails here, with "did you mean", before any planning
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        resolve_device(args.device)
    except RuntimeError as e:  # --device cuda on a machine without a GPU
        raise UsageError(str(e)) from None
    if args.sam_batch is not None and args.sam_batch < 1:
        raise UsageError(f"--sam-batch must be >= 1, got {args.sam_batch}")
    from stages.label_pipeline import ExecutionConfig

    cfg = LabelConfig(
        images=args.images,
        vocab=args.vocab,
        campaign=args.campaign,
        preset=args.preset,
        shard_size=args.shard_size,
        seed=args.seed,
        device=args.device,
        image_root=args.image_root,
        overwrite=args.overwrite,
        stage1={} if args.dense_mode == "maskclip" else {"dense_mode": args.dense_mode},
        execution=ExecutionConfig(pipeline=not args.serial, sam_batch=args.sam_batch),
    )
    summary = run_label(cfg, rank=args.rank, world_size=args.world_size, retry_failed=args.retry_failed,
                        progress=not args.no_progress)
    print(format_label_summary(summary))
    if args.profile:
        from stages.label import format_profile

        print(format_profile(summary))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from stages.label import campaign_status, format_status

    print(format_status(campaign_status(args.campaign)))
    return 0
