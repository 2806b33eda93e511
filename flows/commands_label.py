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

    try:
        resolve_device(args.device)
    except RuntimeError as e:  # --device cuda on a machine without a GPU
        raise UsageError(str(e)) from None
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
        stage1={} if args.dense_mode == "maskclip" else {"dense_mode": args.dense_mode},
    )
    summary = run_label(cfg, rank=args.rank, world_size=args.world_size, retry_failed=args.retry_failed,
                        progress=not args.no_progress)
    print(format_label_summary(summary))
    return 0


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
            stage1={} if args.dense_mode == "maskclip" else {"dense_mode": args.dense_mode},
            overwrite=args.overwrite, retry_failed=args.retry_failed, runner="ray", ray_address=args.ray_address,
            gpus_per_shard=args.gpus_per_shard, cpus_per_shard=args.cpus_per_shard,
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
