"""Evaluation runner: segmenters on one benchmark under TCL's protocol (DESIGN §2).

`evaluate(dataset, data_root, models, out, ...)` checks the dataset (folders, annotations, class count) and the
checkpoint before building any model, runs each image once through every requested segmenter (Stage 1 runs
once per image and serves `stage1.1`, `stage1.2` and `stage1`; their uncovered pixels take the `maskclip`
prediction of the same image), and accumulates one confusion matrix per segmenter.

Outputs in `out` (merged with what earlier calls wrote there, so one directory accumulates a models x datasets
table): `results.json` (per dataset, per model: mIoU, mAcc, aAcc, per-class IoU and Acc with null for nan, the
number of images scored, `skipped_images` (name and reason of each image that could not be scored: unreadable, or
its annotation's size differs from the upright image's; skipped with a warning, the run goes on; also listed per
dataset at the top level), the evaluation config and its hash), `results.md` (the mIoU table, then per-class IoU
tables) and `iou_<dataset>.png` (per-class IoU bars, one colour per model). A `custom` dataset's column is
`custom:<folder name>`, so several custom datasets can share one `out`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from typing import Sequence

import numpy as np
from tqdm import tqdm

import fmbseg
from fmbseg.checkpoint import load_checkpoint
from fmbseg.datasets import SampleError, open_dataset
from fmbseg.metrics import ConfusionMatrix
from fmbseg.segmenters import (SEGMENTER_NAMES, STAGE1_SEGMENTERS, MaskClipSegmenter, SlidingWindow, Stage1Segmenters,
                               TextCache, load_fmbseg)
from fmbseg.vocab_builtin import COCO_STUFF_91
from stages.latest_checkpoint import resolve_checkpoint
from storage.fs import canonical_json, write_file

PROTOCOL = {"short_side": 448, "max_long_side": 2048, "window": 448, "stride": 224, "template": "a photo of a {}.",
            "ignore_index": 255, "image_resize": "mmcv imresize bilinear (cv2 INTER_LINEAR, uint8)",
            "window_padding": "TCL: zero after normalisation, centred, to a patch multiple",
            "prediction": "logits resized bilinearly (align_corners=False) to the ground truth, arg-max there"}


def resolve_models(models: Sequence[str] | str, checkpoint: str | None) -> list[str]:
    """`all` -> every segmenter (`fmbseg` only with a checkpoint); names are checked and de-duplicated in order."""
    items = models.split(",") if isinstance(models, str) else list(models)
    items = [m.strip() for m in items if m and m.strip()]
    if not items:
        raise ValueError("no model to evaluate: give names such as maskclip,fmbseg or all")
    if "all" in items:
        if len(items) > 1:
            raise ValueError("--models all cannot be combined with other names")
        if checkpoint is None:
            print("eval: --models all without --checkpoint: evaluating every segmenter but fmbseg", file=sys.stderr)
        return [m for m in SEGMENTER_NAMES if m != "fmbseg" or checkpoint is not None]
    unknown = [m for m in items if m not in SEGMENTER_NAMES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(SEGMENTER_NAMES)} or all")
    if "fmbseg" in items and checkpoint is None:
        raise ValueError("the fmbseg segmenter needs --checkpoint (a model.pt written by `fmbseg train`)")
    return list(dict.fromkeys(items))


def evaluate(dataset: str, data_root: str, models: Sequence[str] | str, out: str, checkpoint: str | None = None,
             preset: str | None = None, device: str = "auto", stage1: dict | None = None, limit: int | None = None,
             progress: bool = True) -> dict:
    """Evaluate `models` on `dataset` read from `data_root`; write/merge the reports in `out`.

    `preset` names the CLIP (and SAM) of `maskclip` and `stage1*` (default: the checkpoint's preset, else
    `base`); `fmbseg` always uses the encoders its checkpoint names. `stage1` overrides Stage-1 settings on top
    of the preset's. `limit` evaluates only the first N images (sorted by id).
    Returns `{model: {"mIoU", "mAcc", "aAcc", "IoU": {class: value | None}, ...}}`."""
    from fmbseg.device import resolve_device
    from fmbseg.presets import make_clip, make_dino, make_sam, stage1_overrides
    from fmbseg.stage1 import Stage1Config

    checkpoint = resolve_checkpoint(checkpoint) if checkpoint else checkpoint
    names = resolve_models(models, checkpoint)
    ds = open_dataset(dataset, data_root)
    ckpt = load_checkpoint(checkpoint) if "fmbseg" in names else None
    if preset is None:
        preset = ckpt["encoders"]["preset"] if ckpt is not None else "base"
    stage1 = dict(stage1 or {})
    stage1_cfg = Stage1Config.from_dict({**stage1_overrides(preset), **stage1}) \
        if any(m in STAGE1_SEGMENTERS for m in names) else None
    dev = resolve_device(device)
    n_images = len(ds) if limit is None else min(limit, len(ds))
    window = SlidingWindow()
    background = COCO_STUFF_91 if ds.background_rule else ()
    class_prompts = [p[0] if len(p) == 1 else p for p in ds.prompts]

    need_clip = any(m != "fmbseg" for m in names)
    # The dense CLIP mode of a `stage1` override applies to every CLIP-based segmenter here (maskclip included).
    dense_mode = stage1_cfg.dense_mode if stage1_cfg is not None else stage1.get("dense_mode", "maskclip")
    clip = make_clip(preset, device=str(dev), dense_mode=dense_mode) if need_clip else None
    maskclip = MaskClipSegmenter(clip, background, window) if clip is not None else None
    family = None
    if stage1_cfg is not None:
        family = Stage1Segmenters(clip, make_sam(preset, device=str(dev)), stage1_cfg, maskclip)
    fmb = None
    if ckpt is not None:
        ck_preset = ckpt["encoders"]["preset"]
        ck_clip = clip if clip is not None and ck_preset == preset else make_clip(ck_preset, device=str(dev))
        text = maskclip.text if ck_clip is clip and maskclip is not None else TextCache(ck_clip)
        fmb = load_fmbseg(ckpt, make_dino(ck_preset, device=str(dev)), ck_clip, background, window, text)

    matrices = {m: ConfusionMatrix(ds.num_classes) for m in names}
    seconds = {m: 0.0 for m in names}
    bar = tqdm(range(n_images), desc=f"eval {dataset}", unit="img", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    skipped: list[dict] = []
    for i in bar:
        try:
            image_id, image, gt = ds.load(i)
        except SampleError as e:
            # One bad image must not abort a 5000-image benchmark: skip it, say so, list it in results.json.
            skipped.append({"image": ds.samples[i][0], "reason": str(e)})
            warnings.warn(f"eval {dataset}: skipped {ds.samples[i][0]}: {e}", stacklevel=2)
            continue
        fallback, t_mask = None, 0.0
        if maskclip is not None:
            t0 = time.perf_counter()
            fallback = maskclip.predict(image, class_prompts)
            t_mask = time.perf_counter() - t0
            if "maskclip" in matrices:
                matrices["maskclip"].update(fallback, gt)
                seconds["maskclip"] += t_mask
        if family is not None:
            t0 = time.perf_counter()
            preds = family.predict_all(image, class_prompts, image_id=image_id, fallback=fallback)
            dt = time.perf_counter() - t0 + t_mask      # Stage 1 needs the maskclip map for uncovered pixels
            for m in STAGE1_SEGMENTERS:
                if m in matrices:
                    matrices[m].update(preds[m], gt)
                    seconds[m] += dt
        if fmb is not None:
            t0 = time.perf_counter()
            matrices["fmbseg"].update(fmb.predict(image, class_prompts), gt)
            seconds["fmbseg"] += time.perf_counter() - t0
    bar.close()

    config = {"dataset": dataset, "data_root": os.path.abspath(data_root), "images": n_images, "preset": preset,
              "stage1": stage1_cfg.to_dict() if stage1_cfg is not None else None, "protocol": PROTOCOL,
              "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
              "checkpoint_train_hash": ckpt["train_hash"] if ckpt is not None else None,
              "version": fmbseg.__version__}
    if clip is not None:
        config["dense_mode"] = dense_mode
    scored = n_images - len(skipped)
    results = {}
    for m in names:
        r = matrices[m].compute()
        model_cfg = {**config, "model": m}
        results[m] = {
            "mIoU": _num(r["mIoU"]), "mAcc": _num(r["mAcc"]), "aAcc": _num(r["aAcc"]),
            "IoU": {c: _num(v) for c, v in zip(ds.class_names, r["IoU"])},
            "Acc": {c: _num(v) for c, v in zip(ds.class_names, r["Acc"])},
            "images": scored, "seconds_per_image": seconds[m] / max(scored, 1),
            "skipped_images": skipped,
            "config": model_cfg,
            "config_hash": hashlib.sha256(canonical_json(model_cfg)).hexdigest()[:16],
        }
    key = report_key(dataset, data_root)
    merged = _merge_results(out, key, results)
    merged.setdefault("skipped_images", {})[key] = skipped
    write_reports(out, merged)
    print(format_results(key, results))
    if skipped:
        print(f"eval {key}: {len(skipped)} of {n_images} images skipped (listed in results.json, skipped_images)",
              file=sys.stderr)
    return results


def report_key(dataset: str, data_root: str) -> str:
    """The dataset's column in the reports: its name, or `custom:<folder name>` so several custom datasets
    evaluated into one `out` keep their own columns."""
    if dataset != "custom":
        return dataset
    return f"custom:{os.path.basename(os.path.normpath(os.path.abspath(data_root)))}"


def _num(v: float) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), 4)


def _merge_results(out: str, dataset: str, results: dict) -> dict:
    path = os.path.join(out, "results.json")
    merged = {"format": "fmbseg-eval", "results": {}}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                merged = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); remove it or use another --out") from None
        if merged.get("format") != "fmbseg-eval":
            raise ValueError(f"{path} is not an fmbseg evaluation report; use another --out")
    merged.setdefault("results", {}).setdefault(dataset, {}).update(results)
    return merged


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def results_markdown(merged: dict) -> str:
    """The models x datasets mIoU table, then one per-class IoU table per dataset (classes x models)."""
    res = merged["results"]
    datasets = sorted(res)
    model_order = [m for m in SEGMENTER_NAMES if any(m in res[d] for d in datasets)]
    lines = ["# Evaluation (mIoU, %)", "", "| model | " + " | ".join(datasets) + " |",
             "|---|" + "---:|" * len(datasets)]
    for m in model_order:
        lines.append(f"| {m} | " + " | ".join(_fmt(res[d][m]["mIoU"]) if m in res[d] else "" for d in datasets)
                     + " |")
    for d in datasets:
        models = [m for m in model_order if m in res[d]]
        classes = list(next(iter(res[d].values()))["IoU"])
        lines += ["", f"## {d}: per-class IoU (%)", "",
                  "| class | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        lines.append("| **mIoU** | " + " | ".join(f"**{_fmt(res[d][m]['mIoU'])}**" for m in models) + " |")
        lines.append("| mAcc | " + " | ".join(_fmt(res[d][m]["mAcc"]) for m in models) + " |")
        lines.append("| aAcc | " + " | ".join(_fmt(res[d][m]["aAcc"]) for m in models) + " |")
        for c in classes:
            lines.append(f"| {c} | " + " | ".join(_fmt(res[d][m]["IoU"].get(c)) for m in models) + " |")
    return "\n".join(lines) + "\n"


def iou_chart(path: str, dataset: str, per_model: dict) -> None:
    """Per-class IoU bar chart (PNG): classes along x, one bar per model (nan drawn as no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in SEGMENTER_NAMES if m in per_model]
    classes = list(next(iter(per_model.values()))["IoU"])
    k = len(classes)
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * k * max(1, len(models)) ** 0.5 + 2), 4.5))
    x = np.arange(k)
    for j, m in enumerate(models):
        values = [np.nan if per_model[m]["IoU"].get(c) is None else per_model[m]["IoU"][c] for c in classes]
        ax.bar(x + (j - (len(models) - 1) / 2) * width, values, width, label=f"{m} ({_fmt(per_model[m]['mIoU'])})")
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=90, fontsize=7 if k > 40 else 9)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{dataset}: per-class IoU (legend: mIoU)")
    # Outside the axes, right of them: inside, the legend covered the bars of the first classes.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write_reports(out: str, merged: dict) -> None:
    os.makedirs(out, exist_ok=True)
    write_file(os.path.join(out, "results.json"), (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode())
    write_file(os.path.join(out, "results.md"), results_markdown(merged).encode())
    for d, per_model in merged["results"].items():
        iou_chart(os.path.join(out, f"iou_{_file_safe(d)}.png"), d, per_model)


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def format_results(dataset: str, results: dict) -> str:
    """One line per model: `dataset  model  mIoU  mAcc  aAcc`."""
    rows = [f"{'dataset':<14} {'model':<10} {'mIoU':>7} {'mAcc':>7} {'aAcc':>7}"]
    for m, r in results.items():
        rows.append(f"{dataset:<14} {m:<10} {_fmt(r['mIoU']):>7} {_fmt(r['mAcc']):>7} {_fmt(r['aAcc']):>7}")
    return "\n".join(rows)


# -- fan-out: one (dataset, segmenter) pair per task, merged afterwards (flows/evaluate_flow.py, runner="ray") --
def evaluate_one(dataset: str, data_root: str, model: str, checkpoint: str | None = None, preset: str | None = None,
                 device: str = "auto", stage1: dict | None = None, limit: int | None = None) -> dict:
    """Evaluate one segmenter on one benchmark without touching any report (tasks running side by side must not
    read-modify-write the same results.json); -> `{"dataset": report key, "results": {model: ...}}` for
    `merge_evaluations`. The metrics equal those `evaluate` computes for the model in a combined run."""
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="fmbseg-eval-")
    try:
        results = evaluate(dataset, data_root, [model], scratch, checkpoint=checkpoint, preset=preset,
                           device=device, stage1=stage1, limit=limit, progress=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"dataset": report_key(dataset, data_root), "results": results}


def merge_evaluations(out: str, parts: Sequence[dict]) -> dict:
    """Merge `evaluate_one` results into `out`'s results.json / results.md / IoU charts (what earlier runs wrote
    there is kept, as with `evaluate`); -> the merged report."""
    if not parts:
        raise ValueError("no evaluation results to merge")
    merged = _merge_results(out, parts[0]["dataset"], parts[0]["results"])
    for part in parts[1:]:
        merged["results"].setdefault(part["dataset"], {}).update(part["results"])
    write_reports(out, merged)
    return merged
