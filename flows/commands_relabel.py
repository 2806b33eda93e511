"""`fmbseg relabel`: a campaign with a new vocabulary, without rerunning the image encoders (stages/relabel.py).
It calls the stage directly (no Prefect server needed); flows/relabel_flow.py wires the same functions."""

from __future__ import annotations

import argparse

from flows.cli import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "relabel", help="relabel a campaign with a new vocabulary without rerunning SAM or the CLIP image pass",
        description="Write a new campaign OUT equal to a full `fmbseg label` with the new vocabulary on the same "
        "images, from the relabel store of CAMPAIGN (labelled with `fmbseg label --relabel-store`): only the text "
        "encoder, the SAM decoder for the new point prompts and the pooling run. Reruns skip done shards.")
    p.add_argument("--campaign", required=True, metavar="DIR", help="source campaign (labelled with --relabel-store)")
    p.add_argument("--vocab", required=True, metavar="VOCAB",
                   help="the new vocabulary: comma-separated names, a file (`name: synonym, synonym` lines) or a "
                   "built-in name")
    p.add_argument("--out", required=True, metavar="DIR", help="the new campaign directory or fsspec URL")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto; identical outputs need the "
                   "kind of device the source campaign was labelled on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_relabel)


def cmd_relabel(args: argparse.Namespace) -> int:
    from fmbseg.device import resolve_device
    from stages.relabel import RelabelConfig, format_relabel_summary, run_relabel

    try:
        resolve_device(args.device)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    summary = run_relabel(RelabelConfig(campaign=args.campaign, vocab=args.vocab, out=args.out, device=args.device),
                          progress=not args.no_progress)
    print(format_relabel_summary(summary))
    return 1 if summary["shards_missing"] else 0
