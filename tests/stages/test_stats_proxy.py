"""The label-noise proxy of `fmbseg stats` against the truth: on a synthetic world whose CLIP-oracle confuses
pairs of classes to different degrees, the per-class agreement must rank classes as their true pseudo-label IoU
(label maps vs the world's ground truth, over labelled pixels) does. scripts/validate_stats_proxy.py runs the same
measurement over several seeds and prints the per-class table (README, "Label quality without ground truth").

Measured with the script (24 images of 256 x 352): Spearman 0.82, 0.33, 0.76, 0.80, 0.77 on seeds 0-4. This test
runs seed 0; seed 1 falls short because of the proxy's known blind spot (a pair CLIP cannot tell apart at all is
flipped alike by both stages), which the README states."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "validate_stats_proxy.py"


def load_script():
    spec = importlib.util.spec_from_file_location("validate_stats_proxy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_ranks_classes_like_true_iou(tmp_path, one_torch_thread):
    from stages import models_cache

    v = load_script()
    before = dict(models_cache._MODELS)
    r = v.measure(tmp_path, n_images=24, seed=0)
    # the confusable oracle was only borrowed: the process-wide cache is as it was
    assert models_cache._MODELS == before
    by_name = {c["name"]: c for c in r["stats"]["classes"]}
    true = dict(zip(r["stats"]["vocabulary"], r["true_iou"]))
    print({n: (round(true[n], 3), by_name[n]["agreement"]) for n in v.CLASSES}, r["spearman"])
    assert r["spearman"]["agreement"] >= 0.7
    # the clean classes (no similar colour) keep agreement and true IoU high
    for name in ("blue", "white"):
        assert true[name] > 0.9 and by_name[name]["agreement"] > 0.9
    # the worst class by agreement is the worst by truth: orange, of the indistinguishable pair
    ranked = sorted(v.CLASSES, key=lambda n: by_name[n]["agreement"])
    assert ranked[0] == min(v.CLASSES, key=lambda n: true[n]) == "orange"
    # a confusable pair is named as such by the no-ground-truth report
    assert {by_name["orange"]["confused_with"], by_name["yellow"]["confused_with"]} & {"orange", "yellow"}
    assert np.isfinite(r["true_iou"][[by_name[n]["class_id"] for n in v.CLASSES]]).all()
