"""Stage 2 runner: train the alignment module on a campaign's pseudo-labels (DESIGN §1, Stage 2).

`train_alignment(campaign, cfg, out=None)` reads the campaign's label maps, turns them into patch labels at
`train_size`, runs frozen DINOv2 on the same views, and trains one alignment block with TSupCon against the fixed
text embeddings of the campaign's vocabulary (from the CLIP model of the campaign's preset).

Schedule: `epochs="auto"` (the default) trains max(10, the epochs giving >= 2000 SGD steps at batch 5), and
`train_size="auto"` uses 448 px, or 224 px below 500 images; the plan (epochs, steps, estimated time) is
printed before the first step and stored in the checkpoint (`plan`). See docs/STAGE2.md for why small campaigns
need the step floor. The DINOv2 feature cache (`stages/features_cache.py`) is on when the disk has room.

Output: `<campaign>/train/<train-hash>/model.pt` (or `out`), rewritten whole every `checkpoint_every(epochs)`
epochs (every epoch up to 50) and after the last, with the optimiser, scheduler and RNG state, and
`model.config.json` beside it (the resolved config). A finished training (or one found already trained) then
points `<campaign>/train/latest.json` at its checkpoint (`stages/latest_checkpoint.py`), so `--checkpoint
<campaign>` reaches the newest model without its hash. The train hash covers the resolved training settings that
change the weights (not the device; the cache choice is covered, since cached features are fp16) and the
campaign's Stage-1 config hash, so changing a training setting never reruns Stage 1 and rerunning the same
training reuses its checkpoint. An interrupted run resumes from its last checkpoint and ends with the weights an
uninterrupted run has: each epoch's shuffle comes from its own seeded generator, and the optimiser, scheduler
and torch RNG are restored.
"""

from __future__ import annotations

import hashlib
import json
import math
import copy
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import fmbseg
from fmbseg.alignment import (AlignmentConfig, build_alignment, patch_labels, random_windows, rotate_to_anchors,
                              train_label_view, train_view, window_sides)
from fmbseg.checkpoint import checkpoint_exists, is_finished, load_checkpoint, save_checkpoint
from fmbseg.device import autocast, resolve_device, synchronize
from fmbseg.images import load_image
from fmbseg.losses import tsupcon
from fmbseg.vocab import Vocabulary
from stages.features_cache import FeatureCache, encoder_key
from stages.latest_checkpoint import LATEST, write_latest
from stages.progress import StepProgress, format_seconds
from stages.train_config import AUTO_MIN_EPOCHS, AUTO_MIN_STEPS, AUTO_REF_BATCH, AUTO_SIZE_MIN_IMAGES, TrainConfig
from stages.train_config import auto_epochs, auto_train_size  # noqa: F401 (re-exported)
from storage.fs import CampaignRoot, canonical_json, write_file
from storage.reader import CampaignReader

# Fewer SGD steps than this rarely align the module with the text space (docs/STAGE2.md).
MIN_USEFUL_STEPS = 1000

# `cache_features="auto"` caches when the cache takes at most this fraction of the free disk space.
CACHE_MAX_FREE_FRACTION = 0.5


# A run of many short epochs (a small campaign under `--epochs auto`) rewrites its checkpoint at most this often.
MAX_CHECKPOINTS = 50


def checkpoint_every(epochs: int) -> int:
    """The checkpoint is written every this many epochs, and after the last: every epoch up to 50 epochs."""
    return max(1, math.ceil(epochs / MAX_CHECKPOINTS))


def train_hash(cfg: TrainConfig, stage1_hash: str) -> str:
    """16 hex digits of sha256 over the hashed training settings and the campaign's Stage-1 config hash."""
    blob = canonical_json({"train": cfg.hashed(), "stage1_hash": stage1_hash})
    return hashlib.sha256(blob).hexdigest()[:16]


def config_path_for(checkpoint: str) -> str:
    """`model.pt` -> `model.config.json` (the resolved config, beside the checkpoint)."""
    base, _ = os.path.splitext(checkpoint)
    return base + ".config.json"


@dataclass
class _TrainSet:
    image_ids: list[str]
    paths: list[str]
    labels: np.ndarray          # (N, g, g) int64 patch labels, -1 = ignore


