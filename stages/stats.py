"""Label-quality diagnostics of a campaign without ground truth (`fmbseg stats`).

Read only through `storage.reader.CampaignReader` (committed shards), one shard and one image at a time: a shard's
`masks` rows are grouped by image, each image's RLEs are decoded with pycocotools one mask at a time, so memory
is bounded by one shard's rows plus a few (H, W) maps, never by the campaign.

Per class k (vocabulary order), with "1.1 mask" / "1.2 masks" the rows of the `masks` table of that stage:
- `images_detected`: ok images with a 1.1 mask of class k (Stage 1.1 makes one per detected class).
- `masks_11`, `masks_12` (and `selected_12`): rows per stage.
- `area_*`: mean and median mask area in pixels and as a fraction of its image (H * W), per stage.
- score and sam_score histograms per stage (`score` = cosine of the pooled dense CLIP embedding with the class
  text, `sam_score` = SAM's predicted IoU).
- `label_pixels`: pixels of class k in the merged label maps (`labels.zarr`); `coverage` (campaign-wide) =
  fraction of ok images' pixels that are not ignore.

Agreement of Stage 1.1 and Stage 1.2 (the label-noise proxy). Two more maps per image are painted with the merge
rule (increasing `score`, the highest score wins an overlap, ignore where uncovered) from *every* mask of one
stage (not only the 75 % selection, a random draw): L11 from the 1.1 masks, L12 from the 1.2 masks. Per class k,
every figure accumulated over the campaign (sums of intersections over sums of unions):
- `agreement` (the headline number): IoU of {label map = k} and {L12 = k} over the pixels both label. The label
  map holds all 1.1 masks and 3/4 of the 1.2 masks, so it differs from L12 exactly where a 1.1 mask (or, where
  L12's own mask was not drawn, a lower mask) overrules 1.2's label: the Stage 1.1/1.2 conflicts that *reached
  the pseudo-labels*. Conflicts the merge settles in 1.2's favour (its mask scores higher) do not count.
- `agreement_11_12`: IoU of {L11 = k} and {L12 = k} over the pixels both label: every conflict of the stages,
  whoever wins it.
- `mask_iou`: IoU of the 1.1 mask of class k with the union of the image's 1.2 masks of class k (all of them,
  overlaps included). It also drops when the stages agree on labels but cover different pixels (1.1 prompts reach
  only the instances its points hit), so it mixes coverage with label noise.
- `label_differ`: of the 1.1 mask's pixels that some 1.2 mask covers, the fraction whose L12 label is not k;
  `uncovered_12`: the fraction of the 1.1 mask's pixels no 1.2 mask covers; `confused_with`: the class L12 gives
  most often to the 1.1 mask's pixels when it is not k, and `confused_fraction` its share.
Errors both stages make alike (a class not detected, so 1.2 too must pick another; CLIP seeing a whole region as
the wrong class) are invisible to every one of these. scripts/validate_stats_proxy.py measures how well each ranks
classes by their true pseudo-label IoU on a synthetic world with confusable classes (README, "Label quality
without ground truth").

Outputs (`write_stats`): `stats.json` (machine-readable), `stats.md` (tables), `scores_<n>.png` (score
histograms per class), `sam_scores_<n>.png`, `agreement.png` (per-class bars).
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from storage.reader import CampaignReader
from storage.tables import decode_rle

IGNORE = 65535
STAGES = ("1.1", "1.2")
# Fine fixed bins, so histograms of shards add up exactly; plots merge them to what the data spans.
SCORE_RANGE, SCORE_BINS = (-1.0, 1.0), 400
SAM_RANGE, SAM_BINS = (0.0, 1.0), 200
# Medians are exact up to this many masks per (stage, class); beyond it, from a log-spaced histogram (< 1 %).
EXACT_MEDIAN_LIMIT = 20_000
_LOG_LO, _LOG_HI, _LOG_BINS = -9.0, 0.0, 2700  # area fractions 1e-9 .. 1, 1/300 decade per bin
MASK_COLUMNS = ["image_id", "mask_id", "stage", "class_id", "score", "sam_score", "area", "height", "width", "rle",
                "selected"]
CLASSES_PER_FIGURE = 30


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks, ties given their average rank (scipy's definition).
    nan when fewer than 2 pairs or a constant input."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    ra, rb = average_ranks(a), average_ranks(b)
    if a.size < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.arange(1, x.size + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


class _Median:
    """Streaming median of positive values: exact while at most `limit` values came, then from a log histogram."""

    def __init__(self, limit: int = EXACT_MEDIAN_LIMIT):
        self.limit = limit
        self.values: list[np.ndarray] = []
        self.n = 0
        self.hist: np.ndarray | None = None

    def add(self, v: np.ndarray) -> None:
        v = np.asarray(v, np.float64)
        self.n += v.size
        if self.hist is None:
            self.values.append(v)
            if self.n > self.limit:
                self.hist = np.zeros(_LOG_BINS, np.int64)
                self._fold(np.concatenate(self.values))
                self.values = []
        else:
            self._fold(v)

    def _fold(self, v: np.ndarray) -> None:
        pos = (np.log10(np.clip(v, 10**_LOG_LO, 10**_LOG_HI)) - _LOG_LO) / (_LOG_HI - _LOG_LO) * _LOG_BINS
        self.hist += np.bincount(np.clip(pos.astype(np.int64), 0, _LOG_BINS - 1), minlength=_LOG_BINS)

    def median(self) -> float | None:
        if self.n == 0:
            return None
        if self.hist is None:
            return float(np.median(np.concatenate(self.values)))
        # The bin holding the middle value, then linear interpolation in log space within it.
        half = self.n / 2.0
        cum = np.cumsum(self.hist)
        i = int(np.searchsorted(cum, half))
        below = cum[i - 1] if i else 0
        t = (half - below) / self.hist[i]
        width = (_LOG_HI - _LOG_LO) / _LOG_BINS
        return float(10 ** (_LOG_LO + (i + t) * width))


def _hist_index(values: np.ndarray, rng: tuple[float, float], bins: int) -> np.ndarray:
    lo, hi = rng
    return np.clip(np.floor((values - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)


def _paint(rows: list[dict], stage: str, h: int, w: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """The merge rule on one stage's masks (every mask, selected or not) -> (label (h, w) uint16, [(class, rle)]).

    Increasing score, stable on mask_id: on equal scores the later mask wins, as `fmbseg.stage1.merge_label_map`."""
    label = np.full((h, w), IGNORE, np.uint16)
    mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: (r["score"], r["mask_id"]))
    for r in mine:
        label[_decode(r)] = r["class_id"]
    return label, mine


def _decode(r: dict) -> np.ndarray:
    return decode_rle(r["rle"], int(r["height"]), int(r["width"]))


@dataclass
class _Acc:
    """Campaign-wide accumulators (all small: O(K^2) counts and per-class histograms)."""

    K: int
    images: int = 0
    ok: int = 0
    failed: int = 0
    no_detection: int = 0
    pixels: int = 0
    labelled: int = 0
    shards: list[int] = field(default_factory=list)

    def __post_init__(self):
        K = self.K
        self.images_detected = np.zeros(K, np.int64)
        self.masks = {s: np.zeros(K, np.int64) for s in STAGES}
        self.selected = {s: np.zeros(K, np.int64) for s in STAGES}
        self.area_sum = {s: np.zeros(K, np.float64) for s in STAGES}
        self.frac_sum = {s: np.zeros(K, np.float64) for s in STAGES}
        self.area_median = {s: [_Median() for _ in range(K)] for s in STAGES}
        self.frac_median = {s: [_Median() for _ in range(K)] for s in STAGES}
        self.score_hist = {s: np.zeros((K, SCORE_BINS), np.int64) for s in STAGES}
        self.sam_hist = {s: np.zeros((K, SAM_BINS), np.int64) for s in STAGES}
        self.label_pixels = np.zeros(K, np.int64)
        self.inter = np.zeros(K, np.int64)  # |M11_k & U12_k|
        self.union = np.zeros(K, np.int64)  # |M11_k | U12_k|
        self.r11 = np.zeros((K, K + 1), np.int64)  # pixels of the 1.1 mask of k by their L12 label (K = ignore)
        self.cross = np.zeros((K + 1, K + 1), np.int64)  # pixels by (L11 label, L12 label), K = ignore
        self.merged12 = np.zeros((K + 1, K + 1), np.int64)  # pixels by (merged label, L12 label), K = ignore


def _add_rows(acc: _Acc, cols: dict[str, list]) -> None:
    """Per-mask figures of one shard's rows (vectorised over the shard)."""
    if not cols["stage"]:
        return
    stage = np.asarray(cols["stage"])
    cls = np.asarray(cols["class_id"], np.int64)
    area = np.asarray(cols["area"], np.float64)
    frac = area / (np.asarray(cols["height"], np.float64) * np.asarray(cols["width"], np.float64))
    score = np.asarray(cols["score"], np.float64)
    sam = np.asarray(cols["sam_score"], np.float64)
    sel = np.asarray(cols["selected"], bool)
    K = acc.K
    for s in STAGES:
        m = stage == s
        c = cls[m]
        acc.masks[s] += np.bincount(c, minlength=K)
        acc.selected[s] += np.bincount(c[sel[m]], minlength=K)
        acc.area_sum[s] += np.bincount(c, weights=area[m], minlength=K)
        acc.frac_sum[s] += np.bincount(c, weights=frac[m], minlength=K)
        np.add.at(acc.score_hist[s], (c, _hist_index(score[m], SCORE_RANGE, SCORE_BINS)), 1)
        np.add.at(acc.sam_hist[s], (c, _hist_index(sam[m], SAM_RANGE, SAM_BINS)), 1)
        for k in np.unique(c):
            acc.area_median[s][k].add(area[m][c == k])
            acc.frac_median[s][k].add(frac[m][c == k])


