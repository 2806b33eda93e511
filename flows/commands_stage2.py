"""`fmbseg train`, `fmbseg eval` and `fmbseg predict` (DESIGN §7). They call the stages directly (no Prefect
server needed); flows/train_flow.py and flows/evaluate_flow.py wire the same stage functions."""

from __future__ import annotations

import argparse
import os
import sys

from flows.cli import UsageError
from flows.settings_flags import add_settings_flags, settings_from_args
from stages.train_config import TrainOverrides

# TrainConfig fields whose flags are written by hand: --cache-features/--no-cache, --no-procrustes, --device.
TRAIN_FLAGS_BY_HAND = ("cache_features", "procrustes", "device")


def register(subparsers) -> None:
    t = subparsers.add_parser(
        "train", help="train the alignment module (Stage 2) on a campaign's pseudo-labels",
        description="Train one alignment block from frozen DINOv2 features to the CLIP text space with TSupCon. "
        "The checkpoint goes to <campaign>/train/<config-hash>/model.pt unless --out is given; a finished one "
        "with the same settings is reused, an interrupted one resumes from its last finished epoch.")
    t.add_argument("--campaign", required=True, metavar="DIR", help="campaign directory or fsspec URL")
    settings = t.add_argument_group(
        "training settings (stages/train_config.py; part of the train hash; the plan is printed before "
        "training)")
    add_settings_flags(settings, TrainOverrides, skip=TRAIN_FLAGS_BY_HAND)
    cache = settings.add_mutually_exclusive_group()
    cache.add_argument("--cache-features", dest="cache", action="store_const", const=True, default="auto",
                       help="always cache DINOv2 features in <campaign>/features/ (fp16; default: cache when "
                       "the disk has room; the size is printed first)")
    cache.add_argument("--no-cache", dest="cache", action="store_const", const=False,
                       help="recompute DINOv2 features every epoch (no feature cache)")
    settings.add_argument("--no-procrustes", action="store_true",
                   help="do not turn the output space to the text anchors after each epoch (the paper's plain "
                   "SGD; aligns more slowly, see docs/STAGE2.md)")
    t.add_argument("--out", metavar="CKPT", help="checkpoint path (default <campaign>/train/<hash>/model.pt)")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = subparsers.add_parser(
        "eval", help="evaluate segmenters on a benchmark (TCL protocol); results accumulate in --out",
        description="Segmenters: maskclip, stage1.1, stage1.2, stage1, fmbseg. Datasets: voc21, voc20, context60, context59, "
        "coco_object, coco_stuff171, cityscapes, ade150 (mmsegmentation layouts) and custom (DIR/images, "
        "DIR/annotations/<stem>.png, DIR/classes.txt). Writes results.json, results.md and iou_<dataset>.png.")
    e.add_argument("--dataset", required=True, metavar="NAME", help="benchmark name or custom")
    e.add_argument("--data-root", required=True, metavar="DIR", help="the benchmark's folder")
    e.add_argument("--models", required=True, metavar="all|NAME,NAME", help="segmenters to evaluate, or all")
    e.add_argument("--checkpoint", metavar="CKPT|CAMPAIGN", help="alignment checkpoint: model.pt, or a campaign folder (its train/latest.json names the newest) (needed by fmbseg)")
    e.add_argument("--preset", default=None,
                   help="CLIP/SAM preset of maskclip and stage1* (default: the checkpoint's, else base)")
    e.add_argument("--out", required=True, metavar="DIR", help="report folder (several calls accumulate)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "predict", help="segment images with a trained checkpoint: PNG label maps and overlays",
        description="Writes <stem>.png (class index into the vocabulary), <stem>_overlay.jpg and classes.txt.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT|CAMPAIGN",
                   help="alignment checkpoint: model.pt, or a campaign folder (its train/latest.json names the newest)")
    p.add_argument("--images", required=True, metavar="PATH", help="folder of images (recursive), an image or a COCO JSON")
    p.add_argument("--vocab", required=True, metavar="VOCAB",
                   help="comma-separated names, a file (`name: synonym, synonym` lines) or a built-in name")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def _resolve_checkpoint(ref: str) -> str:
    """--checkpoint as given -> the model.pt it means (a campaign through its train/latest.json)."""
    from stages.latest_checkpoint import resolve_checkpoint

    try:
        path = resolve_checkpoint(ref)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if path != ref:
        print(f"checkpoint: {path}", file=sys.stderr)
    return path


def _check_device(device: str) -> None:
    from fmbseg.device import resolve_device

    try:
        resolve_device(device)
    except RuntimeError as e:  # --device cuda on a machine without a GPU
        raise UsageError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from stages.train import TrainConfig, train_alignment

    given = settings_from_args(args, TrainOverrides,
                               [n for n in TrainOverrides.model_fields if n not in TRAIN_FLAGS_BY_HAND])
    _check_device(args.device)
    if "://" not in args.campaign and not os.path.isfile(os.path.join(args.campaign, "campaign.json")):
        raise UsageError(f"no campaign at {args.campaign} (campaign.json missing): run `fmbseg label` first")
    cfg = TrainConfig(**given, cache_features=args.cache, device=args.device, procrustes=not args.no_procrustes)
    path = train_alignment(args.campaign, cfg, out=args.out, progress=not args.no_progress)
    print(path)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fmbseg.datasets import DatasetError
    from stages.evaluate import evaluate, resolve_models

    _check_device(args.device)
    if args.checkpoint:
        args.checkpoint = _resolve_checkpoint(args.checkpoint)
    if args.preset is not None:
        from fmbseg.presets import get_preset

        try:
            get_preset(args.preset)
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        models = resolve_models(args.models, args.checkpoint)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.checkpoint and not os.path.isfile(args.checkpoint) and "://" not in args.checkpoint:
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    try:
        evaluate(args.dataset, args.data_root, models, args.out, checkpoint=args.checkpoint, preset=args.preset,
                 device=args.device, progress=not args.no_progress)
    except DatasetError as e:
        raise UsageError(str(e)) from None
    print(f"reports: {os.path.join(args.out, 'results.md')}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from stages.predict import predict_folder

    _check_device(args.device)
    args.checkpoint = _resolve_checkpoint(args.checkpoint)
    if not os.path.exists(args.images) and "://" not in args.images:
        raise UsageError(f"--images {args.images} does not exist")
    written = predict_folder(args.checkpoint, args.images, args.vocab, args.out, device=args.device,
                             progress=not args.no_progress)
    if not written:  # every image failed (each is listed above): the run did not do its job
        print(f"fmbseg predict: error: no image under {args.images} could be segmented (see {args.out}/index.csv)",
              file=sys.stderr)
        return 1
    return 0