def _load_train_set(reader: CampaignReader, size: int, patch: int, num_classes: int) -> _TrainSet:
    """Patch labels of every ok image, computed once (label maps are not kept: a campaign may hold millions).
    Every image is checked to still have its label map's size (`ImageChanged` otherwise: a replaced or rotated file)."""
    ids, paths, labels = [], [], []
    for image_id, path, label in reader.iter_labels(check_images=True):
        ids.append(image_id)
        paths.append(path)
        labels.append(patch_labels(train_label_view(label, size), patch, num_classes))
    if not ids:
        raise ValueError(f"campaign {reader.root.url} has no labelled images yet: run `fmbseg label` first")
    return _TrainSet(ids, paths, np.stack(labels))


def _load_view(path: str, size: int) -> torch.Tensor:
    try:
        image = load_image(path)
    except Exception as e:  # noqa: BLE001 - any decode failure here means the input changed after labeling
        raise RuntimeError(f"cannot read training image {path} (it was readable when labelled): {e}") from e
    return train_view(image, None, size)[0]


def count_images(reader: CampaignReader) -> int:
    """Training images of the campaign: the ok images of its done shards (what `_load_train_set` reads)."""
    return sum(len(reader.labels(sid).image_ids) for sid in reader.done())


def resolve_cache(root: CampaignRoot, nbytes: int, complete: bool) -> tuple[bool, str]:
    """`cache_features="auto"`: (cache?, why). On when a finished cache exists, or when the campaign is on a
    local disk whose free space is at least nbytes / CACHE_MAX_FREE_FRACTION; off on remote storage (reading
    features back over the network is not the cheap path the cache is for)."""
    if complete:
        return True, "a finished cache exists"
    if not root.is_local:
        return False, "the campaign is not on a local disk"
    folder = root.full("")
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder) or "."
    free = shutil.disk_usage(folder).free
    if nbytes <= CACHE_MAX_FREE_FRACTION * free:
        return True, f"{free / 2**30:.1f} GiB free"
    return False, f"only {free / 2**30:.1f} GiB free, the cache needs {nbytes / 2**30:.2f} GiB (x2 headroom)"


def _payload(module, align_cfg, cfg, vocab, text, encoders, epoch, thash, campaign, stage1_hash, opt, sched,
             plan) -> dict:
    return {
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "config": {"alignment": align_cfg.to_json(), "train": cfg.to_dict(), "train_hash": thash,
                   "campaign": campaign, "stage1_hash": stage1_hash},
        "plan": plan,
        "vocabulary": vocab.to_json(),
        "text": text.detach().cpu(),
        "encoders": encoders,
        "temperature": cfg.temperature,
        "version": fmbseg.__version__,
        "epoch": epoch,
        "epochs": cfg.epochs,
        "train_hash": thash,
        "resume": {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()},
    }


def _prefetch(items, load: Callable, depth: int = 2):
    """Yield (item, load(item)) with up to `depth` loads running ahead in a background thread, in order.
    An exception in `load` is raised here, at its item."""
    with ThreadPoolExecutor(max_workers=1) as ahead:
        pending = []
        it = iter(items)
        for item in it:
            pending.append((item, ahead.submit(load, item)))
            if len(pending) > depth:
                break
        while pending:
            item, future = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ahead.submit(load, nxt)))
            yield item, future.result()


