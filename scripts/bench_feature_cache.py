"""Benchmark (not a test): Stage-2 epoch time with the DINOv2 feature cache vs recomputing the features.

Full-width DINOv2 `base` architecture (ViT-B/14) with seeded random weights, so nothing is downloaded. One run,
same data for both: a synthetic-world campaign labelled with the `oracle` preset (real label maps, cheap), then
`stages.train.train_alignment` twice with the same settings, once recomputing DINOv2 every epoch and once with
`cache_features` (epoch 1 computes and writes `features/<key>.zarr`, later epochs read it). Per-epoch times come
from the training loop's end-of-epoch hook: the epoch's features + training steps (what the cache changes),
without the per-epoch checkpoint write, which a few-image benchmark would otherwise over-weight; the wall time
with the write is printed too. The ratio compares recomputing epochs with cached epochs 2+.

    .venv/bin/python scripts/bench_feature_cache.py --images 10 --epochs 3 --device auto
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10, help="campaign images (default 10)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run, at least 2 (default 3)")
    ap.add_argument("--train-size", type=int, default=448, help="Stage-2 view size (default 448, DESIGN)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dino-preset", default="base", choices=("base", "paper"),
                    help="DINOv2 architecture: base (ViT-B/14, the issue's setting) or paper (ViT-L/14)")
    ap.add_argument("--workdir", default=None, help="where to write the campaign (default: a temp folder)")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be >= 2: the cache is read from the second epoch on")

    from fmbseg.device import resolve_device
    from fmbseg.presets import make_clip, make_dino
    from fmbseg.testing.world import write_world
    from stages.label import LabelConfig, run_label
    from stages.train import TrainConfig, train_alignment

    device = resolve_device(args.device)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_cache_")
    write_world(os.path.join(work, "world"), args.images, seed=0)
    run_label(LabelConfig(images=os.path.join(work, "world", "images"),
                          vocab=os.path.join(work, "world", "classes.txt"), campaign=os.path.join(work, "camp"),
                          preset="oracle", device="cpu"), progress=False)

    dino = make_dino(args.dino_preset, device=device, random_init=True)
    clip = make_clip("oracle", device=device)       # text anchors only; the DINOv2 pass is what is measured
    print(f"device {device}; DINOv2 {dino.model_id} (C={dino.embed_dim}); {args.images} images at "
          f"{args.train_size}px; {args.epochs} epochs per run", flush=True)

    def run(cache: bool) -> tuple[list[float], list[float]]:
        times: list[float] = []
        walls: list[float] = []
        clock = [time.perf_counter()]

        def tick(epoch: int, path: str, stats: dict) -> None:
            now = time.perf_counter()
            times.append(stats["seconds"])
            walls.append(now - clock[0])
            clock[0] = now

        cfg = TrainConfig(epochs=args.epochs, train_size=args.train_size, cache_features=cache, device=str(device))
        clock[0] = time.perf_counter()
        train_alignment(os.path.join(work, "camp"), cfg, out=os.path.join(work, f"cache{int(cache)}.pt"),
                        on_epoch_end=tick, progress=False, dino=dino, clip=clip)
        return times, walls

    plain, plain_wall = run(cache=False)
    cached, cached_wall = run(cache=True)
    print("epoch seconds, recomputing:   " + "  ".join(f"{t:.2f}" for t in plain)
          + "   with checkpoint write: " + "  ".join(f"{t:.2f}" for t in plain_wall))
    print("epoch seconds, feature cache: " + "  ".join(f"{t:.2f}" for t in cached)
          + "   with checkpoint write: " + "  ".join(f"{t:.2f}" for t in cached_wall) + "  (epoch 1 writes the cache)")
    mean_plain = sum(plain) / len(plain)
    mean_cached = sum(cached[1:]) / len(cached[1:])
    print(f"recompute {mean_plain:.3f} s/epoch, cached epochs 2+ {mean_cached:.3f} s/epoch: "
          f"{mean_plain / mean_cached:.1f}x faster (target >= 5x); first cached epoch {cached[0] / mean_plain:.2f}x "
          "a recomputing epoch")


if __name__ == "__main__":
    main()
