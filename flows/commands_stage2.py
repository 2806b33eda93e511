"""`fmbseg train`, `fmbseg eval` and `fmbseg predict` (DESIGN §7). They call the stages directly (no Prefect
server needed); flows/train_flow.py and flows/evaluate_flow.py wire the same stage functions."""

from __future__ import annotations

import argparse
import os
import sys

from flows.cli import UsageError


def register(subparsers) -> None:
    t = subparsers.add_parser(
        "train", help="train the alignment module (Stage 2) on a campaign's pseudo-labels",
        description="Train one alignment block from frozen DINOv2 features to the CLIP text space with TSupCon. "
        "The checkpoint goes to <campaign>/train/<config-hash>/model.pt unless --out is given; a finished one "
        "with the same settings is reused, an interrupted one resumes from its last finished epoch.")
    t.add_argument("--campaign", required=True, metavar="DIR", help="campaign directory or fsspec URL")
    t.add_argument("--epochs", default="auto", metavar="N|auto",
                   help="training epochs; auto (default): 10, or enough epochs for >= 2000 steps at batch 5 on a "
                   "small campaign (max of the two); the plan is printed before training")
    cache = t.add_mutually_exclusive_group()
    cache.add_argument("--cache-features", dest="cache", action="store_const", const=True, default="auto",
                       help="always cache DINOv2 features in <campaign>/features/ (fp16; default: cache when "
                       "the disk has room; the size is printed first)")
    cache.add_argument("--no-cache", dest="cache", action="store_const", const=False,
                       help="recompute DINOv2 features every epoch (no feature cache)")
    t.add_argument("--no-procrustes", action="store_true",
                   help="do not turn the output space to the text anchors after each epoch (the paper's plain "
                   "SGD; aligns more slowly, see docs/STAGE2.md)")
    t.add_argument("--crop-min", type=float, default=0.4, metavar="F",
                   help="each batch trains on random windows of the patch grid, sides from F x the grid's to all of "
                        "it (default 0.4; 1 = always the whole view; docs/STAGE2.md)")
    t.add_argument("--out", metavar="CKPT", help="checkpoint path (default <campaign>/train/<hash>/model.pt)")
    t.add_argument("--train-size", default="auto", metavar="PX|auto",
                   help="training view: short side resized, centre-cropped square, a multiple of 14; auto "
                   "(default): 448, or 224 on a campaign of fewer than 500 images (where auto epochs add steps)")
    t.add_argument("--batch-size", type=int, default=5, metavar="N", help="images per SGD step (default 5)")
    t.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
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


def _int_or_auto(flag: str, text: str) -> int | str:
    """A flag's value: "auto" or an integer >= 1 (a UsageError otherwise)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{flag} must be >= 1 or auto, got {text}")
    return value


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

    epochs = _int_or_auto("--epochs", args.epochs)
    train_size = _int_or_auto("--train-size", args.train_size)
    _check_device(args.device)
    if "://" not in args.campaign and not os.path.isfile(os.path.join(args.campaign, "campaign.json")):
        raise UsageError(f"no campaign at {args.campaign} (campaign.json missing): run `fmbseg label` first")
    cfg = TrainConfig(epochs=epochs, cache_features=args.cache, device=args.device,
                      train_size=train_size, batch_size=args.batch_size, seed=args.seed,
                      procrustes=not args.no_procrustes, crop_min=args.crop_min)
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
