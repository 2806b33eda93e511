"""The evaluation protocol against TCL / mmseg 0.27 / mmcv ported verbatim (tests/fmbseg/reference_mmseg.py) and
cv2 itself, side by side: resize sizes and pixels, sliding-window logits with TCL's padding, logits upsampled to
the ground truth before the arg-max, metrics, COCO-Object conversion and the context vocabularies."""

import os

import cv2
import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fmbseg.datasets import open_dataset
from fmbseg.metrics import ConfusionMatrix
from fmbseg.protocol import SlidingWindow, resize_uint8, upsampled_argmax
from fmbseg.segmenters import DenseSegmenter, sliding_logits
from fmbseg.vocab_builtin import BUILTIN_VOCABULARIES

import reference_mmseg as ref     # tests/fmbseg/, on sys.path as the test's own folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Sizes that exercise every branch: tall, wide, aspect > 2048/448 = 4.57 (short side below 448, so windows are
# smaller than 448 and padded), small (upscaled x2.8+), odd sizes.
AWKWARD = [(600, 160), (120, 700), (90, 520), (40, 300), (20, 30), (333, 250), (97, 101)]


def _photo() -> np.ndarray:
    """A real photograph shipped with matplotlib (600x512 JPEG)."""
    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _photo_like(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth shading + sharp edges + sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 60 * np.sin(xx / rng.uniform(5, 40) + c) * np.cos(yy / rng.uniform(5, 40))
    for _ in range(6):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        img[y0:y0 + rng.integers(3, h // 2 + 4), x0:x0 + rng.integers(3, w // 2 + 4)] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_resized_size_is_mmcv_rescale_size():
    win = SlidingWindow()
    sizes = AWKWARD + [(256, 302), (302, 256), (1024, 2048), (375, 500), (500, 375), (16, 5000), (449, 448)]
    for h, w in sizes:
        new_w, new_h = ref.rescale_size((w, h), (2048, 448))
        assert win.resized_hw(h, w) == (new_h, new_w), (h, w)


@pytest.mark.parametrize("factor", [0.44, 0.875, 1.2])
def test_image_resize_matches_cv2_inter_linear(factor):
    """mmcv resizes the uint8 image with cv2.INTER_LINEAR (no antialiasing); the project must agree within one
    grey level (it reproduces OpenCV's fixed-point arithmetic, so in practice byte for byte)."""
    for img in (_photo(), _photo_like(383, 517, seed=1)):
        h, w = img.shape[:2]
        out_hw = (int(h * factor + 0.5), int(w * factor + 0.5))
        expected = cv2.resize(img, out_hw[::-1], interpolation=cv2.INTER_LINEAR)
        got = resize_uint8(img, out_hw)
        diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
        print(f"x{factor} {img.shape[:2]}->{out_hw}: max diff {diff.max()}, exact {np.mean(diff == 0):.5f}")
        assert got.shape == expected.shape and got.dtype == np.uint8
        assert diff.max() <= 1
        assert np.mean(diff == 0) >= 0.99     # plain float bilinear + rounding only reaches ~88 %


def test_image_resize_matches_mmcv_imrescale_on_protocol_sizes():
    for i, (h, w) in enumerate(AWKWARD):
        img = _photo_like(h, w, seed=10 + i)
        expected = ref.imrescale(img, (2048, 448))
        got = resize_uint8(img, SlidingWindow().resized_hw(h, w))
        assert got.shape == expected.shape
        assert np.abs(got.astype(np.int16) - expected.astype(np.int16)).max() <= 1


# -- a random "model": patch embedding on the normalised image + a global term, so padding values matter ------

MEAN = (0.48145466, 0.4578275, 0.40821073)     # CLIP's statistics: the model normalises inside, like the adapters
STD = (0.26862954, 0.26130258, 0.27577711)
PATCH = 14


class RandomDenseModel(torch.nn.Module):
    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Conv2d(3, dim, PATCH, stride=PATCH)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) * 0.05)
            self.proj.bias.copy_(torch.randn(dim, generator=g) * 0.1)

    def forward_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised, H, W multiples of PATCH -> (B, H/p, W/p, D)."""
        f = self.proj(x)
        f = f + 0.5 * f.mean(dim=(2, 3), keepdim=True)     # every token sees the whole (padded) window
        return f.permute(0, 2, 3, 1)

    def embed01(self, images: torch.Tensor) -> torch.Tensor:
        """The adapter convention: (B, 3, H, W) in [0, 1], normalised inside."""
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        return self.forward_normalised((images - mean) / std)


def _reference_logits(img: np.ndarray, model: RandomDenseModel, text: torch.Tensor, rescale: bool):
    """TCL's path: mmcv imrescale -> Normalize -> slide_inference over TCL's generate_masks."""
    resized = ref.imrescale(img, (2048, 448))
    norm = ref.imnormalize(resized, [255 * m for m in MEAN], [255 * s for s in STD])
    x = torch.from_numpy(norm).permute(2, 0, 1)[None].contiguous()
    meta = [{"img_shape": resized.shape, "ori_shape": img.shape}]

    def dense_logits(padded):
        f = F.normalize(model.forward_normalised(padded), dim=-1)
        return torch.einsum("bhwd,nd->bnhw", f, text)

    def encode_decode(crop, img_meta):
        return ref.tcl_generate_masks(crop, dense_logits, PATCH)

    kw = dict(encode_decode=encode_decode, num_classes=text.shape[0])
    with torch.no_grad():
        if rescale:
            return ref.simple_test(x, meta, rescale=True, **kw)[0], ref.slide_inference(x, meta, True, **kw)[0]
        return ref.slide_inference(x, meta, False, **kw)[0]


def test_sliding_logits_and_predictions_match_mmseg_slide_inference_with_tcl_padding():
    model = RandomDenseModel()
    text = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    seg = DenseSegmenter(model.embed01, lambda prompts: text, PATCH, torch.device("cpu"), window=SlidingWindow(),
                         pixel_mean=MEAN)
    names = ["a", "b", "c", "d", "e"]
    for i, (h, w) in enumerate(AWKWARD):
        img = _photo_like(h, w, seed=20 + i)
        with torch.no_grad():
            got = sliding_logits(img, model.embed01, text, PATCH, SlidingWindow(), torch.device("cpu"), MEAN)
            expected = _reference_logits(img, model, text, rescale=False)
        assert got.shape == expected.shape, (h, w)
        assert torch.allclose(got, expected, atol=2e-5), (h, w, (got - expected).abs().max())

        pred = seg.predict(img, names)
        ref_pred, ref_logits = _reference_logits(img, model, text, rescale=True)
        assert pred.shape == (h, w) and pred.dtype == np.int64
        differ = pred != ref_pred
        # Only float-noise ties may differ: where they do, the reference's two best logits are within 1e-4.
        top2 = ref_logits.topk(2, dim=0).values
        margin = (top2[0] - top2[1]).numpy()
        assert differ.mean() < 1e-3 and (margin[differ] < 1e-4).all(), (h, w, differ.sum())


def test_padding_is_tcls_centred_zero_padding_of_the_normalised_image():
    """On an aspect > 4.57 image the windows are shorter than 448 and not multiples of the patch: the project's
    logits equal TCL's (centred, normalised-zero padding) and differ from replicate or bottom-right padding."""
    model = RandomDenseModel(seed=3)
    text = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    img = _photo_like(90, 520, seed=5)           # -> 354 x 2048: windows 354 x 448, 354 % 14 = 4 -> pad 5 + 5
    assert SlidingWindow().resized_hw(90, 520) == (354, 2048)
    with torch.no_grad():
        got = sliding_logits(img, model.embed01, text, PATCH, SlidingWindow(), torch.device("cpu"), MEAN)
        expected = _reference_logits(img, model, text, rescale=False)
        wrong_fill = sliding_logits(img, model.embed01, text, PATCH, SlidingWindow(), torch.device("cpu"))
    assert torch.allclose(got, expected, atol=2e-5)
    assert (wrong_fill - expected).abs().max() > 1e-3      # padding with raw 0 (black) is not TCL's


@pytest.mark.parametrize("src,dst", [((28, 41), (600, 160)), ((32, 64), (500, 1100)), ((448, 600), (97, 101)),
                                     ((3, 5), (20, 30))])
def test_upsampled_argmax_equals_mmseg_resize_softmax_argmax(src, dst):
    g = torch.Generator().manual_seed(sum(src) + sum(dst))
    logits = torch.randn((7,) + src, generator=g)
    expected = ref.resize(logits[None], size=dst, mode="bilinear", align_corners=False, warning=False)
    expected = F.softmax(expected, dim=1).argmax(dim=1)[0]
    whole = upsampled_argmax(logits, dst)
    chunked = upsampled_argmax(logits, dst, max_bytes=2 * dst[0] * dst[1] * 4)   # 2 channels per chunk
    assert torch.equal(whole, expected) and torch.equal(chunked, expected)


def test_upsampled_argmax_chunks_bound_memory(monkeypatch):
    """ADE's 150 classes at Cityscapes' 2048x1024 would need 1.2 GB as one float tensor; chunks stay under the
    budget given (the default, 256 MB, is 32 such channels at a time; here 8 MB for 4 channels of 512x1024)."""
    logits = torch.zeros((30, 8, 16))
    logits[17] = 1.0
    calls = []
    orig = F.interpolate

    def spy(x, *a, **k):
        calls.append(x.shape[1])
        return orig(x, *a, **k)

    monkeypatch.setattr(F, "interpolate", spy)
    out = upsampled_argmax(logits, (512, 1024), max_bytes=8 << 20)
    assert max(calls) * 512 * 1024 * 4 <= 8 << 20 and sum(calls) == 30 and len(calls) == 8
    assert out.shape == (512, 1024) and bool((out == 17).all())


def test_confusion_matrix_metrics_equal_mmseg_total_intersect_and_union():
    rng = np.random.default_rng(0)
    k = 6
    preds, gts = [], []
    for h, w in [(30, 40), (17, 23), (50, 9)]:
        gt = rng.integers(0, k - 1, (h, w))          # class 5 never in the ground truth
        gt[rng.random((h, w)) < 0.2] = 255
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, k - 2, (h, w)))
        pred = np.where(pred == 255, 0, pred)        # class 4 only where gt has it; class 5 never predicted
        preds.append(pred.astype(np.int64))
        gts.append(gt.astype(np.int64))
    cm = ConfusionMatrix(k)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    got = cm.compute()
    totals = ref.total_intersect_and_union(preds, gts, k, 255)
    per_class, summary = ref.total_area_to_metrics(*totals)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(summary[key], abs=1e-9)
    np.testing.assert_allclose(got["IoU"], per_class["IoU"] * 100, equal_nan=True)
    np.testing.assert_allclose(got["Acc"], per_class["Acc"] * 100, equal_nan=True)
    assert np.isnan(got["IoU"][5])


