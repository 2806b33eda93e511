"""Per-image Stage 1 (DESIGN §1): config, the seeded selection rule, painting order, and the planted-signal check
on the synthetic world with the oracle models (merged / 1.1 / 1.2 mIoU on the pixels each map covers)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fmbseg import IGNORE_LABEL
from fmbseg.stage1 import (Stage1Config, Stage1Mask, merge_label_map, run_stage1, select_masks,
                           selection_rng)
from fmbseg.testing.oracle import build_oracle_clip, build_oracle_sam
from fmbseg.testing.palette import NUM_COLOURS, PALETTE_NAMES
from fmbseg.testing.world import DEFAULT_SIZES, load_annotation, make_world_image, write_world


# ---------------------------------------------------------------------------------------------------- config

def test_config_defaults_and_round_trip():
    c = Stage1Config()
    assert (c.upscale, c.max_side, c.clip_batch_size, c.min_crop_votes, c.points_per_class) == (2.0, 2048, 32, 1, 5)
    assert (c.points_per_side, c.points_per_batch, c.pred_iou_thresh, c.stability_score_thresh) == (32, 64, 0.88, 0.95)
    assert (c.box_nms_thresh, c.min_area_frac, c.max_area_frac, c.stage12_fraction) == (0.7, 0.0005, 0.95, 0.75)
    assert c.templates == ("a photo of a {}.",)
    d = c.to_dict()
    assert d["templates"] == ["a photo of a {}."]
    assert Stage1Config.from_dict(d) == c
    # Partial dicts take defaults; ints given for float fields are canonicalised (same config hash).
    assert Stage1Config.from_dict({"upscale": 2}).to_dict() == d
    am = Stage1Config(points_per_side=8).auto_mask_config()
    assert am.points_per_side == 8 and am.min_area_frac == 0.0005
    with pytest.raises(ValueError, match="unknown Stage-1 config field.*'upscal'"):
        Stage1Config.from_dict({"upscal": 3})
    with pytest.raises(ValueError, match="stage12_fraction"):
        Stage1Config(stage12_fraction=1.5)
    with pytest.raises(ValueError, match="points_per_class"):
        Stage1Config(points_per_class=0)
    with pytest.raises(ValueError, match="template"):
        Stage1Config(templates=("a photo",))
    assert (c.point_outputs, c.stage12_undetected) == ("all4", "paper")
    assert d["point_outputs"] == "all4" and d["stage12_undetected"] == "paper"  # recorded, so hashed
    with pytest.raises(ValueError, match="point_outputs must be one of all4, multimask, single"):
        Stage1Config(point_outputs="best")
    with pytest.raises(ValueError, match="stage12_undetected must be one of paper, drop"):
        Stage1Config(stage12_undetected="ignore")


def test_stored_configs_that_predate_a_field_keep_their_meaning():
    """A campaign.json written before point_outputs / stage12_undetected existed was labelled with the multimask
    outputs and the paper's 1.2 rule: rebuilt from the manifest it stays so, while user overrides get the new
    defaults."""
    from stages.label import stage1_config_from_manifest
    from storage.campaign import CampaignManifest

    old = Stage1Config().to_dict()
    del old["point_outputs"], old["stage12_undetected"]
    stored = Stage1Config.from_stored(old)
    assert (stored.point_outputs, stored.stage12_undetected) == ("multimask", "paper")
    assert Stage1Config.from_dict(old).point_outputs == "all4"
    # A stored value wins over the legacy meaning; from_stored validates like from_dict.
    assert Stage1Config.from_stored({**old, "point_outputs": "single"}).point_outputs == "single"
    with pytest.raises(ValueError, match="unknown Stage-1 config field"):
        Stage1Config.from_stored({"upscal": 3})
    manifest = CampaignManifest(stage1=old, vocabulary={"names": ["a"], "synonyms": [["a"]]}, preset="oracle",
                                models={}, seed=0, code_version="0")
    assert stage1_config_from_manifest(manifest) == stored
    manifest.stage1 = Stage1Config().to_dict()
    assert stage1_config_from_manifest(manifest) == Stage1Config()


def test_config_dense_mode():
    assert Stage1Config().dense_mode == "maskclip"
    assert Stage1Config().to_dict()["dense_mode"] == "maskclip"
    for mode in ("clearclip", "sclip"):
        d = Stage1Config(dense_mode=mode).to_dict()
        assert d["dense_mode"] == mode and Stage1Config.from_dict(d).dense_mode == mode
    assert Stage1Config.from_dict({"dense_mode": "maskclip"}) == Stage1Config()
    with pytest.raises(ValueError, match="dense_mode must be one of maskclip, clearclip, sclip.*'gem'"):
        Stage1Config(dense_mode="gem")


# -------------------------------------------------------------------------------------------- selection rule

def test_selection_rule():
    stages = ["1.1", "1.1"] + ["1.2"] * 10
    for n12 in range(0, 21):
        sel = select_masks(["1.1"] * 3 + ["1.2"] * n12, 0.75, seed=0, image_id="a.jpg")
        assert sel[:3].all()
        assert sel[3:].sum() == int(np.floor(0.75 * n12 + 0.5))  # exactly round(0.75 n), halves up
    a = select_masks(stages, 0.75, seed=3, image_id="dir/img_001.png")
    np.testing.assert_array_equal(a, select_masks(stages, 0.75, seed=3, image_id="dir/img_001.png"))
    others = [select_masks(stages, 0.75, seed=3, image_id=f"dir/img_{i:03d}.png") for i in range(2, 8)]
    assert any((o != a).any() for o in others)  # depends on the image id
    assert any((select_masks(stages, 0.75, seed=s, image_id="dir/img_001.png") != a).any() for s in range(4, 9))
    assert select_masks(stages, 0.0, 0, "x")[2:].sum() == 0 and select_masks(stages, 1.0, 0, "x").all()
    # The generator is seeded by (seed, first 8 bytes of sha256(image_id)): reproducible by hand.
    import hashlib
    key = int.from_bytes(hashlib.sha256(b"x.png").digest()[:8], "big")
    assert selection_rng(5, "x.png").random() == np.random.default_rng([5, key]).random()
    with pytest.raises(ValueError, match="seed"):
        selection_rng(-1, "x")
    with pytest.raises(TypeError, match="image_id"):
        selection_rng(0, 42)


def test_painting_order_hand_made():
    H, W = 4, 6

    def box(y0, y1, x0, x1):
        m = np.zeros((H, W), dtype=bool)
        m[y0:y1, x0:x1] = True
        return m

    masks = [
        Stage1Mask("1.1", 3, score=0.9, sam_score=0.95, mask=box(0, 4, 0, 3)),   # left half, strongest
        Stage1Mask("1.2", 5, score=0.5, sam_score=0.95, mask=box(0, 2, 0, 6)),   # top rows, weakest
        Stage1Mask("1.2", 7, score=0.7, sam_score=0.95, mask=box(1, 3, 2, 5)),   # centre
        Stage1Mask("1.2", 9, score=0.99, sam_score=0.95, mask=box(0, 4, 5, 6)),  # not selected
    ]
    label = merge_label_map(masks, [True, True, True, False], H, W)
    I = IGNORE_LABEL
    expect = np.array([
        [3, 3, 3, 5, 5, 5],
        [3, 3, 3, 7, 7, 5],
        [3, 3, 3, 7, 7, I],
        [3, 3, 3, I, I, I],
    ], dtype=np.uint16)
    np.testing.assert_array_equal(label, expect)
    assert label.dtype == np.uint16
    # Equal scores: the later mask wins.
    tie = [Stage1Mask("1.2", 1, 0.5, 0.9, box(0, 4, 0, 6)), Stage1Mask("1.2", 2, 0.5, 0.9, box(0, 4, 0, 6))]
    assert (merge_label_map(tie, [True, True], H, W) == 2).all()
    with pytest.raises(ValueError, match="one flag per mask"):
        merge_label_map(masks, [True], H, W)


@pytest.mark.parametrize("hw", [(1, 1), (37, 53), (120, 7)])
def test_merge_label_map_equals_painting_in_score_order(hw):
    """Random overlapping masks with tied scores, empty and full masks: the map equals painting each selected mask
    with boolean indexing in stable increasing-score order (the reference implementation)."""
    H, W = hw
    rng = np.random.default_rng(H * W)
    n = 40
    scores = rng.choice([0.1, 0.2, 0.5, 0.7], n)  # many ties
    masks = [Stage1Mask("1.2", int(rng.integers(0, 300)), float(s), 0.9, rng.random((H, W)) < rng.random())
             for s in scores]
    masks[3].mask[:] = False
    masks[5].mask[:] = True
    selected = rng.random(n) < 0.8
    expect = np.full((H, W), IGNORE_LABEL, np.uint16)
    for i in sorted(np.flatnonzero(selected), key=lambda i: masks[i].score):  # sorted() is stable
        expect[masks[i].mask] = masks[i].class_id
    got = merge_label_map(masks, selected, H, W)
    assert got.dtype == np.uint16 and np.array_equal(got, expect)


# ----------------------------------------------------------------------------------- the planted-signal check

class CountingSam:
    """Wraps a SamModel, counting encoder passes and decoder calls and recording the point prompts."""

    def __init__(self, sam):
        self.sam = sam
        self.image_size, self.model_id, self.weights_sha256, self.device = (
            sam.image_size, sam.model_id, sam.weights_sha256, sam.device)
        self.embeds, self.point_calls, self.generates, self.points = 0, 0, 0, []

    def embed(self, image):
        self.embeds += 1
        return self.sam.embed(image)

    def predict_points(self, emb, points, outputs="multimask"):
        self.point_calls += 1
        self.points.append(np.asarray(points))
        return self.sam.predict_points(emb, points, outputs)

    def generate(self, emb, cfg):
        self.generates += 1
        return self.sam.generate(emb, cfg)


class IoU:
    def __init__(self):
        self.inter = np.zeros(NUM_COLOURS)
        self.union = np.zeros(NUM_COLOURS)
        self.covered = 0
        self.total = 0

    def add(self, label: np.ndarray, gt: np.ndarray) -> None:
        cov = label != IGNORE_LABEL
        self.covered += int(cov.sum())
        self.total += cov.size
        p, g = label[cov].astype(np.int64), gt[cov]
        self.inter += np.bincount(g[p == g], minlength=NUM_COLOURS)
        self.union += np.bincount(p, minlength=NUM_COLOURS) + np.bincount(g, minlength=NUM_COLOURS)
        self.union -= np.bincount(g[p == g], minlength=NUM_COLOURS)

    @property
    def miou(self) -> float:
        v = self.union > 0
        return float((self.inter[v] / self.union[v]).mean())

    @property
    def coverage(self) -> float:
        return self.covered / self.total


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = write_world(root, 2 * len(DEFAULT_SIZES), seed=11)  # every size as PNG and as JPEG
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append((p.name, np.asarray(im.convert("RGB")), load_annotation(p)))
    return out


@pytest.fixture(scope="module")
def oracle():
    clip = build_oracle_clip("cpu")
    return clip, build_oracle_sam("cpu"), clip.encode_text(list(PALETTE_NAMES))


def test_stage1_recovers_the_planted_labels(world, oracle):
    clip, sam, text = oracle
    cfg = Stage1Config()
    merged, s11, s12 = IoU(), IoU(), IoU()
    missed, n11, n12, n_sel, seconds = 0, 0, 0, 0, {}
    for image_id, image, gt in world:
        spy = CountingSam(sam)
        r = run_stage1(image, clip, spy, text, cfg, seed=0, image_id=image_id)
        H, W = gt.shape
        assert (r.height, r.width) == (H, W) and r.label.shape == (H, W) and r.label.dtype == np.uint16
        # One SAM encoder pass for both stages, one batched point-prompt call, one automatic generation.
        assert (spy.embeds, spy.point_calls, spy.generates) == (1, 1, 1)
        assert spy.points[0].shape == (len(r.detected), cfg.points_per_class, 2)
        # Every point prompt lands on a pixel of its class: the grid -> original px mapping is right.
        for k, pts in zip(r.detected, spy.points[0]):
            cols, rows = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
            assert (gt[rows, cols] == k).all(), (image_id, PALETTE_NAMES[k], pts)
        m11 = [m for m in r.masks if m.stage == "1.1"]
        m12 = [m for m in r.masks if m.stage == "1.2"]
        assert r.masks == m11 + m12 and [m.class_id for m in m11] == r.detected
        assert all(m.class_id in r.detected and -1 <= m.score <= 1 + 1e-6 for m in r.masks)
        assert all(m.sam_score == pytest.approx(0.95) for m in r.masks)
        assert r.selected[: len(m11)].all() and r.selected[len(m11):].sum() == int(np.floor(0.75 * len(m12) + 0.5))
        np.testing.assert_array_equal(r.label, merge_label_map(r.masks, r.selected, H, W))
        assert set(r.timings) == {"clip", "sam_encoder", "sam_decoder", "labeling"}
        for k, v in r.timings.items():
            seconds[k] = seconds.get(k, 0.0) + v
        missed += len(set(np.unique(gt).tolist()) - set(r.detected))
        n11, n12, n_sel = n11 + len(m11), n12 + len(m12), n_sel + int(r.selected.sum())
        merged.add(r.label, gt)
        s11.add(merge_label_map(m11, np.ones(len(m11), bool), H, W), gt)
        s12.add(merge_label_map(m12, np.ones(len(m12), bool), H, W), gt)

    sizes = sorted({g.shape for _, _, g in world})
    print(f"\nStage 1 on the oracle world: {len(world)} images, sizes {sizes}, PNG+JPEG; "
          f"{n11} 1.1 masks, {n12} 1.2 masks, {n_sel} selected; present classes not detected: {missed}")
    for name, s in (("merged", merged), ("stage 1.1", s11), ("stage 1.2", s12)):
        print(f"  {name:9s} mIoU {100 * s.miou:6.2f}%  on {100 * s.coverage:6.2f}% of the pixels")
    print("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    assert merged.miou >= 0.93 and s12.miou >= 0.90 and s11.miou >= 0.95
    assert merged.coverage > 0.9 and s12.coverage > 0.9 and s11.coverage > 0.5


class ScriptedSam(CountingSam):
    """Oracle SAM whose point outputs are told apart by size (output j of row i keeps j + 1 pixels of the oracle's
    mask) and score `iou_rows[i % len(iou_rows)]` (scores given in all4 order: token 0, tokens 1-3)."""

    def __init__(self, sam, iou_rows):
        super().__init__(sam)
        self.iou_rows, self.asked = np.asarray(iou_rows, dtype=np.float32), []

    def predict_points(self, emb, points, outputs="multimask"):
        self.asked.append(outputs)
        masks, _ = super().predict_points(emb, points, outputs)
        cols = {"all4": [0, 1, 2, 3], "multimask": [1, 2, 3], "single": [0]}[outputs]
        out = np.zeros_like(masks)
        iou = np.zeros(masks.shape[:2], dtype=np.float32)
        for i in range(masks.shape[0]):
            for j in range(masks.shape[1]):
                ys, xs = np.nonzero(masks[i, j])
                out[i, j, ys[: cols[j] + 1], xs[: cols[j] + 1]] = True
            iou[i] = self.iou_rows[i % len(self.iou_rows)][cols]
        return out, iou


@pytest.mark.parametrize("point_outputs", ["all4", "multimask", "single"])
def test_stage11_keeps_the_highest_predicted_iou_among_the_configured_outputs(world, oracle, point_outputs):
    clip, sam, text = oracle
    _, image, _ = world[0]
    rows = [[0.97, 0.90, 0.95, 0.80], [0.50, 0.90, 0.70, 0.90], [0.60, 0.60, 0.60, 0.60]]
    spy = ScriptedSam(sam, rows)
    cfg = Stage1Config(point_outputs=point_outputs, stage12_fraction=0.0)
    r = run_stage1(image, clip, spy, text, cfg, seed=0, image_id="x")
    assert spy.asked == [point_outputs] and spy.point_calls == 1
    m11 = [m for m in r.masks if m.stage == "1.1"]
    assert len(m11) == len(r.detected) >= 3
    # Expected token (first of ties) and its score, worked out by hand from `rows`.
    want = {"all4": [(0, 0.97), (1, 0.90), (0, 0.60)], "multimask": [(2, 0.95), (1, 0.90), (1, 0.60)],
            "single": [(0, 0.97), (0, 0.50), (0, 0.60)]}[point_outputs]
    for i, m in enumerate(m11):
        token, score = want[i % 3]
        assert m.mask.sum() == token + 1 and m.sam_score == pytest.approx(score)


def test_oracle_point_outputs_leave_stage1_unchanged(world, oracle):
    """The SAM-oracle's single-mask output (0.93) never beats its best multimask one (0.95): all4 and multimask
    give the same Stage-1 result, so oracle campaigns keep their outputs under the new default."""
    clip, sam, text = oracle
    _, image, _ = world[0]
    a = run_stage1(image, clip, sam, text, Stage1Config(point_outputs="all4"), seed=0, image_id="i")
    b = run_stage1(image, clip, sam, text, Stage1Config(point_outputs="multimask"), seed=0, image_id="i")
    c = run_stage1(image, clip, sam, text, Stage1Config(point_outputs="single"), seed=0, image_id="i")
    assert np.array_equal(a.label, b.label) and np.array_equal(a.label, c.label)
    assert [(m.class_id, m.score, m.sam_score) for m in a.masks] == [(m.class_id, m.score, m.sam_score) for m in b.masks]
    assert all(m.sam_score == pytest.approx(0.93) for m in c.masks if m.stage == "1.1")


def test_stage12_undetected_drop_on_a_world_with_undetected_classes(world, oracle):
    """`drop` (an A/B option, not the paper's method) discards the 1.2 masks whose best class over the whole
    vocabulary was not detected. In the oracle world a 1.2 mask is one same-colour region, so the class the
    annotation gives it is (up to pooling at the CLIP cell scale) its best class: the dropped masks must be the
    paper-mode masks on classes the crops did not detect, and the kept ones the others, in the same order."""
    clip, sam, text = oracle
    world = world[:4]
    runs = {mode: [] for mode in ("paper", "drop")}
    # min_crop_votes 3: classes covering little of an image win fewer crops and go undetected.
    for mode in runs:
        cfg = Stage1Config(min_crop_votes=3, stage12_undetected=mode)
        runs[mode] = [run_stage1(image, clip, sam, text, cfg, seed=0, image_id=i) for i, image, _ in world]
    stats, n_undetected, dropped, dropped_on_undetected = {}, 0, 0, 0
    for mode, results in runs.items():
        s12, n12 = IoU(), 0
        for r, (_, _, gt) in zip(results, world):
            m12 = [m for m in r.masks if m.stage == "1.2"]
            n12 += len(m12)
            s12.add(merge_label_map(m12, np.ones(len(m12), bool), *gt.shape), gt)
        stats[mode] = (s12.miou, s12.coverage, n12)
    for paper, drop, (_, _, gt) in zip(runs["paper"], runs["drop"], world):
        assert paper.detected == drop.detected
        n_undetected += len(set(np.unique(gt).tolist()) - set(paper.detected))
        p12 = [m for m in paper.masks if m.stage == "1.2"]
        d12 = [m.mask.tobytes() for m in drop.masks if m.stage == "1.2"]
        kept = [m for m in p12 if m.mask.tobytes() in d12]
        assert [m.mask.tobytes() for m in kept] == d12  # a subsequence of the paper-mode masks, same classes
        for m in p12:
            if m.mask.tobytes() not in d12:
                dropped += 1
                dropped_on_undetected += int(np.bincount(gt[m.mask]).argmax() not in paper.detected)
    print(f"\nstage 1.2 on the oracle world, min_crop_votes 3, {n_undetected} present classes undetected; "
          + "; ".join(f"{k}: mIoU {100 * stats[k][0]:.2f}% on {100 * stats[k][1]:.2f}% of pixels ({stats[k][2]} masks)"
                      for k in ("paper", "drop"))
          + f"; {dropped} dropped, {dropped_on_undetected} of them on an undetected class")
    assert n_undetected > 0 and dropped > 0
    assert dropped_on_undetected >= 0.9 * dropped
    assert stats["drop"][0] > stats["paper"][0]


def test_odd_sizes_run(oracle):
    clip, sam, text = oracle
    for hw in [(16, 16), (20, 700), (900, 60)]:
        image, gt = make_world_image(np.random.default_rng(1), *hw)
        r = run_stage1(image, clip, sam, text, Stage1Config(), seed=0, image_id=f"{hw}")
        assert r.label.shape == hw and len(r.detected) >= 1 and len(r.masks) >= 1
        # A 16 px image is one crop, so only its dominant class is detected (the method's limit), and 1.2 masks
        # of other classes get that label; but every 1.1 mask is exactly a region of its class.
        for m in r.masks:
            if m.stage == "1.1":
                assert (gt[m.mask] == m.class_id).all()


def test_no_detected_class_gives_no_masks(oracle):
    clip, sam, text = oracle
    image, _ = make_world_image(np.random.default_rng(2), 120, 200)
    spy = CountingSam(sam)
    r = run_stage1(image, clip, spy, text, Stage1Config(min_crop_votes=10**6), seed=0, image_id="x")
    assert r.detected == [] and r.masks == [] and r.selected.shape == (0,)
    assert (r.label == IGNORE_LABEL).all() and spy.embeds == 0
    with pytest.raises(ValueError, match="D="):
        run_stage1(image, clip, sam, text[:, :8], Stage1Config(), seed=0, image_id="x")
    with pytest.raises(ValueError, match="uint8"):
        run_stage1(image.astype(np.float32), clip, sam, text, Stage1Config(), seed=0, image_id="x")


def test_clip_must_be_built_with_the_configs_dense_mode(oracle):
    _, sam, text = oracle
    image, _ = make_world_image(np.random.default_rng(3), 64, 96)
    with pytest.raises(ValueError, match="dense_mode 'sclip'.*built with 'maskclip'"):
        run_stage1(image, build_oracle_clip("cpu"), sam, text, Stage1Config(dense_mode="sclip"), seed=0, image_id="x")
    r = run_stage1(image, build_oracle_clip("cpu", dense_mode="sclip"), sam, text, Stage1Config(dense_mode="sclip"),
                   seed=0, image_id="x")
    assert r.label.shape == (64, 96)
