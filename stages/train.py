"""Stage 2 runner: train the alignment module on a campaign's pseudo-labels (DESIGN §1, Stage 2).

`train_alignment(campaign, cfg, out=None)` reads the campaign's label maps, turns them into patch labels at
`train_size`, runs frozen DINOv2 on the same views, and trains one alignment block with TSupCon against the fixed
text embeddings of the campaign's vocabulary (from the CLIP model of the campaign's preset).

Output: `<campaign>/train/<train-hash>/model.pt` (or `out`), rewritten whole after every finished epoch with
the optimiser, scheduler and RNG state, and `model.config.json` beside it (the resolved config). The train hash
covers the training settings that change the weights (not the device) and the campaign's Stage-1 config hash,
so changing a training setting never reruns Stage 1 and rerunning the same training reuses its checkpoint.
An interrupted run resumes from its last finished epoch and ends with the weights an uninterrupted run has:
each epoch's shuffle comes from its own seeded generator, and the optimiser, scheduler and torch RNG are restored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import fmbseg
from fmbseg.alignment import AlignmentConfig, build_alignment, patch_labels, train_label_view, train_view
from fmbseg.checkpoint import checkpoint_exists, is_finished, load_checkpoint, save_checkpoint
from fmbseg.device import autocast, resolve_device, synchronize
from fmbseg.images import load_image
from fmbseg.losses import tsupcon
from fmbseg.vocab import Vocabulary
from stages.features_cache import FeatureCache, encoder_key
from storage.fs import CampaignRoot, canonical_json, write_file
from storage.reader import CampaignReader

# Settings that do not change the trained weights, left out of the train hash.
UNHASHED = ("device",)


# Fewer SGD steps than this rarely align the module with the text space (DESIGN §1: ~1000 steps at tau 0.1).
MIN_USEFUL_STEPS = 1000


@dataclass(frozen=True)
class TrainConfig:
    """DESIGN §1 Stage-2 defaults. `cache_features` is hashed: cached features are fp16, so a cached run's weights
    differ (slightly) from an uncached one's."""

    epochs: int = 10
    batch_size: int = 5
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature: float = 0.1
    train_size: int = 448
    seed: int = 0
    cache_features: bool = False
    device: str = "auto"

    def __post_init__(self):
        problems = []
        for name in ("epochs", "batch_size", "train_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an integer >= 1 (got {v!r})")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)!r})")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1) (got {self.momentum!r})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0 (got {self.weight_decay!r})")
        if problems:
            raise ValueError("invalid train config: " + "; ".join(problems))

    def hashed(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in UNHASHED}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train config field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


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
    """Patch labels of every ok image, computed once (label maps are not kept: a campaign may hold millions)."""
    ids, paths, labels = [], [], []
    for image_id, path, label in reader.iter_labels():
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


