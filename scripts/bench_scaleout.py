"""Benchmark scale-out on Ray: one campaign labelled by the stage alone, the local runner, and Ray with 1 and 2
worker processes (prefect-ray's RayTaskRunner); what do Prefect and Ray cost per shard?

The `tiny` preset (seeded random toy models, offline), 64-image shards of small synthetic-world images, one CPU
thread per worker. Each run labels a fresh campaign; the Ray runs start their own local Ray instance on
127.0.0.1 (`num_cpus` = workers, 1 CPU per shard, so that many shards run at once) and the flows report to a
temporary Prefect server on 127.0.0.1. Prints, per run: wall time and images/s end to end (Ray runs: Ray start,
worker start and model load included), images/s over the labelling span (first shard start to last shard end),
the 2-worker / 1-worker ratio, and the per-shard overhead of Prefect + Ray: the median gap between one worker's
consecutive shards (task submission, Prefect task-run bookkeeping, Ray dispatch), as a share of a shard's wall
time. Run on an idle machine for meaningful numbers (other processes on the cores make every run noisy).

    .venv/bin/python scripts/bench_scaleout.py --shards 4 --shard-size 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fmbseg.testing.world import write_world  # noqa: E402
from flows.server import client_settings, local_server  # noqa: E402
from stages import models_cache  # noqa: E402
from stages.label import LabelConfig, run_label  # noqa: E402


def gaps(results: list[dict]) -> list[float]:
    """Idle seconds between consecutive shards of the same worker process."""
    by_pid: dict[int, list[dict]] = {}
    for r in results:
        by_pid.setdefault(r["pid"], []).append(r)
    out = []
    for rs in by_pid.values():
        rs.sort(key=lambda r: r["started"])
        out += [b["started"] - a["finished"] for a, b in zip(rs, rs[1:])]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4, help="shards in the campaign (default 4)")
    ap.add_argument("--shard-size", type=int, default=64, help="images per shard (default 64)")
    ap.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"), help="image size")
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # The Ray instances here are loopback-only and short-lived: no token authentication (a new local Ray 2.60
    # instance would otherwise generate and keep a token in ~/.ray that later `ray start`s pick up).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    tmp = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    n = args.shards * args.shard_size
    write_world(tmp / "world", n, seed=7, sizes=(tuple(args.size),))
    common = dict(images=str(tmp / "world" / "images"), vocab=str(tmp / "world" / "classes.txt"),
                  preset=args.preset, shard_size=args.shard_size, device="cpu")
    print(f"{n} images ({args.size[0]}x{args.size[1]}), {args.shards} shards of {args.shard_size}, "
          f"preset {args.preset}", flush=True)

    rows = []
    # Warm-up: load the models into this process once (the Ray workers load theirs in their own runs).
    models_cache.get_models(args.preset, "cpu")

    t0 = time.perf_counter()
    s = run_label(LabelConfig(campaign=str(tmp / "stage"), **common), progress=False)
    stage_wall = time.perf_counter() - t0
    rows.append(("stage only (no Prefect)", stage_wall, stage_wall, None, s["images"]))
    print(f"stage alone: {stage_wall:.1f} s; starting a Prefect server ...", flush=True)

    with local_server(tmp / "prefect") as server, client_settings(server.api_url, server.home):
        from flows.label_flow import label_campaign

        results = {}
        for name, kwargs in (
            ("local runner", dict(runner="local")),
            ("ray, 1 worker", dict(runner="ray", gpus_per_shard=0, cpus_per_shard=1,
                                   ray_init_kwargs={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
                                                    "_node_ip_address": "127.0.0.1"})),
            ("ray, 2 workers", dict(runner="ray", gpus_per_shard=0, cpus_per_shard=1,
                                    ray_init_kwargs={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
                                                     "_node_ip_address": "127.0.0.1"})),
        ):
            campaign = tmp / name.replace(" ", "").replace(",", "-")
            t0 = time.perf_counter()
            out = label_campaign(campaign=str(campaign), **common, **kwargs)
            wall = time.perf_counter() - t0
            rs = out["shard_results"]
            span = max(r["finished"] for r in rs) - min(r["started"] for r in rs)
            results[name] = rs
            rows.append((name, wall, span, statistics.median(gaps(rs)) if len(gaps(rs)) else None, out["images"]))
            print(f"{name}: {wall:.1f} s", flush=True)

    shard_wall = stage_wall / args.shards
    print(f"\n{'run':<24} {'wall s':>8} {'img/s':>7} {'span s':>8} {'img/s span':>10} {'gap/shard s':>11}"
          f" {'gap % of shard':>14}")
    for name, wall, span, gap, images in rows:
        gap_s = "" if gap is None else f"{gap:.3f}"
        pct = "" if gap is None else f"{100 * gap / shard_wall:.2f}"
        print(f"{name:<24} {wall:>8.1f} {images / wall:>7.2f} {span:>8.1f} {images / span:>10.2f} {gap_s:>11}"
              f" {pct:>14}")
    by = {name: (wall, span) for name, wall, span, _, _ in rows}
    w1, w2 = by["ray, 1 worker"], by["ray, 2 workers"]
    print(f"\n2 workers / 1 worker: {w1[0] / w2[0]:.2f}x end to end, {w1[1] / w2[1]:.2f}x over the labelling span")
    if args.shard_size != 64:
        shard64 = shard_wall * 64 / args.shard_size
        print(f"projected to a 64-image shard ({shard64:.2f} s, scaled from {args.shard_size} images): the gap is "
              f"{100 * rows[2][3] / shard64:.2f} % of it")
    per_shard_total = (w1[0] - stage_wall) / args.shards
    print(f"a {args.shard_size}-image shard takes {shard_wall:.2f} s (stage alone); Ray+Prefect between shards of "
          f"one worker: {rows[2][3]:.3f} s = {100 * rows[2][3] / shard_wall:.2f} % of it (target < 5 %); "
          f"everything Ray adds to the 1-worker run (Ray and worker start, model load in the worker), spread over "
          f"its {args.shards} shards: {per_shard_total:.2f} s/shard = {100 * per_shard_total / shard_wall:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
