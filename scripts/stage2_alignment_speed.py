"""Experiment (not a test): why Stage 2's text anchors align slowly, and which change keeps DESIGN's TSupCon but
aligns in fewer steps. Writes the figures docs/STAGE2.md quotes.

A 24-image synthetic world labelled with the `oracle` preset is the training campaign; a world of another seed
is the held-out set. Frozen features (oracle DINOv2) of both are computed once; then each variant trains the
alignment module from the same seed on the same batches (batch 5, SGD momentum 0.9, wd 1e-4, cosine lr over
`--steps`, τ 0.1) and, every few steps, prints
- `cos`: the mean over classes of the cosine between the class centroid of the training embeddings and its text
  anchor (alignment with the text space),
- `nc`: nearest-centroid accuracy of the training patches (are the classes separated at all?),
- `acc` / `miou`: held-out patch accuracy / patch-level mIoU of the arg-max over text anchors (what the `fmbseg`
  segmenter does, at patch resolution).

Variants (`NAME@lrX` runs one at lr X): `paper` (torch's default init, lr 0.1 everywhere), `lr1` (lr 1.0),
`head-lr10` (lr x10 on the final linear map only), `subspace` (final map initialised inside the span of the
text anchors), `probe` (final map initialised by ridge regression from the initial block's outputs to the text
anchors of the patch labels), `text-weight` (diagnostic, NOT the paper's loss: the patch-text term multiplied
by M/K so it weighs as much as the patch-patch term), `procrustes` (the output space turned onto the anchors
once at initialisation) and `procrustes-every` (and again every `--every` steps; `fmbseg train` does it after
every epoch). Results: docs/STAGE2.md.

    PYTHONPATH=. .venv/bin/python scripts/stage2_alignment_speed.py --train-size 224 --steps 400
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F


def weighted_tsupcon(z, labels, text, tau, text_weight):
    """DESIGN's TSupCon with the patch-text sum multiplied by `text_weight` (1 = the paper's loss)."""
    keep = labels >= 0
    z, y = F.normalize(z[keep].float(), dim=-1), labels[keep]
    m, k = z.shape[0], text.shape[0]
    t = F.normalize(text.float(), dim=-1)
    s_zt, s_zz = z @ t.T / tau, z @ z.T / tau
    s_zz.diagonal().fill_(-1.0e30)
    lse_zz = torch.logsumexp(s_zz, 1)
    l_t = torch.logaddexp(lse_zz, torch.logsumexp(s_zt, 1)) - s_zt.gather(1, y[:, None]).squeeze(1)
    onehot = F.one_hot(y, k).float()
    count = onehot.sum(0)
    class_term = ((onehot.T @ l_t) / count.clamp(min=1)).sum()
    n_pos = count[y] - 1
    pos = ((z * (onehot.T @ z)[y]).sum(1) - (z * z).sum(1)) / tau
    l_im = torch.where(n_pos > 0, lse_zz - pos / n_pos.clamp(min=1), torch.zeros_like(lse_zz))
    return (text_weight * class_term + l_im.sum()) / (m + k)


@torch.no_grad()
def probe_init_head(module, feats: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                         ridge: float = 1e-3) -> None:
    """Initialise the final linear map so the module's outputs start at the text anchors of their patch labels.

    feats (B, h, w, C) frozen features, labels (B, h, w) patch labels (negative = ignored), text (K, D) anchors.
    Solves the ridge regression  min_W,b Σ_i ||W x_i + b - t_{y_i}||² + λ ||W||²  over the kept patches, where
    x_i is the patch's output of the freshly initialised block, λ = `ridge` · mean(diag XᵀX), in float64.
    Only the head changes; the loss is untouched. Without any kept patch the head keeps its initialisation."""
    b, h, w, c = feats.shape
    x = module.block(feats.to(module.head.weight.device, torch.float32).reshape(b, h * w, c)).reshape(-1, c)
    y = labels.reshape(-1).to(x.device)
    keep = y >= 0
    if not bool(keep.any()):
        return
    x = torch.cat([x[keep].double(), torch.ones(int(keep.sum()), 1, dtype=torch.float64, device=x.device)], 1)
    target = text.to(x.device, torch.float64)[y[keep]]                                # (M, D)
    gram = x.T @ x                                                                    # (C + 1, C + 1)
    reg = torch.eye(c + 1, dtype=torch.float64, device=x.device) * (ridge * gram.diagonal()[:c].mean())
    reg[c, c] = 0.0                                                                   # the bias is not shrunk
    solution = torch.linalg.solve(gram + reg, x.T @ target)                           # (C + 1, D)
    module.head.weight.copy_(solution[:c].T.to(module.head.weight.dtype))
    module.head.bias.copy_(solution[c].to(module.head.bias.dtype))


@torch.no_grad()
def procrustes_rotate(module, feats, labels, text, opt=None) -> None:
    """Rotate the module's output space (W <- RW, b <- Rb, and the head's momentum buffers) by the orthogonal R
    that best turns the class centroids of its embeddings to their text anchors (orthogonal Procrustes,
    R = U Vᵀ from the SVD of Σ_k t_k c_kᵀ). The patch-patch term of TSupCon is invariant under any rotation of
    the embeddings, so this lowers only the patch-text term: a step along a symmetry of the dominant term."""
    b, h, w, c = feats.shape
    z = module(feats).reshape(-1, text.shape[1])
    y = labels.reshape(-1)
    present = [k for k in range(text.shape[0]) if bool((y == k).any())]
    cents = F.normalize(torch.stack([z[y == k].mean(0) for k in present]), dim=-1)     # (K', D)
    u, _, vh = torch.linalg.svd(text[present].T.double() @ cents.double())              # (D, D)
    r = (u @ vh).float()
    module.head.weight.copy_(r @ module.head.weight)
    module.head.bias.copy_(r @ module.head.bias)
    if opt is not None:
        for p in (module.head.weight, module.head.bias):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.copy_(r @ buf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--seed", type=int, default=4711, help="training world seed (held-out world: seed + 1)")
    ap.add_argument("--variants", default="paper,lr1,head-lr10,subspace,probe,text-weight,procrustes,"
                    "procrustes-every")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fmbseg.alignment import AlignmentConfig, build_alignment, patch_labels, train_label_view, train_view
    from fmbseg.images import load_image
    from fmbseg.testing.oracle import build_oracle_clip, build_oracle_dino
    from fmbseg.testing.world import load_annotation, write_world
    from fmbseg.vocab import Vocabulary
    from stages.label import LabelConfig, run_label
    from storage.reader import CampaignReader

    work = args.workdir or tempfile.mkdtemp(prefix="align_speed_")
    camp = os.path.join(work, "camp")
    if not os.path.exists(os.path.join(camp, "campaign.json")):
        write_world(os.path.join(work, "train"), args.images, seed=args.seed)
        write_world(os.path.join(work, "test"), 12, seed=args.seed + 1)
        run_label(LabelConfig(images=os.path.join(work, "train", "images"), vocab=os.path.join(work, "train",
                  "classes.txt"), campaign=camp, preset="oracle", device="cpu"), progress=False)
    reader = CampaignReader(camp)
    vocab = Vocabulary.from_json(reader.manifest.vocabulary)
    k, size = len(vocab), args.train_size
    dino, clip = build_oracle_dino("cpu"), build_oracle_clip("cpu")
    with torch.no_grad():
        text = F.normalize(clip.encode_text([q[0] if len(q) == 1 else q for q in vocab.prompts()]).float(), dim=-1)

    def featurise(pairs):
        feats, labs = [], []
        for image, label in pairs:
            x, _ = train_view(image, None, size)
            feats.append(dino.features(x[None])[0])
            labs.append(torch.from_numpy(patch_labels(train_label_view(label, size), 14, k, ignore=IGN)))
        return torch.stack(feats), torch.stack(labs)

    IGN = 65535
    train_x, train_y = featurise((load_image(p), lab) for _, p, lab in reader.iter_labels())
    IGN = 255
    test_dir = os.path.join(work, "test", "images")
    test_x, test_y = featurise((load_image(os.path.join(test_dir, f)), load_annotation(os.path.join(test_dir, f)))
                               for f in sorted(os.listdir(test_dir)))
    n = train_x.shape[0]
    print(f"{n} training images, {test_x.shape[0]} held-out, {size}px ({train_x.shape[1]}² patches), K={k}, "
          f"{args.steps} steps", flush=True)

    def measure(module):
        with torch.no_grad():
            z = module(train_x).reshape(-1, text.shape[1])
            y = train_y.reshape(-1)
            keep = y >= 0
            z, y = z[keep], y[keep]
            present = y.unique()
            cents = F.normalize(torch.stack([z[y == c].mean(0) for c in present]), dim=-1)
            cos = (cents * text[present]).sum(1).mean().item()
            nc = ((z @ cents.T).argmax(1) == torch.searchsorted(present, y)).float().mean().item()
            zt = module(test_x).reshape(-1, text.shape[1])
            yt = test_y.reshape(-1)
            keep = yt >= 0
            pred, yt = (zt[keep] @ text.T).argmax(1), yt[keep]
            acc = (pred == yt).float().mean().item()
            ious = []
            for c in yt.unique():
                inter = ((pred == c) & (yt == c)).sum().item()
                union = ((pred == c) | (yt == c)).sum().item()
                ious.append(inter / union)
            return cos, nc, acc, float(np.mean(ious))

    for variant in args.variants.split(","):
        torch.manual_seed(0)
        module = build_alignment(AlignmentConfig(in_dim=train_x.shape[-1], out_dim=text.shape[1]))
        lr, head_lr, text_weight = 0.1, 0.1, 1.0
        name, _, lr_text = variant.partition("@lr")        # e.g. probe@lr0.02: that variant at another lr
        if lr_text:
            lr = head_lr = float(lr_text)
            variant = name
        if variant == "lr1":
            lr = head_lr = 1.0
        elif variant == "head-lr10":
            head_lr = 1.0
        elif variant == "subspace":
            with torch.no_grad():
                q, _ = torch.linalg.qr(text.T)                     # (D, K) orthonormal basis of the anchors
                module.head.weight.copy_(q @ (q.T @ module.head.weight))
                module.head.bias.copy_(q @ (q.T @ module.head.bias))
        elif variant == "probe":
            probe_init_head(module, train_x, train_y, text)
        elif variant in ("procrustes", "procrustes-every"):
            procrustes_rotate(module, train_x, train_y, text)
        elif variant == "text-weight":
            text_weight = None                                     # M/K, per batch
        elif variant != "paper":
            raise SystemExit(f"unknown variant {variant}")
        head = list(module.head.parameters())
        rest = [p for p in module.parameters() if all(p is not h for h in head)]
        opt = torch.optim.SGD([{"params": rest, "lr": lr}, {"params": head, "lr": head_lr}], momentum=0.9,
                              weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
        with torch.no_grad():
            h = module.head(module.block(train_x[:5].reshape(5, -1, train_x.shape[-1])))
        print(f"\n{variant} lr {lr} (head {head_lr}): initial |head output| {h.norm(dim=-1).mean():.3f}", flush=True)
        print("  step    cos     nc    acc   miou   s/step", flush=True)
        cos, nc, acc, miou = measure(module)
        print(f"  {0:4d}  {cos:5.3f}  {nc:5.3f}  {acc:5.3f}  {miou:5.3f}", flush=True)
        g = torch.Generator().manual_seed(0)
        order, step, t0 = [], 0, time.perf_counter()
        while step < args.steps:
            if not order:
                order = torch.randperm(n, generator=g).tolist()
            idx, order = order[:5], order[5:]
            z = module(train_x[idx])
            y = train_y[idx].reshape(-1)
            w = text_weight if text_weight is not None else int((y >= 0).sum()) / k
            loss = weighted_tsupcon(z.reshape(-1, z.shape[-1]), y, text, 0.1, w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if variant == "procrustes-every" and step % args.every == 0:
                procrustes_rotate(module, train_x, train_y, text, opt)
            if step % args.every == 0 or step == args.steps:
                cos, nc, acc, miou = measure(module)
                print(f"  {step:4d}  {cos:5.3f}  {nc:5.3f}  {acc:5.3f}  {miou:5.3f}  "
                      f"{(time.perf_counter() - t0) / step:.3f}", flush=True)


if __name__ == "__main__":
    main()
