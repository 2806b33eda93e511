"""`fmbseg stats` (stages/stats.py): every figure against a hand-built campaign written through the real storage
writers, the streaming median, Spearman against hand-computed ranks, and the CLI's files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmbseg.stage1 import Stage1Mask, merge_label_map
from stages.stats import SCORE_BINS, SCORE_RANGE, _Median, compute_stats, dense_hist, spearman
from storage.campaign import CampaignManifest, write_manifest
from storage.fs import CampaignRoot
from storage.labels import PackedLabels
from storage.planning import ImageEntry, append_shards
from storage.shard_writer import commit_shard
from storage.tables import encode_masks, images_table, masks_table

VOCAB = ["a", "b", "c"]
COLUMNS = ["image_id", "mask_id", "stage", "class_id", "class_name", "score", "sam_score", "area", "bbox", "height",
           "width", "rle", "selected"]


def box(h, w, rows, cols):
    m = np.zeros((h, w), bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


# im0 (4 x 6): (stage, class, score, rows, cols, selected). Scores are exact in float32 and in the 400 bins.
IM0 = [
    ("1.1", 0, 0.9375, (0, 2), (0, 4), True),   # a: rows 0-1, cols 0-3 (8 px)
    ("1.1", 1, 0.8125, (2, 4), (0, 6), True),   # b: rows 2-3 (12 px)
    ("1.2", 0, 0.6875, (0, 2), (0, 2), True),   # a: 4 px inside the 1.1 a mask
    ("1.2", 1, 0.5625, (0, 4), (2, 4), False),  # b: cols 2-3 (8 px), not in the 75 % draw
    ("1.2", 1, 0.4375, (2, 4), (4, 6), True),   # b: 4 px inside the 1.1 b mask
    ("1.2", 0, 0.875, (2, 4), (0, 2), True),    # a: 4 px inside the 1.1 b mask, outscoring it in the merge
]


def write_hand_campaign(url) -> CampaignRoot:
    """Three images in one shard: im0 with the masks above, im1 (2 x 2) with none, im2 failed."""
    root = CampaignRoot(url)
    m = CampaignManifest(stage1={"a": 1}, vocabulary={"names": VOCAB, "synonyms": [[], [], []]}, preset="oracle",
                         models={}, seed=0, code_version="t")
    write_manifest(root, m)
    entries = [ImageEntry(f"im{i}.png", f"/in/im{i}.png") for i in range(3)]
    (sid,), _ = append_shards(root, entries, 3)
    masks = np.stack([box(4, 6, r, c) for _, _, _, r, c, _ in IM0])
    enc = encode_masks(masks)
    cols = {k: [] for k in COLUMNS}
    for j, (stage, k, score, _, _, sel) in enumerate(IM0):
        for key, v in dict(image_id="im0.png", mask_id=j, stage=stage, class_id=k, class_name=VOCAB[k], score=score,
                           sam_score=0.9 if stage == "1.1" else 0.95, area=enc.area[j], bbox=enc.bbox[j], height=4,
                           width=6, rle=enc.counts[j], selected=sel).items():
            cols[key].append(v)
    label0 = merge_label_map([Stage1Mask(s, k, sc, 0.9, masks[j]) for j, (s, k, sc, _, _, _) in enumerate(IM0)],
                             [sel for *_, sel in IM0], 4, 6)
    packed = PackedLabels()
    packed.add("im0.png", label0)
    packed.add("im1.png", np.full((2, 2), 65535, np.uint16))
    rows = [{"image_id": "im0.png", "path": "/in/im0.png", "status": "ok", "height": 4, "width": 6, "n_masks": 6},
            {"image_id": "im1.png", "path": "/in/im1.png", "status": "ok", "height": 2, "width": 2, "n_masks": 0},
            {"image_id": "im2.png", "path": "/in/im2.png", "status": "failed", "error": "truncated: x", "n_masks": 0}]
    commit_shard(root, sid, m.stage1_hash(), images_table(rows, VOCAB), masks_table(cols, VOCAB), packed,
                 failure_reasons={"truncated": 1}, seconds=0.1, code_version="t")
    return root


@pytest.fixture
def hand_campaign(tmp_path):
    return write_hand_campaign(tmp_path / "camp")


def test_hand_campaign_figures(hand_campaign):
    s = compute_stats(hand_campaign.url)
    a, b, c = s["classes"]
    assert (s["images"], s["images_ok"], s["images_failed"], s["images_no_detection"]) == (3, 2, 1, 1)
    # merged map of im0: rows 0-1 cols 0-3 a, rows 2-3 b, rows 0-1 cols 4-5 ignore; im1 all ignore
    # maps of im0 (rows 0-1 / rows 2-3; "." = ignore):
    #   label map (selected masks, increasing score): a a a a . . / a a b b b b
    #   1.1 map (every 1.1 mask):                     a a a a . . / b b b b b b
    #   1.2 map (every 1.2 mask):                     a a b b . . / a a b b b b
    # im1 (2 x 2) is all ignore
    assert (s["pixels"], s["labelled_pixels"]) == (28, 20) and s["coverage"] == pytest.approx(20 / 28)
    assert (a["label_pixels"], b["label_pixels"], c["label_pixels"]) == (12, 8, 0)
    assert s["never_detected"] == ["c"]
    assert [x["images_detected"] for x in (a, b, c)] == [1, 1, 0]
    assert [(x["masks_11"], x["masks_12"], x["selected_12"]) for x in (a, b, c)] == [(1, 2, 2), (1, 2, 1), (0, 0, 0)]
    assert (a["area_mean_11"], a["area_median_11"], a["area_frac_mean_11"]) == (8, 8, pytest.approx(8 / 24))
    assert (a["area_mean_12"], b["area_mean_12"], b["area_median_12"]) == (4, 6, 6)
    assert b["area_frac_mean_12"] == pytest.approx(0.25) and b["area_frac_median_12"] == pytest.approx(0.25)
    assert c["area_mean_11"] is None and c["area_median_12"] is None
    # a: 1.1 mask 8 px; 1.2 union 8 px (cols 0-1), 4 in common -> mask IoU 4 / 12; half its pixels are b in 1.2
    assert a["mask_iou"] == pytest.approx(1 / 3)
    assert (a["label_differ"], a["uncovered_12"]) == (pytest.approx(0.5), 0.0)
    assert (a["confused_with"], a["confused_fraction"]) == ("b", pytest.approx(0.5))
    # b: 1.1 mask 12 px; 1.2 union 12 px (cols 2-3 + rows 2-3 cols 4-5), 8 in common -> 8 / 16; 4 of 12 are a
    assert b["mask_iou"] == pytest.approx(0.5)
    assert (b["label_differ"], b["uncovered_12"]) == (pytest.approx(1 / 3), 0.0)
    assert (b["confused_with"], b["confused_fraction"]) == ("a", pytest.approx(1 / 3))
    # label map vs 1.2 map, over the 20 pixels both label: a 8 / (12 + 8 - 8), b 8 / (8 + 12 - 8)
    assert a["agreement"] == pytest.approx(2 / 3) and b["agreement"] == pytest.approx(2 / 3)
    assert s["agreement_pixels"] == 20 and s["overall_agreement"] == pytest.approx(16 / 20)
    # 1.1 map vs 1.2 map: a 4 / (8 + 8 - 4), b 8 / (12 + 12 - 8)
    assert a["agreement_11_12"] == pytest.approx(1 / 3) and b["agreement_11_12"] == pytest.approx(0.5)
    assert s["overall_agreement_11_12"] == pytest.approx(12 / 20)
    assert c["agreement"] is None and c["mask_iou"] is None and c["label_differ"] is None
    # histograms: one count per mask in the bin of its score
    h = dense_hist(b["score_hist_12"], SCORE_BINS)
    # bins of width 2/400 from -1: 0.4375 -> bin 287 ([0.435, 0.44)), 0.5625 -> bin 312 ([0.56, 0.565))
    assert np.flatnonzero(h).tolist() == [287, 312] and h.sum() == 2 and SCORE_RANGE == (-1.0, 1.0)
    assert dense_hist(a["sam_score_hist_11"], 200).sum() == 1 and c["score_hist_11"] == {"first": 0, "counts": []}
    json.dumps(s, allow_nan=False)  # what stats.json holds is plain JSON


def test_stats_skip_uncommitted_shards(hand_campaign):
    from storage.markers import remove_done

    remove_done(hand_campaign, 0)
    s = compute_stats(hand_campaign.url)
    assert (s["images"], s["shards"], s["coverage"], s["never_detected"]) == (0, [], None, VOCAB)


def test_median_is_exact_then_within_one_percent():
    m = _Median(limit=50)
    small = np.array([3.0, 1.0, 2.0, 10.0])
    m.add(small)
    assert m.median() == 2.5
    rng = np.random.default_rng(0)
    values = 10 ** rng.uniform(-6, 0, 5000)
    big = _Median(limit=50)
    for chunk in np.array_split(values, 7):
        big.add(chunk)
    assert big.hist is not None and big.values == []  # switched to the histogram
    assert big.median() == pytest.approx(np.median(values), rel=0.01)
    assert _Median().median() is None


def test_spearman_against_hand_ranks():
    # b's ranks with ties: [1, 2, 3.5, 5, 3.5]; r = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / np.sqrt(95))
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2, 3], [4, 4, 4]))


def test_cli_writes_report(hand_campaign, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "report"
    assert main(["stats", "--campaign", hand_campaign.url, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "coverage 71.4 %" in printed and "never detected: c" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["agreement.png", "sam_scores_1.png", "scores_1.png", "stats.json", "stats.md"]
    for png in ("agreement.png", "scores_1.png", "sam_scores_1.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "stats.json").read_text())
    assert s["classes"][0]["agreement"] == pytest.approx(2 / 3) and s["vocabulary"] == VOCAB
    md = (out / "stats.md").read_text()
    assert "| a | 1 | 66.7 | 33.3 | 33.3 | 50.0 | 0.0 | b (50.0 %) |" in md and "Never detected: c." in md
    assert main(["stats", "--campaign", str(tmp_path / "missing"), "--out", str(out)]) == 2
