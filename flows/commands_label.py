"""`fmbseg label` and `fmbseg status` (DESIGN §7). They call stages directly: no Prefect server is needed to
label a folder on one machine; the Prefect flow (flows/label_flow.py) wires the same stage functions."""

from __future__ import annotations

import argparse

from flows.cli import UsageError
from flows.settings_flags import add_settings_flags, settings_from_args
from fmbseg.stage1_config import Stage1Overrides


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "label",
        help="run Stage 1 (pseudo-labels) over a folder of images or a COCO JSON into a campaign directory",
        description="Label every image not yet done: CLIP crop detection + SAM point queries (1.1), SAM "
        "automatic masks labelled by CLIP (1.2), merged label maps. Reruns skip done shards.",
    )
    p.add_argument("--images", metavar="PATH", help="folder of images (recursive) or a COCO JSON (required unless "
                   "--relocate)")
    p.add_argument("--vocab", metavar="VOCAB",
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
                   help="accept a changed Stage-1 config or input folder: the campaign's Stage-1 outputs are removed "
                   "and it is labelled afresh, exactly like a new campaign")
    p.add_argument("--image-root", metavar="DIR",
                   help="folder the COCO JSON's file names are relative to (default: the JSON's own folder)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read COCO file names that leave the image root (../, absolute paths, symlinks out); "
                   "refused per image by default")
    p.add_argument("--relocate", metavar="NEW_ROOT",
                   help="only repoint the campaign at images that moved to NEW_ROOT (same relative paths; every "
                   "image checked by size), then exit")
    p.add_argument("--relabel-store", action="store_true",
                   help="also keep, per shard, what `fmbseg relabel` needs to relabel the campaign with another "
                   "vocabulary without the image encoders (relabel.zarr/: CLIP features, SAM embeddings, 1.2 masks; "
                   "several MiB per image, see docs/STORAGE.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true",
                   help="print the per-part time split and the pipeline's idle fractions (GPU waiting for host, "
                   "host waiting for GPU)")
    p.add_argument("--sam-batch", type=int, default=None, metavar="N",
                   help="images per SAM encoder batch (default: 1 on CPU, 4 on CUDA); never changes outputs on CPU")
    p.add_argument("--serial", action="store_true",
                   help="label image after image without the decode-ahead/write-behind pipeline (same outputs)")
    stage1 = p.add_argument_group(
        "Stage-1 settings (fmbseg/stage1_config.py; part of the campaign's config hash; a flag left out keeps "
        "the preset's value)")
    add_settings_flags(stage1, Stage1Overrides, default_note="(or the preset's)")
    ray = p.add_argument_group("scale-out on Ray (docs/ORCHESTRATION.md)")
    ray.add_argument("--runner", default="local", choices=("local", "ray"),
                     help="local: shards one after another in this process (default); ray: every not-yet-done "
                     "shard a Prefect task on a Ray cluster (the label-campaign flow with prefect-ray)")
    ray.add_argument("--ray-address", metavar="ADDR",
                     help="with --runner ray: `auto` joins the cluster running on this machine, HOST:PORT or "
                     "ray://HOST:10001 another one; default: start a local Ray instance for this run")
    ray.add_argument("--gpus-per-shard", type=float, metavar="N",
                     help="with --runner ray: GPUs each shard task asks for (default 1 when the cluster has GPUs, "
                     "else 0; 0.5 runs two shards per GPU)")
    ray.add_argument("--cpus-per-shard", type=float, default=1.0, metavar="N",
                     help="with --runner ray: CPUs each shard task asks for (default 1)")
    p.set_defaults(func=cmd_label)

    s = subparsers.add_parser("status", help="show a campaign's progress, failures and masks per class")
    s.add_argument("--campaign", required=True, metavar="DIR", help="campaign directory or fsspec URL")
    s.set_defaults(func=cmd_status)

    v = subparsers.add_parser(
        "verify", help="check every committed shard's files against its done marker (and repair with --repair)",
        description="Checks shard lists, done markers and the sha256 of every committed file. --repair rolls "
        "unfinished publishes forward, rebuilds or retires lost shard lists, drops the marker of a damaged shard "
        "(the next `fmbseg label` redoes just it) and removes orphaned files and abandoned attempts. Exit 0 when "
        "clean (or fully repaired), 1 otherwise.")
    v.add_argument("--campaign", required=True, metavar="DIR", help="campaign directory or fsspec URL")
    v.add_argument("--repair", action="store_true", help="repair what is found (see above)")
    v.add_argument("--attempts-grace", type=float, default=3600.0, metavar="SECONDS",
                   help="leave attempt directories younger than this alone (a writer may still run; default 3600)")
    v.set_defaults(func=cmd_verify)


