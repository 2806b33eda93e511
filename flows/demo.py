"""`fmbseg demo`: the offline end-to-end demo on a synthetic world, run through Prefect.

It writes a synthetic world (DESIGN §6: 40 training images and a disjoint set of 8 evaluation images, 256-480 px),
runs the `fmbseg-pipeline` flow on it with the `oracle` preset (no weights, no network), and prints the evaluation
table and where the masks, the checkpoint, the overlay pictures and the report are. Prefect: the server named by
`PREFECT_API_URL` (or the active profile) when there is one, else a temporary local server on 127.0.0.1 whose
database stays under `<out>/prefect-home` for later browsing.

Layout of `<out>`:
```
world/train/{images,annotations,classes.txt}   the labeling input (the vocabulary is classes.txt)
world/eval/{images,annotations,classes.txt}    the disjoint evaluation set (`custom` benchmark layout)
campaign/                                      Stage-1 outputs (DESIGN §5) and train/<hash>/model.pt
report/                                        results.md, results.json, per-class IoU figure
overlays/                                      predictions of the trained segmenter on the evaluation images
```
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass

# (height, width) of the demo images: small enough for a CPU demo, non-square both ways.
DEMO_SIZES: tuple[tuple[int, int], ...] = ((256, 320), (320, 256), (288, 384), (384, 288), (256, 448), (480, 360))
DEMO_SHARD_SIZE = 8
DEMO_EVAL_MODELS = "all"
# The demo world is tiny (40 images), so DESIGN's defaults (10 epochs, 448-px view) give 80 SGD steps, far too
# few: in the exact TSupCon loss the text anchors carry K / (M + K) of the weight (M = patches per batch), and the
# alignment to the text space needs on the order of 1000 steps (DESIGN §1 measured 1000 at 5x256 patches). A 112-px
# view (8x8 patches, M = 320) and 250 epochs give 2000 steps in about 40 s; real campaigns of 10^4+ images
# reach that many steps with the defaults.
DEMO_TRAIN = {"epochs": 250, "train_size": 112, "cache_features": True}


@dataclass(frozen=True)
class DemoLayout:
    """Every path of a demo root (absolute local paths)."""

    root: str
    train_root: str
    train_images: str
    vocab: str
    eval_root: str
    eval_images: str
    campaign: str
    report: str
    overlays: str

    @classmethod
    def under(cls, root: str) -> "DemoLayout":
        root = os.path.abspath(os.path.expanduser(root))
        train, ev = os.path.join(root, "world", "train"), os.path.join(root, "world", "eval")
        return cls(root=root, train_root=train, train_images=os.path.join(train, "images"),
                   vocab=os.path.join(train, "classes.txt"), eval_root=ev, eval_images=os.path.join(ev, "images"),
                   campaign=os.path.join(root, "campaign"), report=os.path.join(root, "report"),
                   overlays=os.path.join(root, "overlays"))

    def as_dict(self) -> dict:
        return asdict(self)


def _world_complete(root: str, n: int) -> bool:
    images = os.path.join(root, "images")
    return (os.path.isfile(os.path.join(root, "classes.txt")) and os.path.isdir(images)
            and len(os.listdir(images)) == n and len(os.listdir(os.path.join(root, "annotations"))) == n)


def write_demo_world(root: str, train_images: int = 40, eval_images: int = 8, seed: int = 0) -> DemoLayout:
    """Write the training and evaluation worlds under `root` unless they are already there with these sizes.

    The evaluation world uses seed `seed + 1`, so its images are disjoint from the training ones."""
    from fmbseg.testing.world import write_world

    if train_images < 1 or eval_images < 1:
        raise ValueError(f"the demo needs at least one training and one evaluation image, got {train_images} "
                         f"and {eval_images}")
    layout = DemoLayout.under(root)
    for world, n, s in ((layout.train_root, train_images, seed), (layout.eval_root, eval_images, seed + 1)):
        if _world_complete(world, n):
            continue
        if os.path.isdir(os.path.join(world, "images")) and os.listdir(os.path.join(world, "images")):
            raise ValueError(f"{world} holds a world of another size; use another demo root or remove it")
        write_world(world, n, seed=s, sizes=DEMO_SIZES)
    return layout


# -- command line -------------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="offline end-to-end demo on a synthetic world (oracle models, through Prefect)",
        description="Generate a synthetic world, run the fmbseg-pipeline flow on it with the oracle preset "
                    "through Prefect, print the evaluation table and where the outputs are.",
    )
    p.add_argument("--out", default="fmbseg-demo", help="demo root directory (default: ./fmbseg-demo)")
    p.add_argument("--train-images", type=int, default=40, help="synthetic training images (default 40)")
    p.add_argument("--eval-images", type=int, default=8, help="synthetic evaluation images (default 8)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {DEMO_TRAIN['epochs']}, see DEMO_TRAIN)")
    p.add_argument("--models", default=DEMO_EVAL_MODELS,
                   help=f"segmenters to evaluate, comma-separated or all (default {DEMO_EVAL_MODELS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=run_demo)


def _current_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def run_demo(args: argparse.Namespace) -> int:
    from flows.server import client_settings, flush_prefect_logs, local_server

    if args.train_images < 1 or args.eval_images < 1:
        raise ValueError("--train-images and --eval-images must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    layout = DemoLayout.under(args.out)
    t0 = time.perf_counter()
    api_url = _current_api_url()
    if api_url:
        print(f"demo: using the Prefect server at {api_url}", file=sys.stderr)
        result = _run_pipeline(layout, args)
    else:
        home = os.path.join(layout.root, "prefect-home")
        print(f"demo: starting a temporary Prefect server on 127.0.0.1 (PREFECT_HOME={home}) ...", file=sys.stderr)
        with local_server(home) as server:
            print(f"demo: Prefect server at {server.api_url}", file=sys.stderr)
            with client_settings(server.api_url, home):
                try:
                    result = _run_pipeline(layout, args)
                finally:
                    flush_prefect_logs()
    print(_report(layout, result, time.perf_counter() - t0, None if api_url else layout.root))
    return 0


def _run_pipeline(layout: DemoLayout, args: argparse.Namespace) -> dict:
    from flows.pipeline import fmbseg_pipeline

    train = dict(DEMO_TRAIN)
    if args.epochs is not None:
        train["epochs"] = args.epochs
    return fmbseg_pipeline(
        demo_root=layout.root, demo_train_images=args.train_images, demo_eval_images=args.eval_images,
        preset="oracle", seed=args.seed, device=args.device, shard_size=DEMO_SHARD_SIZE, train=train,
        eval_models=args.models,
    )


def _report(layout: DemoLayout, result: dict, seconds: float, temp_home_root: str | None) -> str:
    from flows.evaluate_flow import results_markdown

    label = result.get("label", {})
    lines = ["", "=" * 78, "fmbseg demo: done in %.0f s" % seconds, ""]
    table = results_markdown(result.get("eval_out", layout.report))
    if table:
        lines += ["Evaluation (synthetic evaluation world, oracle preset):", "", table.strip(), ""]
    lines += [
        f"labeling     {label.get('images', 0)} images labeled this run ({label.get('shards_skipped', 0)} shards "
        f"already done), {label.get('masks', 0)} masks, {label.get('images_failed', 0)} failed images",
        f"masks        {os.path.join(layout.campaign, 'masks')}  (Parquet, one row per pseudo-mask)",
        f"label maps   {os.path.join(layout.campaign, 'labels.zarr')}",
        f"checkpoint   {result.get('checkpoint')}",
        f"overlays     {result.get('overlay_out', layout.overlays)}  ({len(result.get('overlays', []))} pictures)",
        f"report       {os.path.join(result.get('eval_out', layout.report), 'results.md')}",
    ]
    if temp_home_root:
        lines += ["", "Browse the runs later: PREFECT_HOME=%s prefect server start --host 127.0.0.1"
                  % os.path.join(temp_home_root, "prefect-home")]
    lines.append("=" * 78)
    return "\n".join(lines)