def _add_image(acc: _Acc, rows: list[dict], h: int, w: int, label: np.ndarray) -> None:
    """Agreement and coverage figures of one ok image: its mask rows, size, merged label map (h, w) uint16."""
    K = acc.K
    acc.pixels += h * w
    lab = label[label != IGNORE].astype(np.int64)
    acc.labelled += lab.size
    acc.label_pixels += np.bincount(lab, minlength=K)[:K]
    if not any(r["stage"] == "1.1" for r in rows):
        acc.no_detection += 1
    merged_idx = np.where(label == IGNORE, K, label).astype(np.int64)
    if not rows:
        acc.cross[K, K] += h * w
        acc.merged12[:, K] += np.bincount(merged_idx.ravel(), minlength=K + 1)
        return
    l12, rows12 = _paint(rows, "1.2", h, w)
    l12_idx = np.where(l12 == IGNORE, K, l12).astype(np.int64)
    # Union of the 1.2 masks per class, as RLEs (exact, no dense map per class).
    by_class12: dict[int, list] = {}
    for r in rows12:
        by_class12.setdefault(int(r["class_id"]), []).append(
            {"size": [int(r["height"]), int(r["width"])], "counts": r["rle"]})
    union12 = {k: mask_utils.merge(v, intersect=False) if len(v) > 1 else v[0] for k, v in by_class12.items()}
    l11 = np.full((h, w), IGNORE, np.uint16)
    seen11: set[int] = set()
    for r in sorted((r for r in rows if r["stage"] == "1.1"), key=lambda r: (r["score"], r["mask_id"])):
        k = int(r["class_id"])
        m = _decode(r)
        l11[m] = k
        acc.r11[k] += np.bincount(l12_idx[m], minlength=K + 1)
        rle = {"size": [h, w], "counts": r["rle"]}
        a11 = int(r["area"])
        if k in union12:
            inter = int(mask_utils.area(mask_utils.merge([rle, union12[k]], intersect=True)))
            a12 = int(mask_utils.area(union12[k])) if k not in seen11 else 0
        else:
            inter, a12 = 0, 0
        acc.inter[k] += inter
        acc.union[k] += a11 + a12 - inter
        seen11.add(k)
    for k, u in union12.items():
        if k not in seen11:  # 1.2 masks of a class with no 1.1 mask in this image (cannot happen in fmbseg runs)
            acc.union[k] += int(mask_utils.area(u))
    l11_idx = np.where(l11 == IGNORE, K, l11).astype(np.int64)
    acc.cross += np.bincount((l11_idx * (K + 1) + l12_idx).ravel(), minlength=(K + 1) ** 2).reshape(K + 1, K + 1)
    acc.merged12 += np.bincount((merged_idx * (K + 1) + l12_idx).ravel(),
                                minlength=(K + 1) ** 2).reshape(K + 1, K + 1)
    for k in seen11:
        acc.images_detected[k] += 1


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def compute_stats(campaign: str, shards: list[int] | None = None) -> dict[str, Any]:
    """Stream over the committed shards (default: all) and return the stats dict that `stats.json` holds."""
    t0 = time.perf_counter()
    reader = CampaignReader(campaign)
    names = reader.vocabulary
    K = len(names)
    acc = _Acc(K)
    done = sorted(reader.done()) if shards is None else sorted(shards)
    for sid in done:
        acc.shards.append(sid)
        images = reader.images([sid]).to_pydict()
        acc.images += len(images["image_id"])
        acc.ok += images["status"].count("ok")
        acc.failed += images["status"].count("failed")
        masks = reader.masks([sid], columns=MASK_COLUMNS).to_pydict()
        _add_rows(acc, masks)
        by_image: dict[str, list[dict]] = {}
        for i, image_id in enumerate(masks["image_id"]):
            by_image.setdefault(image_id, []).append({c: masks[c][i] for c in MASK_COLUMNS})
        group = reader.labels(sid)
        for i, image_id in enumerate(group.image_ids):
            label = group.label(i)
            h, w = label.shape
            _add_image(acc, by_image.get(image_id, []), h, w, label)
    return _summarise(acc, names, campaign, reader, time.perf_counter() - t0)


