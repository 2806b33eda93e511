"""Diagnosis (not a test) of one `scripts/stage2_acceptance.py` seed folder: what limits the `fmbseg` segmenter's
mIoU on the evaluation world. The measurements docs/STAGE2.md quotes for world 4711:

1. pseudo-labels: per class, pixel IoU of the Stage-1 label maps against the planted ground truth, and at the
   training view the patch labels (count, purity = share whose ground-truth patch label agrees, patches of the
   class left unlabelled);
2. alignment or separation: held-out patch-level mIoU of the arg-max over the text anchors against the arg-max
   over the training embeddings' class centroids (equal: the anchors are where the classes are, so the errors
   come from the embeddings themselves), and cos(centroid, anchor) per class;
3. the evaluation images where a class loses > 10 % of its pixels, and to what (the real segmenter, sliding
   window, pixel level);
4. context: for each such (image, class), what its patches become with the image's full token set, with each
   token alone (no attention context), and with only the tokens of the class and one other class present.

    PYTHONPATH=. .venv/bin/python scripts/stage2_diagnose.py /tmp/stage2-acceptance/seed4711
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def main(argv=None) -> int:
    from fmbseg.alignment import AlignmentConfig, load_alignment, patch_labels, train_label_view, train_view
    from fmbseg.checkpoint import load_checkpoint
    from fmbseg.datasets import open_dataset
    from fmbseg.images import load_image
    from fmbseg.presets import make_clip, make_dino
    from fmbseg.segmenters import load_fmbseg
    from storage.reader import CampaignReader

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="a seed folder of scripts/stage2_acceptance.py (train-world, eval-world, campaign)")
    ap.add_argument("--checkpoint", help="default: the campaign's only train/*/model.pt")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = args.base
    ckpt_path = args.checkpoint or glob.glob(os.path.join(base, "campaign", "train", "*", "model.pt"))[0]
    ck = load_checkpoint(ckpt_path)
    names = ck["vocabulary"]["names"]
    k_classes, size = len(names), ck["config"]["train"]["train_size"]
    module = load_alignment(AlignmentConfig(**ck["config"]["alignment"]), ck["model"])
    text = ck["text"].float()
    dino = make_dino(ck["encoders"]["preset"], device="cpu")
    p = dino.patch_size

    def ground_truth(path: str, world: str) -> np.ndarray:
        stem = os.path.splitext(os.path.basename(path))[0]
        return np.array(Image.open(os.path.join(base, world, "annotations", stem + ".png"))).astype(np.int64)

    # 1. pseudo-labels against the ground truth
    inter, union = np.zeros(k_classes), np.zeros(k_classes)
    count, agree, unlabelled = (np.zeros(k_classes, int) for _ in range(3))
    feats, labels = [], []
    for _, path, label in CampaignReader(os.path.join(base, "campaign")).iter_labels():
        gt, label = ground_truth(path, "train-world"), label.astype(np.int64)
        for k in range(k_classes):
            inter[k] += ((label == k) & (gt == k)).sum()
            union[k] += ((label == k) | (gt == k)).sum()
        pl = patch_labels(train_label_view(label, size), p, k_classes)
        gl = patch_labels(train_label_view(gt, size), p, k_classes)
        for k in range(k_classes):
            count[k] += (pl == k).sum()
            agree[k] += ((pl == k) & (gl == k)).sum()
            unlabelled[k] += ((pl < 0) & (gl == k)).sum()
        feats.append(dino.features(train_view(load_image(path), None, size)[0][None])[0])
        labels.append(torch.from_numpy(gl))
    print(f"1. pseudo-labels ({size} px view): class, pixel IoU vs ground truth, patches, purity, unlabelled")
    for k in range(k_classes):
        print(f"   {names[k]:<12} {100 * inter[k] / max(union[k], 1):6.1f} % {count[k]:7d} "
              f"{100 * agree[k] / max(count[k], 1):6.1f} % {unlabelled[k]:6d}")

    # 2. anchors against centroids
    with torch.no_grad():
        z = module(torch.stack(feats)).reshape(-1, text.shape[1])
        y = torch.stack(labels).reshape(-1)
        cents = torch.stack([F.normalize(z[y == k].mean(0), dim=0) if bool((y == k).any())
                             else torch.zeros(text.shape[1]) for k in range(k_classes)])
    print("2. cos(centroid, anchor): " + " ".join(f"{names[k]} {float(cents[k] @ text[k]):.2f}"
                                                  for k in range(k_classes)))
    zs, ys = [], []
    for path in sorted(glob.glob(os.path.join(base, "eval-world", "images", "*"))):
        x, g = train_view(load_image(path), ground_truth(path, "eval-world"), 448)
        with torch.no_grad():
            zs.append(module(dino.features(x[None]))[0].reshape(-1, text.shape[1]))
        ys.append(torch.from_numpy(patch_labels(g, p, k_classes)).reshape(-1))
    z, y = torch.cat(zs), torch.cat(ys)
    z, y = z[y >= 0], y[y >= 0]

    def patch_miou(pred: torch.Tensor) -> float:
        ious = [float(((pred == k) & (y == k)).sum()) / float(((pred == k) | (y == k)).sum())
                for k in range(k_classes) if bool((y == k).any())]
        return 100 * float(np.mean(ious))

    print(f"   held-out patch mIoU (448 px view): anchors {patch_miou((z @ text.T).argmax(1)):.2f} %, "
          f"training centroids {patch_miou((z @ cents.T).argmax(1)):.2f} %")

    # 3. and 4. per image
    print("3./4. evaluation images where a class loses > 10 % of its pixels (segmenter), and its patches by context:")
    ds = open_dataset("custom", os.path.join(base, "eval-world"))
    seg = load_fmbseg(ck, dino, make_clip(ck["encoders"]["preset"], device="cpu"))
    for i in range(len(ds)):
        image_id, image, gt = ds.load(i)
        pred = seg.predict(image, ds.class_names)
        present = [int(k) for k in np.unique(gt) if k < k_classes]
        x, g = train_view(image, gt.astype(np.int64), 448)
        pl = torch.from_numpy(patch_labels(g, p, k_classes))
        f = dino.features(x[None])[0]
        for k in present:
            acc = float((pred[gt == k] == k).mean())
            if acc >= 0.9 or not bool((pl == k).any()):
                continue
            vals, counts = np.unique(pred[gt == k], return_counts=True)
            became = ", ".join(f"{names[v]} {c / counts.sum():.0%}" for v, c in sorted(zip(vals, counts),
                                                                                        key=lambda t: -t[1])[:3])
            print(f"   {image_id} ({', '.join(names[c] for c in present)}): {names[k]} {acc:.0%} right -> {became}")

            def share(tokens: torch.Tensor, keep: torch.Tensor) -> str:
                with torch.no_grad():
                    out = (module(tokens[None, None])[0, 0] @ text.T).argmax(-1)[keep]
                v, c = out.unique(return_counts=True)
                return ", ".join(f"{names[a]} {b / c.sum():.0%}" for a, b in sorted(zip(v.tolist(), c.tolist()),
                                                                                   key=lambda t: -t[1])[:3])

            mine = pl == k
            print(f"      full context: {share(f[pl >= 0], mine[pl >= 0])}")
            with torch.no_grad():
                alone = (module(f[mine].reshape(-1, 1, 1, f.shape[-1]))[:, 0, 0] @ text.T).argmax(-1)
            v, c = alone.unique(return_counts=True)
            print("      each token alone: " + ", ".join(f"{names[a]} {b / c.sum():.0%}" for a, b in
                                                        sorted(zip(v.tolist(), c.tolist()), key=lambda t: -t[1])[:3]))
            for other in present:
                if other != k and bool((pl == other).any()):
                    keep = mine | (pl == other)
                    print(f"      with only {names[other]}: {share(f[keep], mine[keep])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
