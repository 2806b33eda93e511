"""Validate `fmbseg stats`' label-noise proxy where the truth is known: does the per-class Stage 1.1/1.2 agreement
rank classes as their true pseudo-label IoU does?

A synthetic world (DESIGN §6) restricted to ten colours is labelled with the oracle preset whose CLIP is made
confusable (`fmbseg.testing.oracle`: `similar` pairs with text/image cosines close to 1, plus per-patch noise),
so four pairs of classes are confused to different degrees and two classes stay clean. Then, per class:
- true IoU: the campaign's label maps against the world's ground truth, over labelled pixels (as
  tests/stages/test_label_oracle.py scores them);
- the proxies of `stages.stats.compute_stats` (no ground truth): agreement (label map vs the 1.2 map),
  agreement_11_12 (1.1 map vs 1.2 map), mask_iou, 1 - label_differ;
and Spearman's rank correlation of each proxy with the true IoU over the classes present.

    .venv/bin/python scripts/validate_stats_proxy.py --images 10 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fmbseg.metrics import ConfusionMatrix  # noqa: E402
from fmbseg.testing.oracle import build_oracle_clip, build_oracle_sam  # noqa: E402
from fmbseg.testing.palette import NUM_COLOURS  # noqa: E402
from fmbseg.testing.world import load_annotation, write_world  # noqa: E402
from stages import models_cache  # noqa: E402
from stages.label import LabelConfig, run_label  # noqa: E402
from stages.stats import compute_stats, spearman  # noqa: E402
from storage.reader import CampaignReader  # noqa: E402

# Four confusable pairs, from indistinguishable to mildly similar, and two clean classes (blue, white).
SIMILAR = {("orange", "yellow"): 0.99995, ("magenta", "purple"): 0.9995, ("red", "brown"): 0.995,
           ("green", "cyan"): 0.95}
CLASSES = ("orange", "yellow", "magenta", "purple", "red", "brown", "green", "cyan", "blue", "white")
NOISE = 1.0
PROXIES = ("agreement", "agreement_11_12", "mask_iou", "label_differ")


def measure(root: Path, n_images: int, seed: int, size=(256, 352)) -> dict:
    """Label a confusable world under `root`; -> {"true_iou": (12,), "stats": ..., "spearman": {proxy: r}}."""
    write_world(root / "world", n_images, seed=seed, sizes=(size,), formats=("png",), classes=CLASSES)
    key = ("oracle", "cpu", "maskclip")
    saved = models_cache._MODELS.get(key)
    models_cache.register_models("oracle", "cpu", build_oracle_clip("cpu", similar=SIMILAR, noise=NOISE),
                                 build_oracle_sam("cpu"))
    try:
        run_label(LabelConfig(images=str(root / "world" / "images"), vocab=str(root / "world" / "classes.txt"),
                              campaign=str(root / "camp"), preset="oracle", device="cpu"), progress=False)
    finally:
        # The process-wide cache must not hand the confusable oracle to later exact-oracle runs.
        models_cache._MODELS.pop(key, None)
        if saved is not None:
            models_cache._MODELS[key] = saved
    cm = ConfusionMatrix(NUM_COLOURS)
    for _, path, label in CampaignReader(str(root / "camp")).iter_labels():
        gt = load_annotation(path)
        covered = label != 65535
        cm.update(np.where(covered, label, 0), np.where(covered, gt, 255))
    true_iou = np.asarray(cm.compute()["IoU"], np.float64) / 100
    stats = compute_stats(str(root / "camp"))
    rho = {}
    for proxy in PROXIES:
        v = np.array([np.nan if c[proxy] is None else c[proxy] for c in stats["classes"]], np.float64)
        if proxy == "label_differ":
            v = 1 - v
        ok = ~np.isnan(v) & ~np.isnan(true_iou)
        rho[proxy] = spearman(v[ok], true_iou[ok])
    return {"true_iou": true_iou, "stats": stats, "spearman": rho}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--size", type=int, nargs=2, default=(256, 352), metavar=("H", "W"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(Path(tmp), args.images, seed, tuple(args.size))
        table.append(r["spearman"])
        print(f"\nseed {seed}: {args.images} images {args.size[0]}x{args.size[1]}, coverage "
              f"{100 * r['stats']['coverage']:.1f} %")
        print(f"{'class':8s} {'true IoU':>8s} {'agreement':>9s} {'agr 1.1/1.2':>11s} {'mask IoU':>8s} "
              f"{'differ':>6s}  confused with")
        for c, t in zip(r["stats"]["classes"], r["true_iou"]):
            if np.isnan(t) and c["agreement"] is None:
                continue
            f = lambda v: "     -" if v is None or np.isnan(v) else f"{100 * v:6.1f}"  # noqa: E731
            print(f"{c['name']:8s} {f(t):>8s} {f(c['agreement']):>9s} {f(c['agreement_11_12']):>11s} "
                  f"{f(c['mask_iou']):>8s} {f(c['label_differ']):>6s}  {c['confused_with'] or ''}")
        print("Spearman with true IoU: " + ", ".join(f"{p} {v:.3f}" for p, v in r["spearman"].items()))
    print("\nSpearman over seeds " + str(args.seeds))
    for p in PROXIES:
        vals = np.array([t[p] for t in table])
        print(f"  {p:16s} " + " ".join(f"{v:6.3f}" for v in vals) + f"   median {np.nanmedian(vals):.3f}, "
              f"min {np.nanmin(vals):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
