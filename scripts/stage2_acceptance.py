"""Acceptance run of issue 8 item 9 (not a test): `fmbseg train --campaign C` with no other flag, on a 24-image
oracle campaign of a synthetic world, must give the `fmbseg` segmenter >= 85 % mIoU on a disjoint evaluation
world, in <= 15 minutes on the project's 2-core CPU.

For each training seed S: writes the training world (seed S, 24 images) and the evaluation world (seed S + 1,
12 images) under `--root`, labels the training world with the oracle preset (`fmbseg label`), runs
`fmbseg train --campaign C` (no other flag unless `--train-args` adds some), then `fmbseg eval --dataset custom
--models fmbseg` on the evaluation world, each as its own CLI process, and prints one line per seed: mIoU, the
training run's wall time and CPU time (user + system of the process), and the plan line it printed. CPU time is
the figure to compare across runs on a loaded machine; set OMP_NUM_THREADS=1 there (two OpenMP threads spinning
against other processes run several times slower).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/stage2_acceptance.py --seeds 4711 9001 --root /tmp/acc

A seed's world and campaign are reused when present (labelling is not what is measured); its checkpoint is not
(`--fresh` is implied for the training: the train folder is removed first), so every line is a complete run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)          # this checkout's fmbseg, here and in the CLI processes it starts

TRAIN_IMAGES, EVAL_IMAGES = 24, 12
TARGET_MIOU, TARGET_SECONDS = 85.0, 15 * 60


def _cli(*args: str, log) -> tuple[float, float, str]:
    """Run `fmbseg ARGS` as a child process; -> (wall seconds, CPU seconds, stderr). Raises on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    log.write(f"$ fmbseg {shlex.join(args)}\n{proc.stdout}{proc.stderr}\n")
    log.flush()
    if proc.returncode:
        raise RuntimeError(f"fmbseg {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, cpu, proc.stdout + proc.stderr


def run_seed(seed: int, root: str, train_args: list[str], log, train_images: int = TRAIN_IMAGES,
             eval_images: int = EVAL_IMAGES) -> dict:
    from fmbseg.testing.world import write_world

    base = os.path.join(root, f"seed{seed}")
    train_world, eval_world, camp = (os.path.join(base, d) for d in ("train-world", "eval-world", "campaign"))
    for world, n, s in ((train_world, train_images, seed), (eval_world, eval_images, seed + 1)):
        if not os.path.isfile(os.path.join(world, "classes.txt")):
            write_world(world, n, seed=s)
    if not os.path.isfile(os.path.join(camp, "campaign.json")):
        _cli("label", "--images", os.path.join(train_world, "images"), "--vocab",
             os.path.join(train_world, "classes.txt"), "--campaign", camp, "--preset", "oracle", "--device", "cpu",
             "--no-progress", log=log)
    shutil.rmtree(os.path.join(camp, "train"), ignore_errors=True)
    wall, cpu, out = _cli("train", "--campaign", camp, "--no-progress", *train_args, log=log)
    ckpt = out.strip().splitlines()
    ckpt = next(line for line in reversed(ckpt) if line.endswith(".pt"))
    plan = next((line for line in out.splitlines() if line.startswith("train: plan:")), "")
    report = os.path.join(base, "report")
    shutil.rmtree(report, ignore_errors=True)
    ewall, ecpu, _ = _cli("eval", "--dataset", "custom", "--data-root", eval_world, "--models", "fmbseg",
                          "--checkpoint", ckpt, "--out", report, "--device", "cpu", "--no-progress", log=log)
    with open(os.path.join(report, "results.json")) as f:
        results = json.load(f)
    (per_model,) = results["results"].values()          # one dataset: custom:eval-world
    miou = per_model["fmbseg"]["mIoU"]                    # in percent
    return {"seed": seed, "mIoU": miou, "train_wall": wall, "train_cpu": cpu, "eval_wall": ewall, "eval_cpu": ecpu,
            "plan": plan, "checkpoint": ckpt, "iou": per_model["fmbseg"].get("IoU")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="training-world seeds (eval world: seed+1)")
    ap.add_argument("--root", default="/tmp/stage2-acceptance", help="where worlds, campaigns and reports go")
    ap.add_argument("--train-args", default="", help="extra `fmbseg train` flags (none for the acceptance)")
    ap.add_argument("--json", help="also write the per-seed results here")
    ap.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help=f"default {TRAIN_IMAGES} (the acceptance)")
    ap.add_argument("--eval-images", type=int, default=EVAL_IMAGES, help=f"default {EVAL_IMAGES}")
    args = ap.parse_args(argv)
    os.makedirs(args.root, exist_ok=True)
    rows = []
    with open(os.path.join(args.root, "acceptance.log"), "a") as log:
        for seed in args.seeds:
            r = run_seed(seed, args.root, shlex.split(args.train_args), log, args.train_images, args.eval_images)
            rows.append(r)
            ok = r["mIoU"] >= TARGET_MIOU and r["train_wall"] <= TARGET_SECONDS
            print(f"seed {seed}: fmbseg mIoU {r['mIoU']:.2f} %  train wall {r['train_wall']:.0f} s, CPU "
                  f"{r['train_cpu']:.0f} s  eval wall {r['eval_wall']:.0f} s  {'PASS' if ok else 'FAIL'}  "
                  f"[{r['plan'].removeprefix('train: plan: ')}]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["mIoU"] >= TARGET_MIOU and r["train_wall"] <= TARGET_SECONDS for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