def _summarise(acc: _Acc, names: list[str], campaign: str, reader: CampaignReader, seconds: float) -> dict:
    K = acc.K
    both = acc.cross[:K, :K]  # pixels both stages label
    a11, a12, kk = both.sum(1), both.sum(0), np.diag(both)
    mboth = acc.merged12[:K, :K]  # pixels both the label map and the 1.2 map label
    am, am12, mkk = mboth.sum(1), mboth.sum(0), np.diag(mboth)
    classes = []
    for k, name in enumerate(names):
        row12 = acc.r11[k, :K]
        covered = int(row12.sum())
        others = row12.copy()
        others[k] = 0
        j = int(others.argmax())
        c: dict[str, Any] = {
            "class_id": k,
            "name": name,
            "images_detected": int(acc.images_detected[k]),
            "label_pixels": int(acc.label_pixels[k]),
            "agreement": _ratio(mkk[k], am[k] + am12[k] - mkk[k]),
            "agreement_11_12": _ratio(kk[k], a11[k] + a12[k] - kk[k]),
            "mask_iou": _ratio(acc.inter[k], acc.union[k]),
            "label_differ": _ratio(covered - row12[k], covered),
            "uncovered_12": _ratio(acc.r11[k, K], acc.r11[k].sum()),
            "confused_with": names[j] if others[j] else None,
            "confused_fraction": _ratio(others[j], covered) if others[j] else None,
        }
        for s, tag in (("1.1", "11"), ("1.2", "12")):
            n = int(acc.masks[s][k])
            c[f"masks_{tag}"] = n
            c[f"selected_{tag}"] = int(acc.selected[s][k])
            c[f"area_mean_{tag}"] = _ratio(acc.area_sum[s][k], n)
            c[f"area_median_{tag}"] = acc.area_median[s][k].median()
            c[f"area_frac_mean_{tag}"] = _ratio(acc.frac_sum[s][k], n)
            c[f"area_frac_median_{tag}"] = acc.frac_median[s][k].median()
            c[f"score_hist_{tag}"] = _sparse(acc.score_hist[s][k])
            c[f"sam_score_hist_{tag}"] = _sparse(acc.sam_hist[s][k])
        classes.append(c)
    return {
        "campaign": campaign,
        "stage1_hash": reader.stage1_hash,
        "vocabulary": names,
        "shards": acc.shards,
        "images": acc.images,
        "images_ok": acc.ok,
        "images_failed": acc.failed,
        "images_no_detection": acc.no_detection,
        "pixels": acc.pixels,
        "labelled_pixels": acc.labelled,
        "coverage": _ratio(acc.labelled, acc.pixels),
        "never_detected": [n for k, n in enumerate(names) if acc.images_detected[k] == 0],
        "agreement_pixels": int(mboth.sum()),
        "overall_agreement": _ratio(int(mkk.sum()), int(mboth.sum())),
        "overall_agreement_11_12": _ratio(int(kk.sum()), int(both.sum())),
        "histograms": {"score": {"range": list(SCORE_RANGE), "bins": SCORE_BINS},
                       "sam_score": {"range": list(SAM_RANGE), "bins": SAM_BINS},
                       "encoding": "per class: {first: index of the first non-empty bin, counts: [...]}; "
                                   "values outside the range count in the end bins"},
        "classes": classes,
        "seconds": round(seconds, 3),
    }


