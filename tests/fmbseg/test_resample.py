"""fmbseg.resample.pil_resize against the installed Pillow: the same bytes for up- and downscales, odd and tiny
sizes, flat and hard-edged images (where the bicubic overshoot is clipped), both filters and both pass orders."""

import numpy as np
import pytest
import torch
from PIL import Image

from fmbseg.resample import UnknownPassOrder, pass_order, pil_resize

FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _pil(image: np.ndarray, h: int, w: int, f: str) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((w, h), resample=FILTERS[f]))


@pytest.mark.parametrize("f", list(FILTERS))
def test_pil_resize_equals_pillow(f):
    rng = np.random.default_rng(7)
    sizes = [(1, 1, 5, 3), (1, 9, 4, 9), (17, 1, 17, 40), (2, 3, 1, 1), (48, 64, 96, 128), (37, 53, 101, 29),
             (64, 48, 20, 13), (90, 31, 45, 62), (120, 160, 224, 224)]
    sizes += [tuple(int(v) for v in rng.integers(1, 80, 4)) for _ in range(40)]
    orders = set()
    for k, (H, W, h, w) in enumerate(sizes):
        if k % 3 == 0:  # hard edges: bicubic overshoots below 0 / above 255 and must clip
            image = np.where(rng.random((H, W, 1)) < 0.5, 0, 255).astype(np.uint8).repeat(3, axis=2)
        else:
            image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        try:
            got = pil_resize(image, h, w, f)
        except UnknownPassOrder:
            continue
        orders.add(pass_order((H, W), (h, w), f))
        assert got.dtype == torch.uint8 and got.shape == (h, w, 3)
        np.testing.assert_array_equal(got.numpy(), _pil(image, h, w, f), err_msg=f"{(H, W)} -> {(h, w)}")
    assert "hv" in orders


def test_sam_long_side_resize_is_pillow_bilinear():
    """`SamModel.prepare_on_device` stands for segment_anything's `ResizeLongestSide.apply_image` (PIL path)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(3)
    for H, W, side in [(48, 64, 64), (120, 80, 1024), (33, 250, 128), (300, 200, 256)]:
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        t = ResizeLongestSide(side)
        h, w = t.get_preprocess_shape(H, W, side)
        try:
            got = pil_resize(image, h, w, "bilinear").numpy()
        except UnknownPassOrder:
            continue
        np.testing.assert_array_equal(got, t.apply_image(image))


def test_bad_arguments():
    with pytest.raises(ValueError, match="uint8"):
        pil_resize(np.zeros((4, 4, 3), np.float32), 2, 2)
    with pytest.raises(ValueError, match="filter"):
        pil_resize(np.zeros((4, 4, 3), np.uint8), 2, 2, "lanczos")
    x = torch.zeros(4, 5, 3, dtype=torch.uint8)
    assert pil_resize(x, 4, 5) is x
