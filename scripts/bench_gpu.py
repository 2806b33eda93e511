"""Stage-1 throughput on a CUDA machine: images/s, ms per part, GPU utilisation, peak memory, fraction of the FLOP
ideal, for the `paper` and `base` architectures.

Runs the real labeling path (`run_label`: the pipelined loop of stages/label_pipeline.py, bf16 autocast on CUDA)
over N synthetic-world images (or a folder of yours with --images-dir), after a warm-up campaign that is not
counted. Weights: the preset's real checkpoints when they are present locally, else seeded random weights (the
work per image is the same; with random weights the IoU/stability filters are set to 0, as in bench_stage1.py, so
a realistic number of masks reaches storage). The FLOP ideal is bench_flops.py's counted FLOPs of the project's
structure per image divided by the GPU's bf16 dense peak (a table of known GPUs, else a measured bf16 matmul rate).

    bash scripts/bench_gpu.sh                        # fresh CUDA machine: sets up .venv, then this script
    python scripts/bench_gpu.py --images 64 --presets paper
    python scripts/bench_gpu.py --device cpu --quick # CPU smoke run (tiny preset, 2 small images)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

# bf16 dense tensor-core peaks (FLOP/s, no sparsity) of common GPUs, from the vendors' data sheets.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "L40": 181e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "B200": 2250e12}


def bf16_peak(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, how it was found): the data-sheet peak of a known GPU, else a measured large bf16 matmul rate."""
    if device.type != "cuda":
        return float("nan"), "no GPU"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK.items():
        if key in name:
            return peak, f"{name} data sheet"
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize(device)
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - t), f"{name} measured bf16 matmul"


class UtilSampler:
    """GPU utilisation (%) sampled every 0.2 s while running: torch.cuda.utilization (pynvml), else nvidia-smi."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:
            pass
        try:
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  f"--id={idx}"], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        except Exception:
            return None

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            v = self._read()
            if v is not None:
                self.samples.append(v)

    def __enter__(self):
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def build_models(preset: str, device: torch.device):
    """The preset's models: real weights when present locally, else seeded random weights -> (clip, sam, real?)."""
    from fmbseg.presets import make_clip, make_sam

    if preset == "tiny":  # seeded random by definition; shared with this process's other users
        from stages import models_cache

        return (*models_cache.get_models(preset, device), False)
    import os

    old = os.environ.get("FMBSEG_OFFLINE")
    os.environ["FMBSEG_OFFLINE"] = "1"  # local checkpoints only: a multi-GB download would blow the time budget
    try:
        return make_clip(preset, device), make_sam(preset, device), True
    except Exception as e:  # no local checkpoint: the architectures with random weights
        print(f"  {preset}: no local weights ({type(e).__name__}); seeded random weights")
        return make_clip(preset, device, random_init=True), make_sam(preset, device, random_init=True), False
    finally:
        if old is None:
            os.environ.pop("FMBSEG_OFFLINE", None)
        else:
            os.environ["FMBSEG_OFFLINE"] = old


