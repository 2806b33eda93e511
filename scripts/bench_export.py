"""Benchmark (not a test): export throughput per format, and export time as a share of labeling time.

One run: a synthetic world of `--images` images is labelled with the `tiny` preset (random-weight toy models on
the real code paths, CPU) into a fresh campaign, timing `run_label`; then the campaign is exported as `coco`,
`png` (symlinked images) and `hf`, each into a fresh folder, timing `run_export`. Printed: images/s per format and
export seconds / labeling seconds (target: <= 5 %). Model building is excluded from the labeling time (models are
built once before the clock starts), so the ratio is conservative. Measured on a shared machine the absolute
figures are noisy; the ratio is taken within one run.

    .venv/bin/python scripts/bench_export.py --images 200
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
    ap.add_argument("--images", type=int, default=200, help="campaign images (default 200)")
    ap.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"),
                    help="image size (default 240 320, the world's first default size)")
    ap.add_argument("--preset", default="tiny", help="labeling preset (default tiny)")
    ap.add_argument("--shard-size", type=int, default=50, help="images per shard (default 50)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from fmbseg.testing.world import write_world
    from stages import models_cache
    from stages.export import run_export
    from stages.label import LabelConfig, run_label

    tmp = args.keep or tempfile.mkdtemp(prefix="bench-export-")
    world, campaign = os.path.join(tmp, "world"), os.path.join(tmp, "campaign")
    write_world(world, args.images, seed=0, sizes=(tuple(args.size),), formats=("jpg",))
    models_cache.get_models(args.preset, "cpu", "maskclip")  # build once, outside the clock
    cfg = LabelConfig(images=os.path.join(world, "images"), vocab=os.path.join(world, "classes.txt"),
                      campaign=campaign, preset=args.preset, device="cpu", shard_size=args.shard_size)
    t0 = time.perf_counter()
    summary = run_label(cfg, progress=False)
    label_s = time.perf_counter() - t0
    n = summary.get("images_ok", args.images)
    print(f"labeling: {args.images} images {args.size[0]}x{args.size[1]}, preset {args.preset}, "
          f"{label_s:.1f} s ({args.images / label_s:.2f} images/s)")
    print(f"{'format':8} {'seconds':>8} {'images/s':>9} {'% of labeling':>14}")
    for fmt in ("coco", "png", "hf"):
        t0 = time.perf_counter()
        s = run_export(campaign, fmt, os.path.join(tmp, f"export-{fmt}"), progress=False)
        sec = time.perf_counter() - t0
        print(f"{fmt:8} {sec:8.2f} {s['images'] / sec:9.1f} {100 * sec / label_s:13.2f}%")
    print(f"(campaign: {n} ok images, {summary.get('masks', '?')} masks; work folder {tmp})")


if __name__ == "__main__":
    main()
