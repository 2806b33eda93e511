"""Benchmark `fmbseg relabel` against a full `fmbseg label`, and the relabel store's storage cost (issue 12).

Full-width `base` architectures (CLIP ViT-B/16, SAM ViT-B) with seeded random weights (no download; the work per
image is the real one), a few synthetic-world images, through the real shard runner and storage:
1. label the images with the source vocabulary and `relabel_store=True` (timed: the full label time);
2. relabel that campaign with another vocabulary (timed: the relabel time);
3. with `--check`, also label the images in full with the new vocabulary (timed too) and check that the two
   campaigns' tables and label maps are identical.
Prints both times, their ratio (target >= 20x) and, per image, the bytes of the relabel store by array next to the
image's Parquet + Zarr bytes (target <= 25 %).

    .venv/bin/python scripts/bench_relabel.py --images 2 --size 480 640
    .venv/bin/python scripts/bench_relabel.py --images 2 --size 240 320 --points-per-side 16 --check
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmbseg.device import resolve_device  # noqa: E402
from fmbseg.presets import make_clip, make_sam  # noqa: E402
from fmbseg.testing.world import write_world  # noqa: E402
from stages import models_cache  # noqa: E402
from stages.label import LabelConfig, run_label  # noqa: E402
from stages.relabel import RelabelConfig, run_relabel  # noqa: E402

SOURCE_VOCAB = "red,green,blue,yellow,magenta,cyan,orange,purple"
NEW_VOCAB = "red,blue,yellow,cyan,gray,brown,white,black,crimson"  # removed, kept and added classes


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def store_breakdown(campaign: Path) -> dict[str, int]:
    """Bytes of the relabel store by array name (values + shape table + metadata), over every shard."""
    out: dict[str, int] = {}
    for shard in (campaign / "relabel.zarr").iterdir():
        if shard.is_dir():
            for arr in shard.iterdir():
                if arr.is_dir():
                    out[arr.name] = out.get(arr.name, 0) + _bytes(arr)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def same_outputs(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq
    import zarr

    for t in ("images", "masks"):
        if not pq.read_table(a / t).equals(pq.read_table(b / t)):
            return False
    for g in (a / "labels.zarr").iterdir():
        if g.is_dir():
            za, zb = zarr.open_group(g, mode="r"), zarr.open_group(b / "labels.zarr" / g.name, mode="r")
            if not np.array_equal(za["label"][:], zb["label"][:]):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2, help="number of world images (default 2)")
    ap.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"), help="image size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default="base", choices=("base", "tiny"),
                    help="architectures, random weights (default base: full width; tiny: a quick smoke run)")
    ap.add_argument("--points-per-side", type=int, default=32, help="Stage-1.2 grid (default 32, DESIGN §1)")
    ap.add_argument("--keep-filters", action="store_true",
                    help="keep the default IoU/stability filters (random weights then leave few masks; by default "
                    "they are 0 so the tables hold a realistic number of masks, as in bench_stage1.py)")
    ap.add_argument("--check", action="store_true", help="also label in full with the new vocabulary and compare")
    ap.add_argument("--workdir", help="keep the world and campaigns here (default: a temporary directory)")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fmbseg-bench-relabel-"))
    try:
        write_world(work / "world", args.images, seed=0, sizes=(tuple(args.size),), formats=("jpg", "png"))
        t = time.perf_counter()
        clip = make_clip(args.preset, device, random_init=True)
        sam = make_sam(args.preset, device, random_init=True)
        print(f"built {clip.model_id} + {sam.model_id} (random init) on {device} in {time.perf_counter() - t:.1f} s")
        models_cache.register_models(args.preset, device, clip, sam)
        stage1 = {"points_per_side": args.points_per_side}
        if not args.keep_filters:
            stage1.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
        common = dict(images=str(work / "world" / "images"), preset=args.preset, device=str(device), stage1=stage1,
                      relabel_store=True)
        t = time.perf_counter()
        s = run_label(LabelConfig(vocab=SOURCE_VOCAB, campaign=str(work / "c"), **common), progress=False)
        t_label = time.perf_counter() - t
        t = time.perf_counter()
        r = run_relabel(RelabelConfig(campaign=str(work / "c"), vocab=NEW_VOCAB, out=str(work / "c2"),
                                      device=str(device)), progress=False)
        t_relabel = time.perf_counter() - t
        t_full = None
        if args.check:
            t = time.perf_counter()
            run_label(LabelConfig(vocab=NEW_VOCAB, campaign=str(work / "full"), **common), progress=False)
            t_full = time.perf_counter() - t
            same = same_outputs(work / "c2", work / "full")

        n = max(s["ok"], 1)
        c = work / "c"
        store = _bytes(c / "relabel.zarr")
        today = {k: _bytes(c / k) for k in ("images", "masks", "labels.zarr")}
        breakdown = store_breakdown(c)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{s['ok']} images {args.size[0]}x{args.size[1]}, device {device}, points_per_side={args.points_per_side}, "
          f"filters {'default' if args.keep_filters else 'at 0'}; {s['masks']} masks (source vocabulary, "
          f"{len(SOURCE_VOCAB.split(','))} classes), {r['masks']} masks (new vocabulary, "
          f"{len(NEW_VOCAB.split(','))} classes)")
    print(f"full label    {t_label:8.2f} s  ({t_label / n:.2f} s/image; timings {s['timings']})")
    if t_full is not None:
        print(f"full label, new vocabulary {t_full:8.2f} s; relabel output identical to it: {same}")
    print(f"relabel       {t_relabel:8.2f} s  ({t_relabel / n:.2f} s/image; timings {r['timings']}; "
          f"{r['new_sam_passes']} new SAM passes)")
    print(f"speed-up      {t_label / t_relabel:8.1f}x  (target >= 20x)")
    per_today = sum(today.values()) / n
    print(f"\nstorage per image: relabel store {store / n / 2**20:.2f} MiB vs Parquet + Zarr today "
          f"{per_today / 2**20:.3f} MiB ({', '.join(f'{k} {v / n / 2**10:.1f} KiB' for k, v in today.items())})")
    print(f"store / today {100 * store / max(sum(today.values()), 1):8.0f} %  (target <= 25 %)")
    print("store by array, per image: " + ", ".join(f"{k} {v / n / 2**10:.1f} KiB" for k, v in breakdown.items()))
    return 0 if t_full is None or same else 1


if __name__ == "__main__":
    sys.exit(main())
