"""`fmbseg demo`: the synthetic world it writes, its argument checks, and a small end-to-end run through the
session's Prefect server (the command uses the server PREFECT_API_URL names)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from flows.demo import DEMO_SIZES, DemoLayout, write_demo_world


def test_demo_world_is_written_once_with_a_disjoint_eval_set(tmp_path):
    layout = write_demo_world(str(tmp_path / "demo"), train_images=3, eval_images=2, seed=0)
    assert layout == DemoLayout.under(str(tmp_path / "demo"))
    train = sorted(os.listdir(layout.train_images))
    evals = sorted(os.listdir(layout.eval_images))
    assert (len(train), len(evals)) == (3, 2)
    assert open(layout.vocab).read().split() == open(os.path.join(layout.eval_root, "classes.txt")).read().split()
    for name in evals:  # same file names, other pictures: the evaluation images are not training images
        a = np.asarray(Image.open(os.path.join(layout.train_images, name)))
        b = np.asarray(Image.open(os.path.join(layout.eval_images, name)))
        assert a.shape != b.shape or not np.array_equal(a, b)
    for name in train:
        h, w = np.asarray(Image.open(os.path.join(layout.train_images, name))).shape[:2]
        assert (h, w) in DEMO_SIZES and 256 <= min(h, w) and max(h, w) <= 480

    mtimes = {n: os.stat(os.path.join(layout.train_images, n)).st_mtime_ns for n in train}
    write_demo_world(str(tmp_path / "demo"), train_images=3, eval_images=2, seed=0)
    assert {n: os.stat(os.path.join(layout.train_images, n)).st_mtime_ns for n in train} == mtimes
    with pytest.raises(ValueError, match="another size"):
        write_demo_world(str(tmp_path / "demo"), train_images=5, eval_images=2, seed=0)


def test_demo_rejects_bad_sizes(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--train-images", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fmbseg demo: error: --train-images and --eval-images must be >= 1"
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_demo_command_end_to_end(prefect_server, tmp_path):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--out", str(out), "--train-images", "6", "--eval-images", "2",
         "--epochs", "2", "--device", "cpu"],
        env=prefect_server.env(), capture_output=True, text=True, timeout=300,
    )
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout
    print(f"\nfmbseg demo (6 + 2 images, 2 epochs) in {seconds:.1f} s:\n{text}")
    assert f"using the Prefect server at {prefect_server.api_url}" in res.stderr
    for model in ("maskclip", "fmbseg", "stage1.1", "stage1.2"):
        assert f"| {model} " in text
    layout = DemoLayout.under(str(out))
    ckpt = next(line.split()[1] for line in text.splitlines() if line.startswith("checkpoint"))
    assert os.path.isfile(ckpt) and ckpt.startswith(layout.campaign)
    assert os.path.isfile(os.path.join(layout.report, "results.md"))
    assert f"report       {os.path.join(layout.report, 'results.md')}" in text
    assert len([n for n in os.listdir(layout.overlays) if n.endswith("_overlay.jpg")]) == 2
    assert os.path.isdir(os.path.join(layout.campaign, "masks"))
