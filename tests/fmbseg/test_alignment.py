"""Alignment module shapes, head count and normalisation; the Stage-2 training view and the patch-label rule."""

import numpy as np
import pytest
import torch

from fmbseg import IGNORE_LABEL
from fmbseg.alignment import (AlignmentConfig, build_alignment, load_alignment, nearest_resize, patch_labels,
                              short_side_size, train_view)


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
