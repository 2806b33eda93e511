"""mIoU / mAcc / aAcc against a hand-computed example (ignore pixels, a class absent from everything, a class
only predicted) and the mmsegmentation conventions."""

import math

import numpy as np
import pytest

from fmbseg.metrics import ConfusionMatrix


def test_hand_computed_two_images():
    cm = ConfusionMatrix(num_classes=4, ignore_index=255)
    # image 1                         # image 2
    gt1 = np.array([[0, 0, 1], [1, 255, 255]])
    pr1 = np.array([[0, 1, 1], [1, 3, 0]])      # the two ignored pixels' predictions must not count
    gt2 = np.array([[0, 1], [1, 255]])
    pr2 = np.array([[0, 0], [3, 2]])
    cm.update(pr1, gt1)
    cm.update(pr2, gt2)
    r = cm.compute()
    # valid pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) | (0,0) (1,0) (1,3)
    # class 0: inter 2, gt 3, pred 3 -> IoU 2/4, Acc 2/3
    # class 1: inter 2, gt 4, pred 3 -> IoU 2/5, Acc 2/4
    # class 2: never in gt, never predicted on a valid pixel -> union 0 -> nan, Acc nan
    # class 3: gt 0, pred 1 -> IoU 0/1 = 0, Acc nan
    assert r["IoU"][0] == pytest.approx(50.0)
    assert r["IoU"][1] == pytest.approx(40.0)
    assert math.isnan(r["IoU"][2])
    assert r["IoU"][3] == pytest.approx(0.0)
    assert r["mIoU"] == pytest.approx((50 + 40 + 0) / 3)
    assert r["Acc"][0] == pytest.approx(100 * 2 / 3) and r["Acc"][1] == pytest.approx(50.0)
    assert math.isnan(r["Acc"][2]) and math.isnan(r["Acc"][3])
    assert r["mAcc"] == pytest.approx((100 * 2 / 3 + 50) / 2)
    assert r["aAcc"] == pytest.approx(100 * 4 / 7)
    print(f"hand example: mIoU={r['mIoU']:.2f} mAcc={r['mAcc']:.2f} aAcc={r['aAcc']:.2f}")


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 6, (5, 7)) for _ in range(3)]
    preds = [rng.integers(0, 6, (5, 7)) for _ in range(3)]
    for g in gts:
        g[0, :3] = 255
    a, b = ConfusionMatrix(6), ConfusionMatrix(6)
    for p, g in zip(preds, gts):
        a.update(p, g)
    b.update(np.concatenate(preds), np.concatenate(gts))
    assert np.array_equal(a.matrix, b.matrix)
    assert a.compute()["mIoU"] == b.compute()["mIoU"]


def test_perfect_prediction_and_errors():
    cm = ConfusionMatrix(3)
    gt = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    cm.update(gt.astype(np.int64) % 255, gt)
    r = cm.compute()
    assert r["mIoU"] == 100.0 and r["aAcc"] == 100.0
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="ground truth has labels \\[7\\]"):
        cm.update(np.zeros((1, 2)), np.array([[0, 7]]))
    with pytest.raises(ValueError, match="prediction has labels"):
        cm.update(np.array([[0, 3]]), np.array([[0, 1]]))
