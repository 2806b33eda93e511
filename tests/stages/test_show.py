"""`fmbseg show`: the pictures' pixels carry the class colours where the label map has a class, outlines carry the
stage colours, the palette tells >= 150 classes apart; and the IoU chart's legend stays off the bars."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fmbseg.show import (FILL_ALPHA, LABEL_ALPHA, STAGE_COLOURS, MaskDrawing, class_palette, label_overlay,
                         masks_panel, show_image, title_height)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blend(image, colour, alpha):
    # torchvision's blend on uint8: image * (1 - alpha) + colour * alpha, truncated
    return (image.astype(np.float64) * (1 - alpha) + np.asarray(colour, np.float64) * alpha).astype(np.uint8)


def test_palette_has_far_apart_colours_for_256_classes():
    pal = class_palette(256).astype(np.int64)
    d = np.sqrt(((pal[:, None] - pal[None]) ** 2).sum(-1))
    np.fill_diagonal(d, 1e9)
    assert d.min() >= 38  # any two of 256 classes >= 38 RGB units apart (150 classes: >= 41)
    np.testing.assert_array_equal(class_palette(150), class_palette(256)[:150])  # prefix-stable


def test_label_overlay_pixels_carry_their_class_colour():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (20, 30)).astype(np.uint16)
    label[:4] = 65535
    colours = class_palette(5)
    out = label_overlay(image, label, colours)
    for c in range(5):
        sel = label == c
        np.testing.assert_allclose(out[sel], _blend(image[sel], colours[c], LABEL_ALPHA), atol=1)
    np.testing.assert_array_equal(out[:4], image[:4])  # ignore pixels untouched


def test_masks_panel_outlines_by_stage_and_selection():
    image = np.full((40, 40, 3), 100, np.uint8)
    sel = np.zeros((40, 40), bool)
    sel[5:35, 5:20] = True
    unsel = np.zeros((40, 40), bool)
    unsel[5:35, 22:38] = True
    out = masks_panel(image, [MaskDrawing(sel, "1.1", "a", True), MaskDrawing(unsel, "1.2", "b", False)], scale=1)
    assert tuple(out[20, 5]) == STAGE_COLOURS["1.1"] and tuple(out[20, 6]) == STAGE_COLOURS["1.1"]  # 2 px solid
    np.testing.assert_allclose(out[8, 8], _blend(image[8, 8], STAGE_COLOURS["1.1"], FILL_ALPHA), atol=1)  # filled
    edge = [tuple(out[y, 22]) for y in range(5, 35)]
    assert STAGE_COLOURS["1.2"] in edge and (100, 100, 100) in edge  # dashed
    assert tuple(out[8, 30]) == (100, 100, 100)  # unselected: no fill
    assert tuple(out[2, 2]) == (100, 100, 100)  # outside every mask


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, label_world):
    from fmbseg.testing.world import write_world

    root = tmp_path_factory.mktemp("show")
    write_world(root / "world", 3, seed=5, sizes=((100, 140),))
    return label_world(root / "world", root / "campaign", shard_size=2)


def test_show_pictures_carry_class_colours_under_the_label_map(campaign, tmp_path):
    from flows.cli import main
    from fmbseg.images import load_image
    from storage.reader import CampaignReader

    assert main(["show", "--campaign", str(campaign), "--images", "2", "--out", str(tmp_path / "pics"),
                 "--scale", "2"]) == 0
    r = CampaignReader(str(campaign))
    colours = class_palette(len(r.vocabulary))
    labels = list(r.iter_labels())[:2]
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["world_0000.png", "world_0001.png"]
    for image_id, path, label in labels:
        pic = np.array(Image.open(tmp_path / "pics" / (image_id.rsplit(".", 1)[0] + ".png")).convert("RGB"))
        image = load_image(path)
        h, w = label.shape
        top = title_height(image_id)
        left = pic[top: top + 2 * h: 2, 0: 2 * w: 2]  # panel 1 at scale 2, one sample per image pixel
        assert (label != 65535).any()
        for c in np.unique(label[label != 65535]):
            sel = label == c
            np.testing.assert_allclose(left[sel], _blend(image[sel], colours[c], LABEL_ALPHA), atol=1)
        np.testing.assert_array_equal(left[label == 65535], image[label == 65535])
        assert pic.shape[1] == 2 * (2 * w) + 4  # two panels and the gap


def test_show_ids_and_unknown_ids(campaign, tmp_path):
    from stages.show import show_campaign

    (p,) = show_campaign(str(campaign), str(tmp_path), ids=["world_0002.png"])
    assert p.endswith("world_0002.png")
    with pytest.raises(ValueError, match="nope.png"):
        show_campaign(str(campaign), str(tmp_path), ids=["nope.png"])


def test_show_image_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        show_image(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.uint16), [], ["a"])


def test_iou_chart_legend_does_not_cover_the_bars(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from stages.evaluate import iou_chart

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    classes = [f"class{i}" for i in range(12)]
    per_model = {m: {"mIoU": 99.0, "IoU": {c: 99.0 for c in classes}} for m in ("maskclip", "stage1", "fmbseg")}
    iou_chart(str(tmp_path / "iou.png"), "custom:x", per_model)
    (fig,) = figures
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1  # right of the plotting area, so no bar (up to 100 %) is hidden
    assert (tmp_path / "iou.png").is_file()
