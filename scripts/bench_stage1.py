"""Benchmark Stage 1 at campaign level: where does a labelled image's time go?

Full-width `base` architectures (CLIP ViT-B/16, SAM ViT-B) with seeded random weights (no download needed; the
work per image is the real one, only the masks are meaningless), default Stage-1 settings, a few synthetic-world
images, through the real shard runner and storage. Prints the time split per image (decode, CLIP, SAM encoder,
SAM decoder, labeling/merge, storage) and the share of storage + bookkeeping (target < 10%).

    .venv/bin/python scripts/bench_stage1.py --images 3 --device auto
    .venv/bin/python scripts/bench_stage1.py --images 2 --points-per-side 16 --no-warmup   # a busy 2-core CPU
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmbseg.device import resolve_device  # noqa: E402
from fmbseg.presets import make_clip, make_sam  # noqa: E402
from fmbseg.testing.world import write_world  # noqa: E402
from stages import models_cache  # noqa: E402
from stages.label import LabelConfig, run_label  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3, help="number of world images (default 3)")
    ap.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"), help="image size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--points-per-side", type=int, default=32, help="Stage-1.2 grid (default 32, DESIGN §1)")
    ap.add_argument("--keep-filters", action="store_true",
                    help="keep the default IoU/stability filters (random weights then leave few masks to store; "
                         "by default the filters are set to 0 so storage handles a realistic number of masks)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the one-image warm-up campaign")
    ap.add_argument("--workdir", help="keep the world and campaign here (default: a temporary directory)")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fmbseg-bench-"))
    try:
        write_world(work / "world", args.images, seed=0, sizes=(tuple(args.size),), formats=("jpg", "png"))
        write_world(work / "warm", 1, seed=1, sizes=(tuple(args.size),))
        t = time.perf_counter()
        clip = make_clip("base", device, random_init=True)
        sam = make_sam("base", device, random_init=True)
        print(f"built {clip.model_id} + {sam.model_id} (random init) on {device} in {time.perf_counter() - t:.1f} s")
        models_cache.register_models("base", device, clip, sam)
        stage1 = {"points_per_side": args.points_per_side}
        if not args.keep_filters:
            stage1.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
        cfg = LabelConfig(images=str(work / "world" / "images"), vocab=str(work / "world" / "classes.txt"),
                          campaign=str(work / "campaign"), preset="base", shard_size=args.shard_size,
                          device=str(device), stage1=stage1)
        # Warm-up on a throwaway one-image campaign (first-call allocations, lazy inits), then the measured run.
        if not args.no_warmup:
            run_label(LabelConfig(**{**cfg.__dict__, "images": str(work / "warm" / "images"),
                                     "campaign": str(work / "warmup")}), progress=False)
        t = time.perf_counter()
        s = run_label(cfg, progress=False)
        wall = time.perf_counter() - t
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    n = max(s["images"], 1)
    tm = dict(s["timings"])
    bookkeeping = max(wall - sum(tm.values()), 0.0)  # planning, campaign.json, done checks, progress
    rows = [("decode", tm["decode"]), ("CLIP (crops + dense)", tm["clip"]), ("SAM encoder", tm["sam_encoder"]),
            ("SAM decoder (1.1 points + 1.2 auto)", tm["sam_decoder"]), ("labeling / merge", tm["labeling"]),
            ("storage (RLE, Parquet, Zarr, marker)", tm["storage"]), ("bookkeeping (plan, manifest, checks)", bookkeeping)]
    print(f"\n{s['images']} images {args.size[0]}x{args.size[1]}, {s['masks']} masks, "
          f"points_per_side={args.points_per_side}, filters {'default' if args.keep_filters else 'at 0'}, "
          f"device {device}, wall {wall:.2f} s")
    print(f"{'step':40} {'s/image':>9} {'share':>7}")
    for name, v in rows:
        print(f"{name:40} {v / n:9.3f} {100 * v / wall:6.1f}%")
    print(f"{'total':40} {wall / n:9.3f} {100.0:6.1f}%")
    share = 100 * (tm["storage"] + bookkeeping) / wall
    print(f"\nstorage + bookkeeping: {share:.1f}% of the total (target < 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