def bench_preset(preset: str, device: torch.device, images_dir: Path, warm_dir: Path, work: Path, args) -> dict:
    from bench_flops import flops_per_image
    from stages import models_cache
    from stages.label import LabelConfig, build_stage1_config, run_label
    from stages.label_pipeline import ExecutionConfig

    t = time.perf_counter()
    clip, sam, real = build_models(preset, device)
    print(f"  {preset}: built {clip.model_id} + {sam.model_id} on {device} in {time.perf_counter() - t:.1f} s")
    models_cache.register_models(preset, device, clip, sam)
    stage1 = {} if real or preset == "tiny" else {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    if args.points_per_side:
        stage1["points_per_side"] = args.points_per_side
    execution = ExecutionConfig(sam_batch=args.sam_batch, prefetch=args.prefetch, host_workers=args.host_workers)

    def cfg(images: Path, name: str) -> LabelConfig:
        return LabelConfig(images=str(images), vocab=args.vocab or str(images.parent / "classes.txt"),
                           campaign=str(work / f"{preset}-{name}"), preset=preset, device=str(device),
                           shard_size=args.shard_size, stage1=stage1, execution=execution)

    run_label(cfg(warm_dir, "warmup"), progress=False)  # lazy inits, cuDNN/cuBLAS autotuning, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with UtilSampler(device) as util:
        t = time.perf_counter()
        s = run_label(cfg(images_dir, "run"), progress=False)
        wall = time.perf_counter() - t
    n = max(s["images"], 1)
    tm = s["timings"]
    from PIL import Image

    first = next(p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in (".jpg", ".png", ".jpeg"))
    w, h = Image.open(first).size
    flops = sum(flops_per_image(preset, (h, w), build_stage1_config(preset, stage1))["project"].values())
    pipe = s.get("pipeline") or {}
    return {
        "preset": preset, "weights": "real" if real else "random", "images": s["images"], "ok": s["ok"],
        "masks": s["masks"], "wall": wall, "images_per_s": n / wall,
        "ms": {"CLIP": tm["clip"], "SAM encoder": tm["sam_encoder"], "AMG + 1.1 decoder": tm["sam_decoder"],
               "host (decode, resize, pool, merge, RLE, commit)":
                   tm["decode"] + tm["prepare"] + tm["labeling"] + tm["storage"]},
        "gpu_util": util.mean(),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        "flops_per_image": flops,
        "gpu_wait_host": pipe.get("model_wait_host", 0.0) / pipe["wall"] if pipe.get("wall") else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--presets", nargs="+", default=None, help="default: paper base (--quick: tiny)")
    ap.add_argument("--images", type=int, default=48, help="synthetic images per preset (default 48)")
    ap.add_argument("--images-dir", help="a folder of your images instead of synthetic ones (give --vocab)")
    ap.add_argument("--vocab", help="vocabulary for --images-dir (names, file or built-in)")
    ap.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    ap.add_argument("--points-per-side", type=int, default=None, help="Stage-1.2 grid (default: the preset's)")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--sam-batch", type=int, default=None)
    ap.add_argument("--prefetch", type=int, default=8)
    ap.add_argument("--host-workers", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 2 images of 64x80")
    args = ap.parse_args(argv)
    if args.quick:
        args.presets = args.presets or ["tiny"]
        args.images, args.size = 2, (64, 80)
    presets = args.presets or ["paper", "base"]

    from fmbseg.device import resolve_device
    from fmbseg.testing.world import write_world

    device = resolve_device(args.device)
    if device.type != "cuda":
        print(f"device {device}: no GPU; the figures below are a CPU smoke run, not GPU measurements")
    peak, peak_src = bf16_peak(device)
    work = Path(tempfile.mkdtemp(prefix="fmbseg-bench-gpu-"))
    rows = []
    try:
        size = tuple(args.size)
        if args.images_dir:
            images_dir = Path(args.images_dir)
            if not args.vocab:
                raise SystemExit("--images-dir needs --vocab")
        else:
            write_world(work / "world", args.images, seed=0, sizes=(size,), formats=("jpg", "png"))
            images_dir = work / "world" / "images"
        write_world(work / "warm", 1 if args.quick else 2, seed=1, sizes=(size,), formats=("jpg",))
        for preset in presets:
            rows.append(bench_preset(preset, device, images_dir, work / "warm" / "images", work, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ndevice {device}" + (f" ({torch.cuda.get_device_name(device)}), bf16 peak {peak / 1e12:.0f} TFLOP/s "
                                  f"({peak_src})" if device.type == "cuda" else ""))
    for r in rows:
        n = max(r["images"], 1)
        ideal = peak / r["flops_per_image"] if peak == peak else float("nan")
        print(f"\n{r['preset']} ({r['weights']} weights): {r['images']} images ({r['ok']} ok, {r['masks']} masks) in "
              f"{r['wall']:.1f} s -> {r['images_per_s']:.2f} images/s")
        for k, v in r["ms"].items():
            print(f"  {k:48} {1e3 * v / n:9.1f} ms/image")
        util = f"{r['gpu_util']:.0f} %" if r["gpu_util"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        wait = f"{100 * r['gpu_wait_host']:.0f} %" if r["gpu_wait_host"] is not None else "n/a"
        print(f"  GPU utilisation {util}, peak memory {mem}, model lane waiting for host {wait}")
        print(f"  {r['flops_per_image'] / 1e12:.2f} TFLOP/image counted -> FLOP ideal {ideal:.1f} images/s; "
              f"reached {r['images_per_s'] / ideal:.1%}" if ideal == ideal else
              f"  {r['flops_per_image'] / 1e12:.3f} TFLOP/image counted (no GPU: no FLOP ideal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
