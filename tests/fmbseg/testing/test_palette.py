"""The world's palette: names and colours exactly as DESIGN §6, nearest-colour classification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmbseg.testing.palette import (PALETTE, PALETTE_NAMES, PALETTE_RGB, colourise, nearest_colour,
                                    nearest_colour_torch, palette_index)


def test_palette_is_design_table():
    assert dict(PALETTE) == {
        "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210),
        "yellow": (235, 210, 40), "magenta": (200, 50, 200), "cyan": (40, 200, 210),
        "orange": (240, 140, 30), "purple": (110, 50, 160), "gray": (128, 128, 128),
        "brown": (130, 80, 40), "white": (245, 245, 245), "black": (15, 15, 15),
    }
    assert PALETTE_RGB.shape == (12, 3) and PALETTE_RGB.dtype == np.uint8
    assert palette_index(" Gray ") == PALETTE_NAMES.index("gray")
    with pytest.raises(ValueError, match="not a palette colour"):
        palette_index("grey")


def test_nearest_colour_equals_brute_force():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    d = ((image.astype(int)[:, :, None, :] - PALETTE_RGB.astype(int)[None, None]) ** 2).sum(-1)
    ref = d.argmin(-1)
    np.testing.assert_array_equal(nearest_colour(image), ref)
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0
    np.testing.assert_array_equal(nearest_colour_torch(pixels)[0].numpy(), ref)
    # The palette colours themselves, and colourise as their inverse.
    labels = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(nearest_colour(colourise(labels)), labels)
    with pytest.raises(ValueError):
        colourise(np.array([[12]]))