def _sparse(h: np.ndarray) -> dict:
    nz = np.flatnonzero(h)
    if not nz.size:
        return {"first": 0, "counts": []}
    return {"first": int(nz[0]), "counts": h[nz[0]: nz[-1] + 1].tolist()}


def dense_hist(sparse: dict, bins: int) -> np.ndarray:
    """A stats.json histogram back to its full (bins,) counts."""
    out = np.zeros(bins, np.int64)
    out[sparse["first"]: sparse["first"] + len(sparse["counts"])] = sparse["counts"]
    return out


def _fmt(v: Any, pct: bool = False, px: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if pct:
        return f"{100 * v:.1f}"
    if px:
        return f"{v:.0f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def stats_markdown(stats: dict) -> str:
    """The readable report (`stats.md`)."""
    cov = stats["coverage"]
    lines = [
        f"# Label quality of {stats['campaign']}",
        "",
        f"{stats['images']} images in {len(stats['shards'])} committed shards: {stats['images_ok']} ok, "
        f"{stats['images_failed']} failed, {stats['images_no_detection']} ok images with no detected class.",
        f"Coverage (pixels of ok images that are not ignore in the label maps): **{_fmt(cov, True)} %**. "
        f"Agreement of the label maps with the Stage-1.2 map over pixels both label: "
        f"**{_fmt(stats['overall_agreement'], True)} %** (Stage 1.1 map vs 1.2 map: "
        f"{_fmt(stats['overall_agreement_11_12'], True)} %).",
        "",
        "Never detected: " + (", ".join(stats["never_detected"]) if stats["never_detected"] else "none") + ".",
        "",
        "## Agreement of Stage 1.1 and Stage 1.2 (label-noise proxy), worst first",
        "",
        "agreement = IoU of {label map says k} and {1.2 masks say k} over pixels both label (the 1.1/1.2 "
        "conflicts that reached the labels); 1.1 vs 1.2 = the same between the 1.1 masks' map and the 1.2 masks' "
        "map (every conflict); mask IoU = IoU of the 1.1 mask with the union of the same-class 1.2 masks; differ = "
        "share of 1.1 pixels covered by 1.2 that 1.2 labels otherwise; uncovered = share of 1.1 pixels no 1.2 "
        "mask covers. All in %; low values flag noisy classes.",
        "",
        "| class | images | agreement | 1.1 vs 1.2 | mask IoU | differ | uncovered | most confused with |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    detected = [c for c in stats["classes"] if c["images_detected"] or c["masks_12"]]
    key = lambda c: (c["agreement"] if c["agreement"] is not None else 2.0, c["name"])  # noqa: E731
    for c in sorted(detected, key=key):
        conf = f"{c['confused_with']} ({_fmt(c['confused_fraction'], True)} %)" if c["confused_with"] else ""
        lines.append(f"| {c['name']} | {c['images_detected']} | {_fmt(c['agreement'], True)} | "
                     f"{_fmt(c['agreement_11_12'], True)} | {_fmt(c['mask_iou'], True)} | {_fmt(c['label_differ'], True)} | "
                     f"{_fmt(c['uncovered_12'], True)} | {conf} |")
    lines += [
        "",
        "## Masks per class",
        "",
        "Areas: mean / median in pixels and as % of the image. Label share: % of all labelled pixels.",
        "",
        "| class | images | 1.1 masks | 1.2 masks (selected) | 1.1 area px | 1.1 area % | 1.2 area px | 1.2 area % "
        "| label share % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labelled = stats["labelled_pixels"]
    for c in stats["classes"]:
        lines.append(
            f"| {c['name']} | {c['images_detected']} | {c['masks_11']} | {c['masks_12']} ({c['selected_12']}) | "
            f"{_fmt(c['area_mean_11'], px=True)} / {_fmt(c['area_median_11'], px=True)} | "
            f"{_fmt(c['area_frac_mean_11'], True)} / {_fmt(c['area_frac_median_11'], True)} | "
            f"{_fmt(c['area_mean_12'], px=True)} / {_fmt(c['area_median_12'], px=True)} | "
            f"{_fmt(c['area_frac_mean_12'], True)} / {_fmt(c['area_frac_median_12'], True)} | "
            f"{_fmt(_ratio(c['label_pixels'], labelled), True)} |")
    lines += ["", "Plots: `agreement.png`, `scores_*.png` (score), `sam_scores_*.png` (sam_score).", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def agreement_chart(stats: dict) -> bytes:
    """Horizontal bars per class (agreement, 1.1 vs 1.2, mask IoU), worst agreement at the top; legend above the
    axes, so it never covers a bar."""
    plt = _pyplot()
    rows = [c for c in stats["classes"] if c["agreement"] is not None or c["mask_iou"] is not None]
    rows.sort(key=lambda c: (c["agreement"] if c["agreement"] is not None else 2.0, c["name"]), reverse=True)
    n = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.4 * n))
    y = np.arange(len(rows))
    val = lambda c, k: 100 * c[k] if c[k] is not None else 0.0  # noqa: E731
    for off, key, colour, name in ((0.27, "agreement", "#1f77b4", "agreement (label map vs 1.2)"),
                                   (0.0, "agreement_11_12", "#2ca02c", "1.1 map vs 1.2 map"),
                                   (-0.27, "mask_iou", "#ff7f0e", "mask IoU (1.1 mask vs 1.2 union)")):
        ax.barh(y + off, [val(c, key) for c in rows], height=0.27, color=colour, label=name)
        for yi, c in zip(y, rows):
            if c[key] is None:  # no pixel to compare: say so rather than draw an empty bar that reads as 0 %
                ax.text(1, yi + off, "n/a", va="center", fontsize=7, color=colour)
    ax.set_yticks(y, [c["name"] for c in rows])
    ax.set_xlim(0, 100)
    ax.set_xlabel("% (Stage 1.1 vs Stage 1.2)")
    ax.set_ylim(-0.6, len(rows) - 0.4)
    # Above the axes, outside the bars' area.
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def score_histograms(stats: dict, which: str = "score") -> list[bytes]:
    """Small multiples of one histogram per class (1.1 and 1.2 overlaid), `CLASSES_PER_FIGURE` classes a figure."""
    plt = _pyplot()
    meta = stats["histograms"][which]
    lo, hi = meta["range"]
    bins = meta["bins"]
    edges = np.linspace(lo, hi, bins + 1)
    key = "score_hist" if which == "score" else "sam_score_hist"
    rows = [c for c in stats["classes"] if c["masks_11"] or c["masks_12"]]
    figures = []
    for start in range(0, max(len(rows), 1), CLASSES_PER_FIGURE):
        page = rows[start: start + CLASSES_PER_FIGURE]
        cols = min(5, max(len(page), 1))
        nrows = max(1, math.ceil(len(page) / cols))
        fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.2 * nrows + 0.8), squeeze=False,
                                 layout="constrained")
        for ax in axes.flat[len(page):]:
            ax.axis("off")
        for ax, c in zip(axes.flat, page):
            h11 = dense_hist(c[f"{key}_11"], bins)
            h12 = dense_hist(c[f"{key}_12"], bins)
            nz = np.flatnonzero(h11 + h12)
            # Merge the fine bins to about 30 over the span the data covers.
            a, b = nz[0], nz[-1] + 1
            if b - a < 20:  # a near-constant score (e.g. one predicted IoU) still gets a readable axis
                a = max(0, min(a - (20 - (b - a)) // 2, bins - 20))
                b = a + 20
            step = max(1, math.ceil((b - a) / 30))
            b = a + step * math.ceil((b - a) / step)
            pad = np.zeros(max(0, b - bins), np.int64)
            e = np.append(edges, edges[-1] + np.arange(1, pad.size + 1) * (edges[1] - edges[0]))[a: b + 1: step]
            for h, colour, name in ((h11, "#1f77b4", "1.1"), (h12, "#ff7f0e", "1.2")):
                counts = np.append(h, pad)[a:b].reshape(-1, step).sum(1)
                ax.stairs(counts, e, fill=True, alpha=0.5, color=colour, label=name)
            ax.set_title(f"{c['name']} ({c['masks_11']} / {c['masks_12']})", fontsize=9)
            ax.tick_params(labelsize=7)
        handles, _ = axes.flat[0].get_legend_handles_labels()
        # "outside": constrained layout reserves a band above the subplots, so the legend covers no bars.
        fig.legend(handles, ["Stage 1.1", "Stage 1.2"], loc="outside upper center", ncol=2, frameon=False,
                   title=f"{which} per class; panel titles: class (1.1 masks / 1.2 masks)")
        figures.append(_png(fig))
    return figures


def write_stats(stats: dict, out: str) -> list[str]:
    """Write stats.json, stats.md and the PNGs under `out` (local path or fsspec URL); returns the paths."""
    from storage.fs import write_file

    join = posixpath.join if "://" in out else os.path.join
    files = {"stats.json": (json.dumps(stats, indent=1, sort_keys=True, allow_nan=False) + "\n").encode(),
             "stats.md": stats_markdown(stats).encode()}
    files["agreement.png"] = agreement_chart(stats)
    for which, stem in (("score", "scores"), ("sam_score", "sam_scores")):
        for i, png in enumerate(score_histograms(stats, which), 1):
            files[f"{stem}_{i}.png"] = png
    paths = []
    for name, data in files.items():
        path = join(out, name)
        write_file(path, data)
        paths.append(path)
    return paths


def campaign_stats(campaign: str, out: str, shards: list[int] | None = None) -> dict:
    """`fmbseg stats`: compute the campaign's label-quality figures and write them under `out`. Returns a small
    summary (what a flow passes on): coverage, agreement, classes never detected, worst classes, written files."""
    stats = compute_stats(campaign, shards)
    paths = write_stats(stats, out)
    ranked = sorted((c for c in stats["classes"] if c["agreement"] is not None), key=lambda c: c["agreement"])
    return {
        "campaign": campaign,
        "out": out,
        "images": stats["images"],
        "images_ok": stats["images_ok"],
        "coverage": stats["coverage"],
        "overall_agreement": stats["overall_agreement"],
        "never_detected": stats["never_detected"],
        "lowest_agreement": [(c["name"], round(c["agreement"], 4)) for c in ranked[:5]],
        "files": paths,
    }
