"""Segmenters: TCL window geometry, sliding-window logits against a direct computation, the background rule,
Stage-1 painting with the maskclip fallback, and the checkpoint/encoder check of `fmbseg`."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmbseg.alignment import AlignmentConfig, build_alignment
from fmbseg.segmenters import (FmbsegSegmenter, MaskClipSegmenter, SlidingWindow, build_prompts, load_fmbseg,
                               sliding_logits, stage1_predictions)

RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class ColourClip:
    """Test double of the ClipModel protocol: a patch's embedding is its mean RGB (D = 3); "red", "green",
    "blue" embed to the colour axes, any other name to the grey diagonal."""

    input_size, patch_size, embed_dim = 32, 8, 3
    model_id, weights_sha256, device = "colour-clip", None, torch.device("cpu")

    def __init__(self):
        self.calls = []

    def encode_text(self, names, templates=("a photo of a {}.",)):
        rows = [RGB.get(n if isinstance(n, str) else n[0], (0.5, 0.5, 0.5)) for n in names]
        return F.normalize(torch.tensor(rows), dim=-1)

    def encode_dense(self, images):
        self.calls.append(tuple(images.shape))
        p = self.patch_size
        pooled = F.avg_pool2d(images, p)                       # (B, 3, h/p, w/p)
        return F.normalize(pooled.permute(0, 2, 3, 1) + 1e-6, dim=-1)


def test_window_geometry_is_mmseg_slide():
    win = SlidingWindow()
    assert win.resized_hw(300, 600) == (448, 896)
    assert win.resized_hw(100, 1000) == (205, 2048)          # long side capped, short side below 448
    assert win.resized_hw(256, 302) == (448, 529)            # 528.5 rounds half up, as mmcv's rescale_size
    assert win.resized_hw(302, 256) == (529, 448)
    boxes = win.windows(448, 896)
    assert boxes == [(0, 0, 448, 448), (0, 224, 448, 672), (0, 448, 448, 896)]
    boxes = win.windows(448, 700)                              # last column flush with the border
    assert boxes[-1] == (0, 252, 448, 700) and len(boxes) == 3
    assert win.windows(205, 300) == [(0, 0, 205, 300)]         # image smaller than a window: one window


def test_sliding_logits_equal_whole_image_logits_for_a_local_embedding():
    """With windows on the patch grid, a per-patch embedding gives identical logits everywhere except where
    bilinear upsampling sees a window border; on a flat-coloured block the two agree exactly."""
    clip = ColourClip()
    win = SlidingWindow(short_side=64, max_long_side=512, window=32, stride=16)
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :48] = (255, 0, 0)
    image[:, 48:] = (0, 0, 255)
    text = clip.encode_text(["red", "green", "blue"])
    logits = sliding_logits(image, clip.encode_dense, text, 8, win, clip.device)
    assert logits.shape == (3, 64, 96)
    assert all(s[1:] == (3, 32, 32) for s in clip.calls)       # every window is a full 32x32 crop
    assert torch.allclose(logits[:, :, :40], text[:, 0:1, None].expand(3, 64, 40), atol=1e-5)
    assert torch.allclose(logits[:, :, 56:], text[:, 2:3, None].expand(3, 64, 40), atol=1e-5)


def test_maskclip_predict_resizes_back_and_applies_background_rule():
    clip = ColourClip()
    win = SlidingWindow(short_side=48, max_long_side=512, window=32, stride=16)
    image = np.zeros((30, 50, 3), np.uint8)
    image[:, :25] = (250, 0, 0)
    image[:, 25:] = (0, 0, 250)
    pred = MaskClipSegmenter(clip, window=win).predict(image, ["red", "green", "blue"])
    assert pred.shape == (30, 50) and pred.dtype == np.int64
    assert (pred[:, :20] == 0).all() and (pred[:, 30:] == 2).all()
    seg = MaskClipSegmenter(clip, background_names=["blue", "green"], window=win)
    pred = seg.predict(image, ["background", "red"])
    assert (pred[:, :20] == 1).all() and (pred[:, 30:] == 0).all()    # blue counts as background
    assert set(np.unique(pred)) <= {0, 1}


def test_windows_smaller_than_a_patch_multiple_are_padded():
    clip = ColourClip()
    win = SlidingWindow(short_side=20, max_long_side=30, window=32, stride=16)
    image = np.full((20, 30, 3), (0, 240, 0), np.uint8)
    pred = MaskClipSegmenter(clip, window=win).predict(image, ["red", "green"])
    assert clip.calls[-1][2:] == (24, 32)                          # 20x30 padded up to multiples of 8
    assert (pred == 1).all()


def test_build_prompts_maps_synonyms_and_background():
    p = build_prompts(["background", ["car", "automobile"], "dog"], ["sky", "dog", "road"])
    assert p.prompts == ("background", ("car", "automobile"), "dog", "sky", "road")   # a real class is not doubled
    assert p.to_class.tolist() == [0, 1, 2, 0, 0]
    assert build_prompts(["cat", "dog"], ["sky"]).to_class.tolist() == [0, 1]        # no background class: no rule
    with pytest.raises(ValueError):
        build_prompts([])


@dataclass
class FakeMask:
    stage: str
    class_id: int
    score: float
    mask: np.ndarray


@dataclass
class FakeResult:
    height: int
    width: int
    masks: list


def _box(y0, y1, x0, x1, shape=(4, 6)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_stage1_painting_score_order_and_fallback():
    masks = [
        FakeMask("1.1", 0, 0.9, _box(0, 2, 0, 3)),
        FakeMask("1.1", 1, 0.5, _box(0, 4, 2, 4)),
        FakeMask("1.2", 2, 0.7, _box(1, 3, 1, 5)),
        FakeMask("1.2", 3, 0.2, _box(3, 4, 0, 6)),        # prompt 3 maps to class 0 (background rule)
    ]
    fallback = np.full((4, 6), 9, np.int64)
    to_class = np.array([0, 1, 2, 0])
    out = stage1_predictions(FakeResult(4, 6, masks), fallback, to_class)
    assert out["stage1.1"].tolist() == [[0, 0, 0, 1, 9, 9],
                                        [0, 0, 0, 1, 9, 9],
                                        [9, 9, 1, 1, 9, 9],
                                        [9, 9, 1, 1, 9, 9]]
    assert out["stage1.2"].tolist() == [[9, 9, 9, 9, 9, 9],
                                        [9, 2, 2, 2, 2, 9],
                                        [9, 2, 2, 2, 2, 9],
                                        [0, 0, 0, 0, 0, 0]]
    # all masks by increasing score: 0.2 (row 3 -> 0), 0.5 (cols 2-3 -> 1), 0.7 (rows 1-2 cols 1-4 -> 2), 0.9
    assert out["stage1"].tolist() == [[0, 0, 0, 1, 9, 9],
                                      [0, 0, 0, 2, 2, 9],
                                      [9, 2, 2, 2, 2, 9],
                                      [0, 0, 1, 1, 0, 0]]
    empty = stage1_predictions(FakeResult(2, 2, []), np.full((2, 2), 5), to_class)
    assert all(v.tolist() == [[5, 5], [5, 5]] for v in empty.values())


class LinearDino:
    patch_size, embed_dim = 8, 16
    model_id, weights_sha256, device = "linear-dino", "abc", torch.device("cpu")

    def features(self, images):
        pooled = F.avg_pool2d(images, 8).permute(0, 2, 3, 1)          # (B, h, w, 3)
        return torch.cat([pooled, pooled.new_zeros(*pooled.shape[:3], 13)], dim=-1)


def test_fmbseg_segmenter_and_encoder_check():
    torch.manual_seed(0)
    module = build_alignment(AlignmentConfig(16, 3))
    clip, dino = ColourClip(), LinearDino()
    seg = FmbsegSegmenter(dino, module, clip, window=SlidingWindow(32, 512, 32, 16))
    pred = seg.predict(np.zeros((32, 40, 3), np.uint8), ["red", "green", "blue"])
    assert pred.shape == (32, 40) and pred.min() >= 0 and pred.max() <= 2
    ckpt = {"encoders": {"dino": {"model_id": "linear-dino", "weights_sha256": "abc"},
                         "clip": {"model_id": "colour-clip", "weights_sha256": None}},
            "config": {"alignment": AlignmentConfig(16, 3).to_json()}, "model": module.state_dict()}
    loaded = load_fmbseg(ckpt, dino, clip, window=SlidingWindow(32, 512, 32, 16))
    image = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    assert np.array_equal(loaded.predict(image, ["red", "blue"]), seg.predict(image, ["red", "blue"]))
    ckpt["encoders"]["dino"]["weights_sha256"] = "other"
    with pytest.raises(ValueError, match="trained with dino linear-dino"):
        load_fmbseg(ckpt, dino, clip)


def test_text_embeddings_are_float32_under_bf16_autocast():
    """On CUDA every model call runs under bf16 autocast; the text embeddings (once per vocabulary) must not: they
    equal open_clip's float32 `encode_text` computed directly, not its bf16 version."""
    from fmbseg.presets import make_clip
    from fmbseg.segmenters import TextCache

    torch.set_num_threads(1)
    clip = make_clip("tiny", device="cpu")
    names = ["cat", "dog", "traffic light"]
    with torch.autocast("cpu", dtype=torch.bfloat16):          # what the CUDA path is inside
        got = TextCache(clip)(build_prompts(names))
    tokens = clip.tokenizer([f"a photo of a {n}." for n in names])
    with torch.no_grad():
        expected = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_bf16 = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)
    assert (in_bf16 - expected).abs().max() > 1e-3              # the check would see bf16 text embeddings