def train_alignment(campaign: str, cfg: TrainConfig = TrainConfig(), out: str | None = None,
                    on_epoch_end: Callable[[int, str, dict], None] | None = None, progress: bool = True,
                    dino=None, clip=None) -> str:
    """Train (or resume, or reuse) the alignment module of `campaign`; returns the checkpoint path.

    `cfg.epochs` "auto" and `cfg.cache_features` "auto" are resolved first (`TrainConfig.resolved`); the plan
    (epochs, steps, estimated time) is printed before the first step and recorded in the checkpoint (`plan`).
    The checkpoint is rewritten every `checkpoint_every(epochs)` epochs (every epoch up to 50) and after the last.
    `on_epoch_end(epochs_finished, checkpoint_path, stats)` is called after each epoch, after its checkpoint when it
    writes one (an exception there stops training like an interruption would; the run resumes from the last
    checkpoint); `stats` = {"loss": mean batch loss, "seconds": the epoch's feature + training time without the
    checkpoint write, "cached": features read from the cache, "checkpoint": whether this epoch wrote one}.
    `dino` / `clip` replace the campaign preset's models (benchmarks with randomly initialised full-width
    architectures); the checkpoint names what was used."""
    from fmbseg.presets import make_clip, make_dino

    reader = CampaignReader(campaign)
    manifest = reader.manifest
    vocab = Vocabulary.from_json(manifest.vocabulary)
    root = CampaignRoot(campaign)
    n_images = count_images(reader)
    if not n_images:
        raise ValueError(f"campaign {reader.root.url} has no labelled images yet: run `fmbseg label` first")

    def path_for(c: TrainConfig) -> tuple[str, str]:
        h = train_hash(c, reader.stage1_hash)
        return h, out or root.full_url(f"train/{h}/model.pt")

    # Candidates for an existing checkpoint: when the cache setting is "auto", a run that chose either way
    # before (its checkpoint is found under its own hash) is reused or resumed as it was.
    choices = (True, False) if cfg.cache_features == "auto" else (bool(cfg.cache_features),)
    resume, run_cfg, thash, ckpt_path = None, None, None, None
    for cache_choice in choices:
        c = cfg.resolved(n_images, cache_choice)
        h, path = path_for(c)
        if not checkpoint_exists(path):
            continue
        previous = load_checkpoint(path)
        if previous.get("train_hash") != h:
            if out is not None and cache_choice is not choices[-1]:
                continue
            raise ValueError(f"{path} holds a training with other settings (train hash "
                             f"{previous.get('train_hash')}, this one {h}); choose another --out or remove it")
        if is_finished(previous):
            print(f"train: {path} is already trained ({previous['epoch']} epochs, hash {h})", file=sys.stderr)
            _point_latest(campaign, path, h, int(previous["epoch"]))
            return path
        resume, run_cfg, thash, ckpt_path = previous, c, h, path
        break

    device = resolve_device(cfg.device)
    dino = dino if dino is not None else make_dino(manifest.preset, device=str(device))
    clip = clip if clip is not None else make_clip(manifest.preset, device=str(device))
    p = dino.patch_size
    size = cfg.resolved(n_images, False).train_size
    if size % p:
        raise ValueError(f"train_size {size} is not a multiple of the DINOv2 patch size {p}")
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        # once per vocabulary, in float32 whatever the training precision
        prompts = [q[0] if len(q) == 1 else q for q in vocab.prompts()]
        text = torch.nn.functional.normalize(clip.encode_text(prompts).float(), dim=-1).to(device)
    encoders = {"dino": {"model_id": dino.model_id, "weights_sha256": dino.weights_sha256},
                "clip": {"model_id": clip.model_id, "weights_sha256": clip.weights_sha256},
                "preset": manifest.preset}
    del clip  # only its text embeddings are needed from here on

    data = _load_train_set(reader, size, p, len(vocab))
    n, grid = len(data.image_ids), size // p
    key = encoder_key(dino.model_id, dino.weights_sha256, size, data.image_ids)
    cache = FeatureCache(root, key, data.image_ids, grid, dino.embed_dim)
    cache_why = "--cache-features" if cfg.cache_features is True else "--no-cache"
    if run_cfg is None:
        use_cache = bool(cfg.cache_features)
        if cfg.cache_features == "auto":
            use_cache, cache_why = resolve_cache(root, cache.nbytes, cache.is_complete())
        run_cfg = cfg.resolved(n, use_cache)
        thash, ckpt_path = path_for(run_cfg)
    else:
        cache_why = "as the run being resumed"
    if not run_cfg.cache_features:
        cache = None
    align_cfg = AlignmentConfig(in_dim=dino.embed_dim, out_dim=int(text.shape[1]))
    steps_per_epoch = math.ceil(n / run_cfg.batch_size)
    epochs = run_cfg.epochs
    total_steps = epochs * steps_per_epoch

    torch.manual_seed(run_cfg.seed)
    module = build_alignment(align_cfg).to(device)
    labels_all = torch.from_numpy(data.labels)
    opt = torch.optim.SGD(module.parameters(), lr=run_cfg.lr, momentum=run_cfg.momentum,
                          weight_decay=run_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=0.0)
    start_epoch = 0
    if resume is not None:
        module.load_state_dict(resume["model"])
        opt.load_state_dict(resume["resume"]["optimizer"])
        sched.load_state_dict(resume["resume"]["scheduler"])
        torch.set_rng_state(resume["resume"]["rng"])
        start_epoch = int(resume["epoch"])
        print(f"train: resuming {ckpt_path} after epoch {start_epoch}/{epochs}", file=sys.stderr)

    # The plan, with an estimate from one batch of features and one (throwaway) training step.
    reading_from_start = cache is not None and cache.is_complete()
    first = list(range(min(n, run_cfg.batch_size)))
    t0 = time.perf_counter()
    feats = _features(first, data, run_cfg, dino, device, cache if reading_from_start else None)
    synchronize(device)
    t_feat = (time.perf_counter() - t0) / len(first)
    # timed on a window of the mean size the run draws (the step's cost grows with the square of its patches)
    (h_lo, h_hi), (w_lo, w_hi) = window_sides((grid, grid), run_cfg.crop_min)
    mean_h, mean_w = round((h_lo + h_hi) / 2), round((w_lo + w_hi) / 2)
    t_step = _time_one_step(module, run_cfg, feats[:, :mean_h, :mean_w], labels_all[first][:, :mean_h, :mean_w],
                            text, device)
    remaining = epochs - start_epoch
    every = checkpoint_every(epochs)
    feature_epochs = 0 if reading_from_start else (min(1, remaining) if cache is not None else remaining)
    estimate = t_step * remaining * steps_per_epoch + t_feat * n * feature_epochs
    plan = {"epochs": epochs, "epochs_setting": cfg.epochs, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "images": n, "batch_size": run_cfg.batch_size,
            "rule": f"max({AUTO_MIN_EPOCHS}, ceil({AUTO_MIN_STEPS} / ceil(images / {AUTO_REF_BATCH})))",
            "cache_features": run_cfg.cache_features, "cache_setting": cfg.cache_features,
            "train_size": run_cfg.train_size, "train_size_setting": cfg.train_size, "crop_min": run_cfg.crop_min,
            "estimated_seconds": round(estimate, 1), "device": str(device), "checkpoint_every": every}
    why = (f"auto: max({AUTO_MIN_EPOCHS}, >= {AUTO_MIN_STEPS} steps at batch {AUTO_REF_BATCH})"
           if cfg.epochs == "auto" else "as asked")
    size_why = f" (auto: {'>=' if n >= AUTO_SIZE_MIN_IMAGES else '<'} {AUTO_SIZE_MIN_IMAGES} images)" \
        if cfg.train_size == "auto" else ""
    crop_why = "" if run_cfg.crop_min >= 1 else \
        f", random windows of {h_lo}-{h_hi} x {w_lo}-{w_hi} of the {grid}x{grid} patches"
    print(f"train: plan: {epochs} epochs ({why}) x {steps_per_epoch} steps = {total_steps} SGD steps; {n} images, "
          f"batch {run_cfg.batch_size}, {run_cfg.train_size} px{size_why}{crop_why}, features "
          f"{'cached' if cache is not None else 'recomputed every epoch'} ({cache_why}); estimated "
          f"{format_seconds(estimate)} on {device}" + (f" for the {remaining} epochs left" if start_epoch else ""),
          file=sys.stderr)
    if total_steps < MIN_USEFUL_STEPS:
        print(f"train: warning: only {total_steps} SGD steps ({n} images, batch {run_cfg.batch_size}, {epochs} "
              f"epochs); the alignment typically needs ~{MIN_USEFUL_STEPS} or more: use --epochs auto",
              file=sys.stderr)

    _write_config(ckpt_path, {"train": run_cfg.to_dict(), "train_hash": thash, "alignment": align_cfg.to_json(),
                              "campaign": campaign, "stage1_hash": reader.stage1_hash, "encoders": encoders,
                              "vocabulary": vocab.to_json(), "images": n, "steps_per_epoch": steps_per_epoch,
                              "plan": plan, "version": fmbseg.__version__})

    cached_complete = cache is not None and cache.is_complete()
    # one display for the run (a small campaign has hundreds of short epochs): a bar on a terminal, a few lines
    # in a log
    bar = StepProgress(remaining * steps_per_epoch, "train", enabled=progress)
    for epoch in range(start_epoch, epochs):
        reading = cached_complete
        writing = cache is not None and not reading
        if writing:
            print(f"train: writing feature cache {cache.url}: {n} images x {grid}x{grid}x{dino.embed_dim} fp16 "
                  f"= {cache.nbytes / 2**20:.1f} MiB", file=sys.stderr)
            cache.create()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(run_cfg.seed * 1_000_003 + epoch)).tolist()
        batches = [order[i:i + run_cfg.batch_size] for i in range(0, n, run_cfg.batch_size)]
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)      # the loss stays on the device: one host sync per epoch
        class_sums = torch.zeros(len(vocab), int(text.shape[1]), device=device)    # this epoch's embeddings
        class_counts = np.zeros(len(vocab), dtype=np.int64)
        load = (lambda idx: cache.read_host(idx, pin=device.type == "cuda")) if reading else \
            (lambda idx: _load_views(data, idx, run_cfg.train_size))
        windows = torch.Generator().manual_seed(_window_seed(run_cfg.seed, epoch))
        for idx, host in _prefetch(batches, load):
            if reading:
                feats = host.to(device, non_blocking=True).float()
            else:
                feats = _encode(dino, host, device)
                if cache is not None:
                    feats = feats.half().float()   # every epoch sees what the cache holds
                    cache.write(idx, feats)
            # labels stay on the host: tsupcon drops ignored patches there, without a device sync
            feats, y = random_windows(feats, labels_all[idx], run_cfg.crop_min, windows)
            with autocast(device):
                z = module(feats)
            y = y.reshape(-1)
            loss = tsupcon(z.reshape(-1, z.shape[-1]), y, text, run_cfg.temperature)
            if run_cfg.procrustes:
                kept = (y >= 0).nonzero().squeeze(1)
                class_counts += np.bincount(y[kept].numpy(), minlength=len(vocab))
                class_sums.index_add_(0, y[kept].to(device),
                                      z.detach().reshape(-1, z.shape[-1]).float().index_select(0, kept.to(device)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
            bar.update(1)
            bar.note(f"lr {sched.get_last_lr()[0]:.4f}")
        if writing:
            cache.mark_complete()
            cached_complete = True
        if run_cfg.procrustes:
            rotate_to_anchors(module, class_sums, torch.from_numpy(class_counts > 0), text,
                              [opt.state.get(q, {}).get("momentum_buffer") for q in module.head.parameters()])
        stats = {"loss": total.item() / len(batches), "seconds": time.perf_counter() - t0, "cached": reading,
                 "checkpoint": (epoch + 1) % every == 0 or epoch + 1 == epochs}
        # the epoch and its loss ride on the progress display (a small campaign has hundreds of epochs); without
        # it, one line per checkpoint
        bar.describe(f"epoch {epoch + 1}/{epochs} loss {stats['loss']:.4f}")
        if stats["checkpoint"]:
            if not progress:
                print(f"train: epoch {epoch + 1}/{epochs} mean loss {stats['loss']:.4f} "
                      f"({stats['seconds']:.1f} s{', features from cache' if reading else ''})", file=sys.stderr)
            save_checkpoint(ckpt_path, _payload(module, align_cfg, run_cfg, vocab, text, encoders, epoch + 1, thash,
                                                campaign, reader.stage1_hash, opt, sched, plan))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, ckpt_path, stats)
    bar.close()
    _point_latest(campaign, ckpt_path, thash, epochs)
    return ckpt_path


def _point_latest(campaign: str, ckpt_path: str, thash: str, epochs: int) -> None:
    """Make `<campaign>/train/latest.json` name this finished checkpoint, and say how to use it."""
    write_latest(campaign, ckpt_path, thash, epochs)
    print(f"train: {CampaignRoot(campaign).full_url(LATEST)} -> {ckpt_path}; predict and eval accept "
          f"--checkpoint {campaign}", file=sys.stderr)


def _window_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's window draws: its own stream (the shuffle's seed is seed * 1_000_003 + epoch), so a
    resumed run draws the windows of the uninterrupted one."""
    return (seed * 1_000_003 + epoch) * 2 + 1


def _load_views(data: _TrainSet, idx: list[int], size: int) -> torch.Tensor:
    """(B, 3, size, size) training views of the images at `idx` (decoded in parallel threads)."""
    with ThreadPoolExecutor(max_workers=min(8, len(idx), os.cpu_count() or 1)) as pool:
        return torch.stack(list(pool.map(lambda i: _load_view(data.paths[i], size), idx)))


def _encode(dino, views: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad(), autocast(device):
        return dino.features(views.to(device)).float()


def _features(idx: list[int], data: _TrainSet, cfg: TrainConfig, dino, device, cache) -> torch.Tensor:
    """(B, g, g, C) float32 features of the images at `idx`: from a finished cache, else computed (fp16-rounded
    when the run caches, as training sees them)."""
    if cache is not None:
        return cache.read(idx).to(device).float()
    feats = _encode(dino, _load_views(data, idx, cfg.train_size), device)
    return feats.half().float() if cfg.cache_features else feats


def _time_one_step(module, cfg: TrainConfig, feats, labels, text, device, repeats: int = 3) -> float:
    """Seconds of one training step: the fastest of `repeats` steps (the first pays one-off warm-up costs) on a
    copy of the module, so the run's weights, optimiser and RNG are untouched."""
    probe = copy.deepcopy(module)
    opt = torch.optim.SGD(probe.parameters(), lr=0.0, momentum=cfg.momentum)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        with autocast(device):
            z = probe(feats)
        loss = tsupcon(z.reshape(-1, z.shape[-1]), labels.reshape(-1), text, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _write_config(ckpt_path: str, config: dict) -> None:
    write_file(config_path_for(ckpt_path), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
