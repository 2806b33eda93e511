"""Alignment module shapes, head count and normalisation; the Stage-2 training view and the patch-label rule."""

import numpy as np
import pytest
import torch

from fmbseg import IGNORE_LABEL
from fmbseg.alignment import (AlignmentConfig, build_alignment, load_alignment, nearest_resize, patch_labels,
                              random_windows, short_side_size, train_view, window_sides)


@pytest.mark.parametrize("c, heads", [(1024, 16), (768, 12), (64, 1), (32, 1), (200, 3 - 1)])
def test_heads_are_c_over_64(c, heads):
    # 200 // 64 = 3 does not divide 200: lowered to the largest divisor below (2)
    assert AlignmentConfig(c, 16).heads() == heads


def test_module_shapes_and_unit_norm():
    torch.manual_seed(0)
    m = build_alignment(AlignmentConfig(in_dim=128, out_dim=24))
    assert m.block.num_heads == 2
    assert m.block.mlp[0].out_features == 512         # MLP ratio 4
    out = m(torch.randn(2, 5, 7, 128))
    assert out.shape == (2, 5, 7, 24)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 5, 7), atol=1e-5)
    with pytest.raises(ValueError, match="expected features"):
        m(torch.randn(2, 5, 7, 64))
    again = load_alignment(AlignmentConfig(128, 24), m.state_dict())
    x = torch.randn(1, 3, 3, 128)
    assert torch.equal(again(x), m(x))


def test_tokens_attend_within_an_image_only():
    torch.manual_seed(0)
    m = build_alignment(AlignmentConfig(64, 8))
    a, b = torch.randn(1, 4, 4, 64), torch.randn(1, 4, 4, 64)
    both = m(torch.cat([a, b]))
    assert torch.allclose(both[:1], m(a), atol=1e-6)


def test_short_side_and_centre_crop_geometry():
    assert short_side_size(300, 600, 448) == (448, 896)
    assert short_side_size(600, 300, 448) == (896, 448)
    # a label whose columns encode the original x: after the resize + crop, column j of the crop holds the
    # nearest source column of resized column j + left
    h, w = 100, 300
    label = np.tile(np.arange(w, dtype=np.uint16), (h, 1))
    image = np.zeros((h, w, 3), np.uint8)
    x, lab = train_view(image, label, 56)
    assert x.shape == (3, 56, 56) and lab.shape == (56, 56) and lab.dtype == np.uint16
    rw = 168                                   # 300 * 56 / 100
    left = (rw - 56) // 2
    expected = np.floor((np.arange(left, left + 56) + 0.5) * w / rw).astype(int)
    assert np.array_equal(lab[0], expected)
    assert np.array_equal(nearest_resize(label, (h, w)), label)


def test_train_view_image_values():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 20:] = 255                        # right half white
    x, _ = train_view(image, None, 14)
    assert x.shape == (3, 14, 14)
    # resized width 28, crop columns 7..20: crop columns 0..6 come from the black half, 7..13 from the white
    assert x[:, :, :6].max() < 0.05 and x[:, :, 8:].min() > 0.95


def test_patch_labels_majority_rule_counts_ignore_in_denominator():
    p, K = 4, 5
    lab = np.full((8, 8), IGNORE_LABEL, np.uint16)
    lab[0:4, 0:4] = 2                                   # patch (0,0): 16/16 class 2
    lab[0:4, 4:8] = 1
    lab[0:2, 4:8] = IGNORE_LABEL                        # patch (0,1): 8/16 class 1, 8 ignore -> not > 50% -> -1
    lab[4:8, 0:4] = IGNORE_LABEL
    lab[4:7, 0:3] = 3                                   # patch (1,0): 9/16 class 3 -> 3
    lab[4:8, 4:8] = 0
    lab[4:6, 4:8] = 4
    lab[6, 4] = 4                                       # patch (1,1): 9 of class 4, 7 of class 0 -> 4
    out = patch_labels(lab, p, K)
    assert out.dtype == np.int64
    assert out.tolist() == [[2, -1], [3, 4]]


def test_patch_labels_rejects_unknown_classes_and_bad_sizes():
    with pytest.raises(ValueError, match="outside"):
        patch_labels(np.full((4, 4), 7, np.uint16), 2, 5)
    with pytest.raises(ValueError, match="multiple of the patch"):
        patch_labels(np.zeros((5, 4), np.uint16), 2, 5)


