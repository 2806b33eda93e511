"""Semantic-segmentation metrics as mmsegmentation computes them, from a streaming confusion matrix.

Per class c, over the whole dataset (pixels whose ground truth is `ignore_index` are dropped first):
intersection = pred == gt == c, union = area_pred(c) + area_gt(c) - intersection.
IoU(c) = intersection / union (nan when the union is empty), Acc(c) = intersection / area_gt(c) (nan when the
class never occurs in the ground truth); mIoU / mAcc = nan-mean over classes; aAcc = Σ intersection / Σ area_gt.
All figures in percent.
"""

from __future__ import annotations

import warnings

import numpy as np


class ConfusionMatrix:
    """`update(pred, gt)` per image, `compute()` at the end. `matrix[g, p]` counts pixels of gt g predicted p."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """pred, gt: (H, W) integer class maps of the same shape; gt may hold `ignore_index`."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
        valid = gt != self.ignore_index
        g = gt[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        k = self.num_classes
        if g.size and (g.min() < 0 or g.max() >= k):
            bad = np.unique(g[(g < 0) | (g >= k)])[:5].tolist()
            raise ValueError(f"ground truth has labels {bad} outside 0..{k - 1} (ignore is {self.ignore_index}): "
                             "is the class list the dataset's?")
        if p.size and (p.min() < 0 or p.max() >= k):
            bad = np.unique(p[(p < 0) | (p >= k)])[:5].tolist()
            raise ValueError(f"prediction has labels {bad} outside 0..{k - 1}")
        self.matrix += np.bincount(g * k + p, minlength=k * k).reshape(k, k)

    def compute(self) -> dict:
        """-> {"mIoU", "mAcc", "aAcc": float percent, "IoU", "Acc": list[float] per class (nan allowed)}."""
        m = self.matrix.astype(np.float64)
        intersect = np.diag(m)
        area_gt = m.sum(1)
        area_pred = m.sum(0)
        union = area_gt + area_pred - intersect
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = intersect / union
            acc = intersect / area_gt
            a_acc = intersect.sum() / area_gt.sum()
        with warnings.catch_warnings():
            # A dataset where no class occurs at all gives nan, not a RuntimeWarning.
            warnings.simplefilter("ignore", RuntimeWarning)
            miou = float(np.nanmean(iou)) * 100
            macc = float(np.nanmean(acc)) * 100
        return {
            "mIoU": miou,
            "mAcc": macc,
            "aAcc": float(a_acc) * 100,
            "IoU": [float(v) * 100 for v in iou],
            "Acc": [float(v) * 100 for v in acc],
        }
