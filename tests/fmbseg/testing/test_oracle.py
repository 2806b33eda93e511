"""The oracle models of DESIGN §6 behind the model Protocols, checked against hand-made images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmbseg.models.base import AutoMaskConfig, ClipModel, DinoModel, SamModel, to_tensor
from fmbseg.testing.oracle import build_oracle_clip, build_oracle_dino, build_oracle_sam, build_point_grid
from fmbseg.testing.palette import PALETTE_NAMES, PALETTE_RGB

RED, BLUE, WHITE = (PALETTE_NAMES.index(n) for n in ("red", "blue", "white"))


def paint(labels: np.ndarray) -> np.ndarray:
    return PALETTE_RGB[labels]


def test_protocols():
    assert isinstance(build_oracle_clip("cpu"), ClipModel)
    assert isinstance(build_oracle_sam("cpu"), SamModel)
    assert isinstance(build_oracle_dino("cpu"), DinoModel)


def test_clip_text_embeddings():
    clip = build_oracle_clip()
    t = clip.encode_text(list(PALETTE_NAMES))
    assert t.shape == (12, clip.embed_dim)
    torch.testing.assert_close(t @ t.T, torch.eye(12), atol=1e-5, rtol=0)  # orthonormal e_c
    torch.testing.assert_close(t, clip.colour_vectors)
    # The name is parsed out of any template; case and blanks do not matter.
    torch.testing.assert_close(clip.encode_text(["Red "], ["there is a {} in the scene"])[0], t[RED])
    # Unknown names: fixed unit vectors seeded by the name, the same in another instance, different per name.
    u = clip.encode_text(["background", "sky"])
    torch.testing.assert_close(u, build_oracle_clip().encode_text(["background", "sky"]))
    torch.testing.assert_close(u.norm(dim=1), torch.ones(2))
    assert abs(float(u[0] @ u[1])) < 0.9
    # Synonyms (a list) and templates are averaged, then normalised.
    s = clip.encode_text([["red", "blue"]], ["a photo of a {}.", "a {}"])[0]
    torch.testing.assert_close(s, (t[RED] + t[BLUE]) / np.sqrt(2))
    with pytest.raises(ValueError, match="exactly one"):
        clip.encode_text(["red"], ["no placeholder"])


def test_clip_dense_and_cls_are_colour_fractions():
    clip = build_oracle_clip()
    P = clip.patch_size
    labels = np.full((224, 224), WHITE)
    labels[:, :100] = RED  # columns 96..99 of patch column 6 are red: a 4/16 red, 12/16 white patch
    labels[:P, 108:] = BLUE  # patch (0, 6): 4 red, 8 white, 4 blue columns
    cls, dense = clip.encode_crops(to_tensor(paint(labels))[None])
    e = clip.colour_vectors
    assert dense.shape == (1, 224 // P, 224 // P, clip.embed_dim)
    torch.testing.assert_close(dense[0, 5, 0], e[RED])
    torch.testing.assert_close(dense[0, 5, 6], torch.nn.functional.normalize(0.25 * e[RED] + 0.75 * e[WHITE], dim=0))
    torch.testing.assert_close(dense[0, 0, 7], e[BLUE])
    mix = torch.nn.functional.normalize(0.25 * e[RED] + 0.5 * e[WHITE] + 0.25 * e[BLUE], dim=0)
    torch.testing.assert_close(dense[0, 0, 6], mix)
    frac = np.bincount(labels.ravel(), minlength=12) / labels.size
    torch.testing.assert_close(cls[0], torch.nn.functional.normalize(torch.from_numpy(frac).float() @ e, dim=0))
    # encode_dense on a non-square multiple of P gives the same cells.
    wide = clip.encode_dense(to_tensor(paint(labels[:, :160]))[None])
    assert wide.shape == (1, 224 // P, 160 // P, clip.embed_dim)
    torch.testing.assert_close(wide[0], dense[0, :, : 160 // P])
    with pytest.raises(ValueError, match="224x224"):
        clip.encode_crops(torch.zeros(1, 3, 112, 112))
    with pytest.raises(ValueError, match="multiples"):
        clip.encode_dense(torch.zeros(1, 3, 100, 112))


def test_sam_points_and_automatic_masks():
    sam = build_oracle_sam()
    labels = np.full((60, 90), WHITE)
    labels[10:30, 10:30] = RED  # region A
    labels[40:50, 60:80] = RED  # region B, same colour, not connected to A
    labels[5:8, 50:52] = BLUE  # 6 px: below a minimum area of 1% (54 px)
    image = paint(labels)
    emb = sam.embed(image)
    assert sam.embed_calls == 1 and emb.original_hw == (60, 90)

    pts = np.array([[[15.5, 12.2], [70.0, 45.0]], [[20.0, 20.0], [21.0, 21.0]], [[0.0, 0.0], [89.9, 59.9]]])
    masks, iou = sam.predict_points(emb, pts)
    assert masks.shape == (3, 3, 60, 90) and masks.dtype == bool and iou.shape == (3, 3)
    np.testing.assert_allclose(iou, [[0.95, 0.90, 0.85]] * 3)
    np.testing.assert_array_equal(masks[0, 0], labels == RED)  # union of both red regions
    region_a = np.zeros_like(labels, dtype=bool)
    region_a[10:30, 10:30] = True
    np.testing.assert_array_equal(masks[1, 2], region_a)
    np.testing.assert_array_equal(masks[2, 1], labels == WHITE)  # the background is one connected region
    assert sam.embed_calls == 1 and sam.decoder_calls == 1

    autos = sam.generate(emb, AutoMaskConfig(points_per_side=16, min_area_frac=0.01))
    got = sorted(int(a.segmentation.sum()) for a in autos)
    assert got == [200, 400, 5400 - 600 - 6]  # region B, region A, background; the 6 px blue bar is too small
    assert all(a.predicted_iou == 0.95 and a.stability_score == 1.0 for a in autos)
    # max area drops the background; an IoU threshold above 0.95 drops everything.
    assert len(sam.generate(emb, AutoMaskConfig(points_per_side=16, min_area_frac=0.01, max_area_frac=0.5))) == 2
    assert sam.generate(emb, AutoMaskConfig(pred_iou_thresh=0.96)) == []
    # A grid too coarse to hit region B misses it (only regions hit by a grid point are generated).
    assert len(sam.generate(emb, AutoMaskConfig(points_per_side=1, min_area_frac=0.0))) == 1
    with pytest.raises(ValueError, match=r"\(N, n, 2\)"):
        sam.predict_points(emb, np.zeros((2, 2)))


def test_point_grid_is_sams():
    g = build_point_grid(2)
    np.testing.assert_allclose(g, [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])


def test_dino_features_are_content_seeded():
    dino = build_oracle_dino()
    rng = np.random.default_rng(0)
    a = to_tensor(paint(rng.integers(0, 12, size=(28, 42))))
    b = to_tensor(paint(rng.integers(0, 12, size=(28, 42))))
    fa = dino.features(a[None])
    assert fa.shape == (1, 2, 3, dino.embed_dim)
    # Same pixels -> same features, whatever the batch or the instance; different pixels -> different noise.
    torch.testing.assert_close(build_oracle_dino().features(torch.stack([b, a]))[1], fa[0])
    fb = dino.features(b[None])
    assert not torch.allclose(fa, fb)
    # The signal is the patch mean colour through the fixed map: the noise is small next to it.
    mean = torch.nn.functional.avg_pool2d(a[None], 14)[0].permute(1, 2, 0)
    signal = (mean - 0.5) @ dino.colour_map
    assert (fa[0] - signal).abs().max() < 0.5 and (fa[0] - signal).abs().max() > 0
    with pytest.raises(ValueError, match="multiples of 14"):
        dino.features(torch.zeros(1, 3, 20, 28))