def _alignment_after(steps, size, text_weight=1.0, rotate_every=0):
    """Train the module on a 10-image synthetic world (ground-truth patch labels, oracle DINOv2 features) with
    DESIGN's optimiser (SGD 0.1, momentum 0.9, wd 1e-4, cosine over `steps`, τ 0.1, batch 5) -> mean over classes
    of cos(class centroid of the embeddings, its text anchor). `text_weight` != 1 multiplies the patch-text sum
    (a diagnostic, not the paper's loss; None: M/K, the weight that makes it count like the patch-patch term).
    `rotate_every` > 0: `rotate_to_anchors` with the centroids of the last `rotate_every` steps, as training does
    after every epoch."""
    import torch.nn.functional as F

    import tempfile

    from fmbseg.alignment import rotate_to_anchors, train_label_view
    from fmbseg.images import load_image
    from fmbseg.testing.oracle import build_oracle_clip, build_oracle_dino
    from fmbseg.testing.palette import PALETTE_NAMES
    from fmbseg.testing.world import load_annotation, write_world

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_world(tmp, 10, seed=21, sizes=((120, 160), (150, 120)))
        pairs = [(load_image(str(p)), load_annotation(p)) for p in paths]
    dino = build_oracle_dino("cpu")
    k = len(PALETTE_NAMES)
    text = F.normalize(build_oracle_clip("cpu").encode_text(list(PALETTE_NAMES)).float(), dim=-1)
    feats = torch.stack([dino.features(train_view(im, None, size)[0][None])[0] for im, _ in pairs])
    labels = torch.stack([torch.from_numpy(patch_labels(train_label_view(gt, size), 14, k, ignore=255))
                          for _, gt in pairs])
    torch.manual_seed(0)
    module = build_alignment(AlignmentConfig(in_dim=feats.shape[-1], out_dim=text.shape[1]))
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(0)
    sums = torch.zeros(k, text.shape[1])
    for step in range(steps):
        idx = torch.randperm(len(pairs), generator=g)[:5]
        z = module(feats[idx]).reshape(-1, text.shape[1])
        y = labels[idx].reshape(-1)
        keep = y >= 0
        w = text_weight if text_weight is not None else int(keep.sum()) / k
        loss = _weighted_tsupcon(z[keep], y[keep], text, 0.1, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if rotate_every:
            sums.index_add_(0, y[keep], z.detach()[keep])
            if (step + 1) % rotate_every == 0:
                momentum = [opt.state[p]["momentum_buffer"] for p in module.head.parameters()]
                rotate_to_anchors(module, sums, sums.norm(dim=1) > 0, text, momentum)
                sums.zero_()
    with torch.no_grad():
        z = module(feats).reshape(-1, text.shape[1])
        y = labels.reshape(-1)
        present = [c for c in range(k) if (y == c).any()]
        cents = F.normalize(torch.stack([z[y == c].mean(0) for c in present]), dim=-1)
        return float((cents * text[present]).sum(1).mean())


def _weighted_tsupcon(z, y, text, tau, text_weight):
    """DESIGN's TSupCon on kept patches, the patch-text sum multiplied by `text_weight` (1: `fmbseg.losses`)."""
    from fmbseg.losses import tsupcon

    if text_weight == 1.0:
        return tsupcon(z, y, text, tau)
    # the two sums of DESIGN §1 written out again, so the patch-text one can be scaled on its own
    import torch.nn.functional as F

    z, t = F.normalize(z, dim=-1), F.normalize(text, dim=-1)
    m, k = z.shape[0], t.shape[0]
    s_zt, s_zz = z @ t.T / tau, z @ z.T / tau
    s_zz = s_zz.masked_fill(torch.eye(m, dtype=torch.bool), -1.0e30)
    lse_zz = torch.logsumexp(s_zz, 1)
    l_t = torch.logaddexp(lse_zz, torch.logsumexp(s_zt, 1)) - s_zt.gather(1, y[:, None]).squeeze(1)
    onehot = F.one_hot(y, k).float()
    count = onehot.sum(0)
    class_term = ((onehot.T @ l_t) / count.clamp(min=1)).sum()
    pos = (y[:, None] == y[None, :]) & ~torch.eye(m, dtype=torch.bool)
    n_pos = pos.sum(1)
    l_im = torch.where(n_pos > 0, lse_zz - (s_zz.masked_fill(~pos, 0.0)).sum(1) / n_pos.clamp(min=1), 0.0)
    return (text_weight * class_term + l_im.sum()) / (m + k)


@pytest.mark.usefixtures("one_torch_thread")
def test_text_anchors_align_slower_with_more_patches_per_batch_and_faster_with_the_procrustes_turn():
    """docs/STAGE2.md: the patch-text term weighs ~K/(M+K), so with the paper's loss the class centroids turn to
    their text anchors more slowly the more patches a batch has; weighting the text term like the patch-patch
    term (not the paper's loss) aligns them within the same steps, and so does the paper's loss with the
    Procrustes turn every 10 steps."""
    small = _alignment_after(150, 56)       # M ~ 5 x 16 patches
    large = _alignment_after(150, 112)      # M ~ 5 x 64 patches
    weighted = _alignment_after(150, 112, text_weight=None)
    turned = _alignment_after(150, 112, rotate_every=10)
    print(f"cos after 150 steps: 56 px {small:.3f}, 112 px {large:.3f}, 112 px text weighted M/K {weighted:.3f}, "
          f"112 px with the Procrustes turn {turned:.3f}")
    # measured: 0.739, 0.653, 0.998, 0.790
    assert small > large + 0.05
    assert weighted > 0.95 and large < 0.8
    assert turned > large + 0.1


def test_rotate_to_anchors_is_the_procrustes_rotation_and_keeps_every_patch_similarity():
    from fmbseg.alignment import rotate_to_anchors

    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    k = d = 6
    module = build_alignment(AlignmentConfig(in_dim=16, out_dim=d))
    feats = torch.randn(2, 3, 4, 16, generator=g)
    text = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1).float()
    sums = torch.randn(k, d, generator=g) * torch.rand(k, 1, generator=g) * 5
    present = torch.ones(k, dtype=torch.bool)
    buf_w, buf_b = torch.randn(d, 16, generator=g), torch.randn(d, generator=g)
    w0, b0, w_buf0, b_buf0 = module.head.weight.clone(), module.head.bias.clone(), buf_w.clone(), buf_b.clone()
    with torch.no_grad():
        before = module(feats).reshape(-1, d)
    r = rotate_to_anchors(module, sums, present, text, [buf_w, buf_b])
    with torch.no_grad():
        after = module(feats).reshape(-1, d)

    # reference: the polar factor of M = Σ_k t_k ĉ_kᵀ, M (MᵀM)^(-1/2), by an eigendecomposition in float64
    c = torch.nn.functional.normalize(sums.double(), dim=-1)
    m = text.double().T @ c
    evals, evecs = torch.linalg.eigh(m.T @ m)
    ref = m @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    assert torch.allclose(r.double(), ref, atol=1e-5)
    assert torch.allclose(r.double() @ r.double().T, torch.eye(d, dtype=torch.float64), atol=1e-6)
    # outputs turn by R; all patch-patch similarities (what TSupCon's patch-patch term sees) are kept
    assert torch.allclose(after, before @ r.T, atol=1e-5)
    assert torch.allclose(after @ after.T, before @ before.T, atol=1e-5)
    assert torch.allclose(module.head.weight, r @ w0, atol=1e-6) and torch.allclose(module.head.bias, r @ b0, atol=1e-6)
    assert torch.allclose(buf_w, r @ w_buf0, atol=1e-6) and torch.allclose(buf_b, r @ b_buf0, atol=1e-6)
    # the centroids now point at their anchors at least as well as before, and better than 200 random rotations
    score = lambda rot: float((text.double() * (c @ rot.double().T)).sum())   # noqa: E731
    assert score(r) >= score(torch.eye(d)) - 1e-9
    for _ in range(200):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        assert score(r) >= score(q) - 1e-9
    # no class present: nothing turns
    w1 = module.head.weight.clone()
    assert torch.equal(rotate_to_anchors(module, sums, torch.zeros(k, dtype=torch.bool), text), torch.eye(d))
    assert torch.equal(module.head.weight, w1)


