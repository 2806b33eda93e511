"""Sliding-window CLIP assembly (DESIGN §1 steps 1-4): stitched cells equal the upscaled image's own cells, and grid
cells map back to the right original pixels (images whose pixels encode their own position)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fmbseg.models.base import ClipModel
from fmbseg.models.sliding import crop_offsets, sliding_window_features, upscaled_size


class MeanColourClip:
    """A ClipModel whose dense feature of a cell is the cell's mean pixel value (D = 3) and CLS the crop's mean."""

    def __init__(self, input_size: int = 224, patch_size: int = 16):
        self.input_size, self.patch_size, self.embed_dim = input_size, patch_size, 3
        self.model_id, self.weights_sha256, self.device = "mean-colour", None, torch.device("cpu")
        self.batches: list[int] = []

    def encode_text(self, names, templates=("a photo of a {}.",)):
        raise NotImplementedError("not used by the sliding window")

    def encode_crops(self, crops):
        assert crops.shape[1:] == (3, self.input_size, self.input_size) and crops.dtype == torch.float32
        self.batches.append(crops.shape[0])
        dense = F.avg_pool2d(crops, self.patch_size).permute(0, 2, 3, 1)
        return F.normalize(crops.mean((2, 3)), dim=-1), F.normalize(dense, dim=-1)

    def encode_dense(self, images):
        return F.normalize(F.avg_pool2d(images, self.patch_size).permute(0, 2, 3, 1), dim=-1)


def expected_size(h, w, S, P, upscale=2.0, max_side=2048):
    """The documented geometry, written out independently of the implementation."""
    s = min(upscale, max_side / max(h, w))
    return tuple(max(min(max(round(n * s / P), 1), max_side // P) * P, S) for n in (h, w))


SIZES = [(301, 517), (517, 301), (16, 16), (20, 700), (1500, 90), (224, 224), (113, 95)]


@pytest.mark.parametrize("P", [16, 14])
@pytest.mark.parametrize("hw", SIZES)
def test_stitched_cells_equal_cells_of_upscaled_image(hw, P):
    H, W = hw
    rng = np.random.default_rng(H * 1000 + W)
    image = rng.integers(1, 256, size=(H, W, 3), dtype=np.uint8)  # every cell different: a misplaced crop shows
    clip = MeanColourClip(224, P)
    assert isinstance(clip, ClipModel)
    sf = sliding_window_features(clip, image, upscale=2.0, max_side=2048, batch_size=5)

    Hu, Wu = expected_size(H, W, 224, P)
    assert upscaled_size(H, W, 224, P) == (Hu, Wu)
    up = np.asarray(Image.fromarray(image).resize((Wu, Hu), Image.Resampling.BICUBIC)) if (Hu, Wu) != (H, W) else image
    direct = F.avg_pool2d(torch.from_numpy(up.copy()).permute(2, 0, 1).float()[None] / 255.0, P)[0].permute(1, 2, 0)
    direct = F.normalize(direct, dim=-1)
    assert sf.dense.shape == (Hu // P, Wu // P, 3)
    torch.testing.assert_close(sf.dense, direct, atol=1e-5, rtol=1e-5)

    assert sf.scale_xy == pytest.approx((Wu / W, Hu / H))
    # Crops: square S, offsets multiples of P with stride <= S/2, last one flush, every cell covered, batched by 5.
    boxes = sf.crop_boxes
    assert (boxes[:, 2] - boxes[:, 0] == 224).all() and (boxes[:, 3] - boxes[:, 1] == 224).all()
    assert (boxes % P == 0).all() and boxes[:, 2].max() == Wu and boxes[:, 3].max() == Hu and boxes.min() == 0
    for axis_offsets in (np.unique(boxes[:, 0]), np.unique(boxes[:, 1])):
        assert (np.diff(axis_offsets) <= 112).all() and (np.diff(axis_offsets) > 0).all()
    assert sf.crop_cls.shape == (len(boxes), 3)
    assert clip.batches == [min(5, len(boxes) - i) for i in range(0, len(boxes), 5)]
    # Each crop's CLS is its own crop's mean colour.
    x0, y0, x1, y1 = boxes[-1]
    crop_mean = torch.from_numpy(up[y0:y1, x0:x1].astype(np.float64)).float().mean((0, 1)) / 255.0
    torch.testing.assert_close(sf.crop_cls[-1], F.normalize(crop_mean, dim=0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("P", [16, 14])
@pytest.mark.parametrize("hw", SIZES)
def test_cell_centres_map_back_to_original_pixels(hw, P):
    """Pixels encode their own position: R = 255 x / W, G = 255 y / H at the pixel centre, B = 255. The stitched
    cell's R/B and G/B give the original-image position the cell looked at; it must be the cell's centre."""
    H, W = hw
    image = np.empty((H, W, 3), dtype=np.uint8)
    image[..., 0] = np.round(255 * (np.arange(W) + 0.5) / W)[None, :]
    image[..., 1] = np.round(255 * (np.arange(H) + 0.5) / H)[:, None]
    image[..., 2] = 255
    sf = sliding_window_features(MeanColourClip(224, P), image)
    d = sf.dense.numpy().astype(np.float64)
    seen_x = d[..., 0] / d[..., 2] * W
    seen_y = d[..., 1] / d[..., 2] * H
    centres = sf.cell_centres()
    cw, ch = sf.cell_size_xy
    assert centres.shape == (*sf.grid_hw, 2)
    assert centres[0, 0] == pytest.approx((cw / 2, ch / 2))
    assert centres[-1, -1] == pytest.approx((W - cw / 2, H - ch / 2))
    # An off-by-half-a-cell (or worse) mapping gives errors >= 0.5 cell; resampling and 8-bit levels stay < 0.1.
    err_x = np.abs(seen_x - centres[..., 0]).max() / cw
    err_y = np.abs(seen_y - centres[..., 1]).max() / ch
    assert err_x < 0.15 and err_y < 0.15, (err_x, err_y)


def test_geometry_rules():
    # Cap: 3000 px long side at upscale 2 is capped to 2048; the short side scales by the same factor.
    assert upscaled_size(1500, 3000, 224, 16) == (1024, 2048)
    # A multiple of 14 below the cap (2048 is not one).
    assert upscaled_size(1500, 3000, 224, 14)[1] == 2044
    # Small images are upscaled to the crop size rather than padded.
    assert upscaled_size(16, 16, 224, 16) == (224, 224)
    assert crop_offsets(224, 224, 16) == [0]
    assert crop_offsets(608, 224, 16) == [0, 112, 224, 336, 384]
    assert crop_offsets(448, 224, 14) == [0, 112, 224]
    with pytest.raises(ValueError, match="max_side"):
        upscaled_size(100, 100, 224, 16, max_side=200)
    with pytest.raises(ValueError, match="upscale"):
        upscaled_size(100, 100, 224, 16, upscale=0)


def test_bad_image_is_refused():
    clip = MeanColourClip()
    with pytest.raises(ValueError, match="uint8"):
        sliding_window_features(clip, np.zeros((50, 50, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        sliding_window_features(clip, np.zeros((50, 50), dtype=np.uint8))
