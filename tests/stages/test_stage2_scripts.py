"""The Stage-2 experiment scripts run end to end on a tiny world: scripts/stage2_acceptance.py (label, train and
eval through the CLI, one line per seed) and scripts/stage2_diagnose.py on what it leaves behind."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_acceptance_and_diagnosis_scripts_run(tmp_path, capsys):
    import stage2_acceptance
    import stage2_diagnose

    code = stage2_acceptance.main(["--seeds", "5", "--root", str(tmp_path), "--train-images", "4", "--eval-images",
                                   "2", "--train-args", "--epochs 2 --train-size 56", "--json",
                                   str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and row["seed"] == 5 and 0 <= row["mIoU"] <= 100   # 2 epochs cannot reach 85 %: FAIL, exit 1
    assert f"seed 5: fmbseg mIoU {row['mIoU']:.2f} %" in out and "FAIL" in out and "2 epochs (as asked)" in out
    report = json.loads((tmp_path / "seed5" / "report" / "results.json").read_text())
    assert report["results"]["custom:eval-world"]["fmbseg"]["mIoU"] == pytest.approx(row["mIoU"])
    assert row["train_cpu"] > 0 and row["train_wall"] > 0

    assert stage2_diagnose.main([str(tmp_path / "seed5")]) == 0
    out = capsys.readouterr().out
    assert "1. pseudo-labels (56 px view)" in out and "held-out patch mIoU" in out and "cos(centroid, anchor)" in out
