"""The synthetic world: images match their planted ground truth, every present class has a large instance, and
the on-disk `custom` layout reads back (JPEG noise never changes a pixel's nearest palette colour)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fmbseg.testing.components import label_regions
from fmbseg.testing.palette import PALETTE_NAMES, PALETTE_RGB, nearest_colour
from fmbseg.testing.world import load_annotation, make_world_image, write_world


@pytest.mark.parametrize("hw", [(240, 320), (517, 301), (16, 16), (20, 700), (900, 60)])
def test_image_matches_ground_truth(hw):
    rng = np.random.default_rng(7)
    image, gt = make_world_image(rng, *hw)
    assert image.shape == (*hw, 3) and image.dtype == np.uint8 and gt.shape == hw
    np.testing.assert_array_equal(image, PALETTE_RGB[gt])
    assert 3 <= len(np.unique(gt)) <= 5  # a background and 2-4 foreground classes


def test_every_foreground_class_has_a_large_instance():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        H, W = (240, 320) if seed % 2 else (301, 517)
        _, gt = make_world_image(rng, H, W)
        regions, n = label_regions(gt)
        areas = np.bincount(regions.ravel(), minlength=n)
        classes_of = np.zeros(n, dtype=int)
        classes_of[regions.ravel()] = gt.ravel()
        for cls in np.unique(gt):
            # The largest region of each class covers >= 4% of the image (a grid cell of <= 4 x 70% x 70%
            # minus overlaps), far more than any small instance.
            assert areas[classes_of == cls].max() >= 0.04 * H * W, (seed, PALETTE_NAMES[cls])


def test_class_subset_and_determinism():
    a = make_world_image(np.random.default_rng(3), 100, 150, classes=["red", "blue", "white"])
    b = make_world_image(np.random.default_rng(3), 100, 150, classes=["red", "blue", "white"])
    np.testing.assert_array_equal(a[0], b[0])
    assert set(np.unique(a[1])) <= {PALETTE_NAMES.index(c) for c in ("red", "blue", "white")}
    with pytest.raises(ValueError, match="not a palette colour"):
        make_world_image(np.random.default_rng(0), 50, 50, classes=["red", "teal"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        make_world_image(np.random.default_rng(0), 50, 50, classes=["red"])
    with pytest.raises(ValueError, match=">= 16"):
        make_world_image(np.random.default_rng(0), 8, 50)


def test_write_world_layout(tmp_path):
    paths = write_world(tmp_path / "w", 6, seed=1, sizes=[(120, 200), (210, 90)], formats=("png", "jpg"))
    root = tmp_path / "w"
    assert [p.name for p in paths] == [f"world_{i:04d}.{'png' if i % 2 == 0 else 'jpg'}" for i in range(6)]
    assert (root / "classes.txt").read_text().splitlines() == list(PALETTE_NAMES)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == ((200, 120), (90, 210))[i % 2]
            rgb = np.asarray(im)
        with Image.open(root / "annotations" / f"{p.stem}.png") as ann:
            assert ann.mode == "L"
        gt = load_annotation(p)
        assert gt.shape == rgb.shape[:2] and gt.max() < len(PALETTE_NAMES)
        # The planted map is the ground truth for JPEGs too: compression never moves a pixel's nearest colour.
        np.testing.assert_array_equal(nearest_colour(rgb), gt)
    # Image i depends on (seed, i) only: a bigger world starts with the same images.
    more = write_world(tmp_path / "w2", 7, seed=1, sizes=[(120, 200), (210, 90)], formats=("png", "jpg"))
    assert more[0].read_bytes() == paths[0].read_bytes()
    with pytest.raises(ValueError, match="formats"):
        write_world(tmp_path / "w3", 1, seed=0, formats=("gif",))