def _payload(module, align_cfg, cfg, vocab, text, encoders, epoch, thash, campaign, stage1_hash, opt, sched) -> dict:
    return {
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "config": {"alignment": align_cfg.to_json(), "train": asdict(cfg), "train_hash": thash,
                   "campaign": campaign, "stage1_hash": stage1_hash},
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


def train_alignment(campaign: str, cfg: TrainConfig = TrainConfig(), out: str | None = None,
                    on_epoch_end: Callable[[int, str, dict], None] | None = None, progress: bool = True,
                    dino=None, clip=None) -> str:
    """Train (or resume, or reuse) the alignment module of `campaign`; returns the checkpoint path.

    `on_epoch_end(epochs_finished, checkpoint_path, stats)` is called after each epoch's checkpoint is written (an
    exception there stops training like an interruption would); `stats` = {"loss": mean batch loss, "seconds":
    the epoch's feature + training time without the checkpoint write, "cached": features read from the cache}. `dino` / `clip` replace the campaign preset's
    models (benchmarks with randomly initialised full-width architectures); the checkpoint names what was used."""
    from fmbseg.presets import make_clip, make_dino

    reader = CampaignReader(campaign)
    manifest = reader.manifest
    vocab = Vocabulary.from_json(manifest.vocabulary)
    thash = train_hash(cfg, reader.stage1_hash)
    root = CampaignRoot(campaign)
    ckpt_path = out or root.full_url(f"train/{thash}/model.pt")

    resume = None
    if checkpoint_exists(ckpt_path):
        previous = load_checkpoint(ckpt_path)
        if previous.get("train_hash") != thash:
            raise ValueError(f"{ckpt_path} holds a training with other settings (train hash "
                             f"{previous.get('train_hash')}, this one {thash}); choose another --out or remove it")
        if is_finished(previous):
            print(f"train: {ckpt_path} is already trained ({previous['epoch']} epochs, hash {thash})", file=sys.stderr)
            return ckpt_path
        resume = previous

    device = resolve_device(cfg.device)
    dino = dino if dino is not None else make_dino(manifest.preset, device=str(device))
    clip = clip if clip is not None else make_clip(manifest.preset, device=str(device))
    p = dino.patch_size
    if cfg.train_size % p:
        raise ValueError(f"train_size {cfg.train_size} is not a multiple of the DINOv2 patch size {p}")
    with torch.no_grad():
        prompts = [q[0] if len(q) == 1 else q for q in vocab.prompts()]
        text = torch.nn.functional.normalize(clip.encode_text(prompts).float(), dim=-1).to(device)
    encoders = {"dino": {"model_id": dino.model_id, "weights_sha256": dino.weights_sha256},
                "clip": {"model_id": clip.model_id, "weights_sha256": clip.weights_sha256},
                "preset": manifest.preset}
    del clip  # only its text embeddings are needed from here on

    data = _load_train_set(reader, cfg.train_size, p, len(vocab))
    n, grid = len(data.image_ids), cfg.train_size // p
    align_cfg = AlignmentConfig(in_dim=dino.embed_dim, out_dim=int(text.shape[1]))
    steps_per_epoch = math.ceil(n / cfg.batch_size)

    torch.manual_seed(cfg.seed)
    module = build_alignment(align_cfg).to(device)
    opt = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch, eta_min=0.0)
    start_epoch = 0
    if resume is not None:
        module.load_state_dict(resume["model"])
        opt.load_state_dict(resume["resume"]["optimizer"])
        sched.load_state_dict(resume["resume"]["scheduler"])
        torch.set_rng_state(resume["resume"]["rng"])
        start_epoch = int(resume["epoch"])
        print(f"train: resuming {ckpt_path} after epoch {start_epoch}/{cfg.epochs}", file=sys.stderr)

    _write_config(ckpt_path, {"train": asdict(cfg), "train_hash": thash, "alignment": align_cfg.to_json(),
                              "campaign": campaign, "stage1_hash": reader.stage1_hash, "encoders": encoders,
                              "vocabulary": vocab.to_json(), "images": n, "steps_per_epoch": steps_per_epoch,
                              "version": fmbseg.__version__})

    total_steps = cfg.epochs * steps_per_epoch
    if total_steps < MIN_USEFUL_STEPS:
        # TSupCon's text anchors weigh K / (M + K) of the loss, so the module needs many steps to reach the text
        # space; a small campaign at the default 10 epochs stops long before.
        print(f"train: warning: only {total_steps} SGD steps ({n} images, batch {cfg.batch_size}, {cfg.epochs} "
              f"epochs); the alignment typically needs ~{MIN_USEFUL_STEPS} or more: raise --epochs",
              file=sys.stderr)

    cache = None
    if cfg.cache_features:
        key = encoder_key(dino.model_id, dino.weights_sha256, cfg.train_size, data.image_ids)
        cache = FeatureCache(root, key, data.image_ids, grid, dino.embed_dim)
    labels_all = torch.from_numpy(data.labels)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for epoch in range(start_epoch, cfg.epochs):
            reading = cache is not None and cache.is_complete()
            writing = cache is not None and not reading
            if writing:
                print(f"train: writing feature cache {cache.url}: {n} images x {grid}x{grid}x{dino.embed_dim} fp16 "
                      f"= {cache.nbytes / 2**20:.1f} MiB", file=sys.stderr)
                cache.create()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
            batches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress,
                       file=sys.stderr, dynamic_ncols=True)
            t0, total = time.perf_counter(), 0.0
            for idx in bar:
                if reading:
                    feats = cache.read(idx).to(device).float()
                else:
                    views = torch.stack(list(pool.map(lambda i: _load_view(data.paths[i], cfg.train_size), idx)))
                    with torch.no_grad(), autocast(device):
                        feats = dino.features(views.to(device)).float()
                    if cache is not None:
                        feats = feats.half().float()   # every epoch sees what the cache holds
                        cache.write(idx, feats)
                with autocast(device):
                    z = module(feats)
                loss = tsupcon(z.reshape(-1, z.shape[-1]), labels_all[idx].reshape(-1).to(device), text,
                               cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                value = loss.item()
                total += value
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{sched.get_last_lr()[0]:.4f}")
            bar.close()
            if writing:
                cache.mark_complete()
            synchronize(device)
            stats = {"loss": total / len(batches), "seconds": time.perf_counter() - t0, "cached": reading}
            print(f"train: epoch {epoch + 1}/{cfg.epochs} mean loss {stats['loss']:.4f} "
                  f"({stats['seconds']:.1f} s{', features from cache' if reading else ''})", file=sys.stderr)
            save_checkpoint(ckpt_path, _payload(module, align_cfg, cfg, vocab, text, encoders, epoch + 1, thash,
                                                campaign, reader.stage1_hash, opt, sched))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, ckpt_path, stats)
    return ckpt_path


def _write_config(ckpt_path: str, config: dict) -> None:
    write_file(config_path_for(ckpt_path), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