def cmd_label(args: argparse.Namespace) -> int:
    from stages.label import LabelConfig, format_label_summary, run_label

    if args.relocate:
        from storage.maintenance import relocate_campaign

        r = relocate_campaign(args.campaign, args.relocate, images=args.images)
        print(f"campaign   {args.campaign}: {r['images']} images found under {r['root']} (sizes checked where "
              "recorded); the campaign now reads them from there. Images that failed before the move are "
              "relabelled by `fmbseg label ... --retry-failed`")
        return 0
    if not args.images or not args.vocab:
        raise UsageError("fmbseg label needs --images and --vocab (or --relocate NEW_ROOT)")
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
    args.stage1 = stage1_from_args(args)
    from stages.label_pipeline import ExecutionConfig

    if args.runner == "ray":
        return _label_on_ray(args)
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
        allow_outside_root=args.allow_outside_root,
        stage1=args.stage1,
        execution=ExecutionConfig(pipeline=not args.serial, sam_batch=args.sam_batch),
        relabel_store=args.relabel_store,
    )
    summary = run_label(cfg, rank=args.rank, world_size=args.world_size, retry_failed=args.retry_failed,
                        progress=not args.no_progress)
    print(format_label_summary(summary))
    if args.profile:
        from stages.label import format_profile

        print(format_profile(summary))
    if summary.get("problems"):
        return 1  # the rest was labelled; the problem lines name the repair
    if summary["images"] and not summary["ok"]:
        import sys

        print(f"error: every one of the {summary['images']} images of this run failed (see `failures` above); "
              "check --images / --image-root, or repoint a moved campaign with --relocate", file=sys.stderr)
        return 1
    return 0


def stage1_from_args(args: argparse.Namespace) -> dict:
    """The Stage-1 flags the user passed, checked on top of the preset's values (a UsageError naming the problem)."""
    from stages.label import build_stage1_config

    overrides = settings_from_args(args, Stage1Overrides, list(Stage1Overrides.model_fields))
    try:
        build_stage1_config(args.preset, overrides)  # what only the combination can break (area bounds)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return overrides


def _label_on_ray(args: argparse.Namespace) -> int:
    """`fmbseg label --runner ray`: the label-campaign flow with runner="ray". Its Ray workers report to a
    Prefect API: PREFECT_API_URL when set, else a temporary local server started for this run (an ephemeral
    in-process API would not be reachable from the workers)."""
    import contextlib
    import tempfile

    if args.world_size != 1 or args.rank != 0:
        raise UsageError("--runner ray labels the whole campaign: leave --rank/--world-size out")
    if args.gpus_per_shard is not None and args.gpus_per_shard < 0:
        raise UsageError(f"--gpus-per-shard must be >= 0, got {args.gpus_per_shard}")
    if args.cpus_per_shard < 0:
        raise UsageError(f"--cpus-per-shard must be >= 0, got {args.cpus_per_shard}")
    from prefect.settings import PREFECT_API_URL

    from flows.label_flow import label_campaign
    from flows.server import client_settings, local_server

    with contextlib.ExitStack() as stack:
        if not PREFECT_API_URL.value():
            home = stack.enter_context(tempfile.TemporaryDirectory(prefix="fmbseg-prefect-"))
            server = stack.enter_context(local_server(home))
            stack.enter_context(client_settings(server.api_url, server.home))
        s = label_campaign(
            images=args.images, vocab=args.vocab, campaign=args.campaign, preset=args.preset,
            shard_size=args.shard_size, seed=args.seed, device=args.device, image_root=args.image_root,
            stage1=args.stage1,
            overwrite=args.overwrite, retry_failed=args.retry_failed, runner="ray", ray_address=args.ray_address,
            gpus_per_shard=args.gpus_per_shard, cpus_per_shard=args.cpus_per_shard,
            allow_outside_root=args.allow_outside_root, relabel_store=args.relabel_store,
        )
    print(f"campaign   {s['campaign']}  (runner ray, {len(s['workers'])} worker processes)\n"
          f"shards     {s['shards']}: {s['shards_labeled']} labelled, {s['shards_skipped']} already done\n"
          f"images     {s['images']} labelled: {s['images_ok']} ok, {s['images_failed']} failed\n"
          f"masks      {s['masks']}\n"
          f"time       {s['seconds']:.1f} s ({s['images_per_s']:.2f} images/s)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from stages.label import campaign_status, format_status

    print(format_status(campaign_status(args.campaign)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from storage.verify import format_verify, verify_campaign

    report = verify_campaign(args.campaign, repair=args.repair, attempts_grace_s=args.attempts_grace)
    print(format_verify(report))
    return 0 if report["clean"] else 1
