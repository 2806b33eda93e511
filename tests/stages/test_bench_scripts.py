"""The benchmark scripts run: bench_gpu.py's CPU smoke path (the GPU figures need a CUDA machine),
bench_flops.py's counting and bench_relabel.py on the tiny architectures."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_bench_gpu_cpu_smoke_run(capsys, one_torch_thread):
    import bench_gpu

    assert bench_gpu.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "not GPU measurements" in out and "tiny (random weights): 2 images (2 ok" in out
    for part in ("CLIP", "SAM encoder", "AMG + 1.1 decoder", "host (decode"):
        assert part in out


def test_bench_flops_structures_add_up():
    from bench_flops import count_parts, structures
    from fmbseg.stage1 import Stage1Config

    cfg = Stage1Config(points_per_side=4, points_per_batch=4)
    c = count_parts("tiny", (64, 80), cfg, n_classes=2)
    assert c.n_crops >= 1 and c.clip_cls_only > 0 and c.clip_crop > 0 and 0 < c.decoder_independent < c.decoder_auto_batch
    s = structures(c, cfg, n_classes=2)
    assert s["stock"]["sam_encoder"] == 2 * s["project"]["sam_encoder"]
    assert s["stock"]["clip"] == s["project"]["clip"] + c.n_crops * c.clip_cls_only
    # 16 + 2 prompts: the minimum shares 17 copies of the prompt-independent projections.
    assert s["project"]["decoder"] - s["minimum"]["decoder"] == 17 * c.decoder_independent
    # The decoder's FLOPs are linear in the prompts: 4 batches of 4 single-point prompts + the 1.1 call.
    assert s["project"]["decoder"] == 4 * c.decoder_auto_batch + c.decoder_points_call


def test_bench_relabel_tiny_smoke_run(capsys, tmp_path):
    import bench_relabel

    assert bench_relabel.main(["--preset", "tiny", "--images", "1", "--size", "96", "128", "--points-per-side", "4",
                               "--device", "cpu", "--check"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "relabel output identical to it: True" in out
    for part in ("full label", "relabel ", "speed-up", "storage per image", "store by array", "dense"):
        assert part in out