def _coco_tree(root, raw):
    base = root / "coco_stuff164k"
    (base / "images" / "val2017").mkdir(parents=True)
    (base / "annotations" / "val2017").mkdir(parents=True)
    Image.fromarray(np.full(raw.shape + (3,), 90, np.uint8)).save(base / "images" / "val2017" / "000000000139.jpg")
    # mmseg's coco_stuff164k converter output: raw ids through the unmodified table (= TCL's before its rewrite)
    train_ids = ref.convert_to_trainID(raw, ref.COCO_STUFF_CLSID_TO_TRID)
    Image.fromarray(train_ids).save(base / "annotations" / "val2017" / "000000000139_labelTrainIds.png")
    return base


def test_coco_object_equals_tcl_convert_coco_object(tmp_path):
    """Raw COCO-Stuff ids (every thing and stuff id, and 255 unlabelled) -> the project's COCO-Object ground
    truth equals what TCL's convert_coco_object.py writes (things 1..80, stuff and unlabelled 0)."""
    valid = np.array(list(ref.COCO_STUFF_CLSID_TO_TRID), np.uint8)
    raw = np.random.default_rng(0).choice(valid, (24, 40)).astype(np.uint8)
    raw[0, :len(valid) % 40] = valid[:len(valid) % 40]
    _coco_tree(tmp_path, raw)
    expected = ref.convert_to_trainID(raw, ref.coco_object_table())
    got = open_dataset("coco_object", str(tmp_path)).load_gt(0)
    assert np.array_equal(got, expected.astype(np.int64))
    assert (got[raw == 255] == 0).all() and got.max() == 80