def test_random_windows_are_sub_grids_of_every_allowed_size_and_place():
    # features that spell out their own (image, row, col), so each window can be located independently
    b, h, w = 3, 6, 5
    grid = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij"), -1).float()
    labels = (grid[..., 0] * 100 + grid[..., 1] * 10 + grid[..., 2]).long()
    assert window_sides((6, 5), 0.4) == ((3, 6), (2, 5))         # ceil(2.4) = 3, ceil(2.0) = 2
    assert window_sides((16, 16), 0.4) == ((7, 16), (7, 16)) and window_sides((4, 4), 0.01) == ((1, 4), (1, 4))
    gen = torch.Generator().manual_seed(0)
    sizes, places = set(), set()
    for _ in range(400):
        f, y = random_windows(grid, labels, 0.4, gen)
        hh, ww = y.shape[1:]
        sizes.add((hh, ww))
        for i in range(b):
            r0, c0 = int(f[i, 0, 0, 1]), int(f[i, 0, 0, 2])
            places.add((hh, ww, r0, c0))
            assert torch.equal(f[i], grid[i, r0:r0 + hh, c0:c0 + ww])       # a contiguous block of image i
            assert torch.equal(y[i], labels[i, r0:r0 + hh, c0:c0 + ww])     # its labels, aligned
    assert sizes == {(hh, ww) for hh in range(3, 7) for ww in range(2, 6)}  # every size, both sides independent
    assert {(r0, c0) for hh, ww, r0, c0 in places if (hh, ww) == (3, 2)} == \
        {(r0, c0) for r0 in range(4) for c0 in range(4)}                     # every offset of a size
    # the same seed gives the same windows; 1.0 is the whole view and draws nothing
    a = random_windows(grid, labels, 0.4, torch.Generator().manual_seed(5))
    c = random_windows(grid, labels, 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    f, y = random_windows(grid, labels, 1.0, gen)
    assert f is grid and y is labels and torch.equal(gen.get_state(), state)