# mmseg 0.27 mmseg/datasets/pascal_context.py, PascalContextDataset.CLASSES (Apache-2.0, OpenMMLab)
MMSEG_CONTEXT60 = (
    'background', 'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle',
    'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow', 'cup', 'curtain',
    'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike',
    'mountain', 'mouse', 'person', 'plate', 'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves', 'sidewalk',
    'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck', 'tvmonitor', 'wall', 'water', 'window',
    'wood')


def test_context60_vocabulary_is_mmseg_pascal_context():
    assert tuple(BUILTIN_VOCABULARIES["context60"]) == MMSEG_CONTEXT60
    assert tuple(BUILTIN_VOCABULARIES["context59"]) == MMSEG_CONTEXT60[1:]


def test_context60_scores_as_mmseg_without_reduce_zero_label(tmp_path):
    """The same annotation scored by the project (context60 reader + ConfusionMatrix) and by mmseg's
    intersect_and_union with PascalContextDataset's settings (60 classes, reduce_zero_label=False)."""
    base = tmp_path / "VOCdevkit" / "VOC2010"
    rng = np.random.default_rng(1)
    gt_raw = rng.integers(0, 60, (20, 30)).astype(np.uint8)
    gt_raw[:3] = 255
    for sub, data in (("JPEGImages/2008_000002.jpg", np.full((20, 30, 3), 80, np.uint8)),
                      ("SegmentationClassContext/2008_000002.png", gt_raw)):
        (base / sub).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data).save(base / sub)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    ds = open_dataset("context60", str(tmp_path))
    _, _, gt = ds.load(0)
    pred = rng.integers(0, 60, gt.shape).astype(np.int64)
    cm = ConfusionMatrix(ds.num_classes)
    cm.update(pred, gt)
    _, summary = ref.total_area_to_metrics(*ref.total_intersect_and_union([pred], [gt_raw.astype(np.int64)], 60,
                                                                         255, reduce_zero_label=False))
    assert cm.compute()["mIoU"] == pytest.approx(summary["mIoU"], abs=1e-9)
