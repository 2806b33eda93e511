"""How close does `label_shard` get to the device's limit? A GPU simulated by sleeping, the host work real.

Stand-in CLIP and SAM models whose forward calls *sleep* for the GPU time of that call (time.sleep uses no CPU and
releases the GIL, as a CUDA kernel launch + wait would) and return precomputed outputs of the real shapes
(crop embeddings, point masks, ~60 automatic masks per image at full resolution, copied out per call like a
device-to-host transfer). Everything else is the real code: JPEG decode + EXIF, the PIL upscale for CLIP and the
long-side resize for SAM, stitching, detection, mask pooling, the seeded merge, RLE, Parquet/Zarr commit.

Per-call GPU times default to the `paper` preset on one H200 at 60 % of its bf16 dense peak (989 TFLOP/s), from
the FLOPs `scripts/bench_flops.py` counts at 640x480: CLIP ViT-L/14 0.162 TFLOP per 224 px crop -> 0.27 ms,
SAM ViT-H encoder 6.0 TFLOP -> 10.1 ms, automatic masks 3.7 TFLOP -> 6.2 ms, the 1.1 point call 0.3 ms.

Prints, per mode (interleaved rounds, median): images/s, and images/s / the model-time bound (= summed sleep time
/ wall time; 1.0 means the simulated GPU never waited). Modes: the serial loop, the pipelined loop, and two label
workers (processes) sharing the one simulated GPU (a cross-process lock held during every sleep), serial or
pipelined each.

    python scripts/bench_pipeline.py                  # 32 images 480x640, 3 rounds
    python scripts/bench_pipeline.py --images 16 --rounds 1 --modes serial pipelined
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fmbseg.models.base import AutoMask, SamEmbedding  # noqa: E402

PEAK_BF16 = 989e12
EFFICIENCY = 0.6


class _Device:
    """The simulated GPU: one lock (shared by worker processes), and the time this process held it sleeping."""

    def __init__(self, lock):
        self.lock = lock
        self.busy = 0.0

    def run(self, seconds: float) -> None:
        with self.lock:
            time.sleep(seconds)
        self.busy += seconds


def simulate_device_tensor_work(dev: "_Device", ms_per_crop: float, pool_ms: float, resize_ms: float = 0.0) -> None:
    """Replace the model lane's device-side tensor work by sleeps too (in production it runs on the GPU; on this
    CPU it would be counted as host work): the sliding-window crop batches + stitching (`sliding_features_many`,
    asleep for its crops' CLIP time, returning fixed features of the real grid shape; the host-side upscale and
    crop layout, `prepare_sliding`, stay real; with `--device-resize` the upscale itself is device work too,
    `resize_ms`) and the mask pooling of Stage-1 labeling (`mask_pool`)."""
    import fmbseg.models.sliding as sliding
    import fmbseg.stage1 as stage1

    g = torch.Generator().manual_seed(1)
    vectors = F.normalize(torch.randn(64, SleepClip.embed_dim, generator=g), dim=-1)
    grids: dict[tuple[int, int], torch.Tensor] = {}

    def features_many(clip, inputs, batch_size=32, across_images=True):
        P = clip.patch_size
        n_crops = sum(len(inp.boxes) for inp in inputs)
        dev.run(n_crops * ms_per_crop / 1e3)
        out = []
        for inp in inputs:
            Hu, Wu = inp.pixels.shape[:2]
            if inp.resize_to is not None:  # the upscale on the device (fmbseg.resample.pil_resize)
                dev.run(resize_ms / 1e3)
                Hu, Wu = inp.resize_to
            if (Hu, Wu) not in grids:
                grids[(Hu, Wu)] = F.normalize(torch.randn(Hu // P, Wu // P, SleepClip.embed_dim, generator=g), dim=-1)
            k = torch.arange(len(inp.boxes)) % 3  # crop k votes for class k % 3
            H, W = inp.image_hw
            out.append(sliding.SlidingFeatures(crop_cls=vectors[k], crop_boxes=inp.boxes, dense=grids[(Hu, Wu)],
                                               scale_xy=(Wu / W, Hu / H), patch_size=P, image_hw=(H, W)))
        return out

    def mask_pool(masks, feats, cell_size_xy):
        dev.run(pool_ms / 1e3)
        return vectors[torch.arange(len(masks)) % 64].double()

    sliding.sliding_features_many = features_many
    stage1.mask_pool = mask_pool


class SleepClip:
    """ClipModel stand-in (ViT-L/14 at 224 px): crop k of a batch votes for class k % 3."""

    model_id = "sleep-clip"
    weights_sha256 = None
    dense_mode = "maskclip"
    input_size, patch_size, embed_dim = 224, 14, 64

    def __init__(self, dev: _Device, ms_per_crop: float):
        self.dev, self.ms = dev, ms_per_crop
        self.device = torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        self.vectors = F.normalize(torch.randn(64, self.embed_dim, generator=g), dim=-1)
        n = self.input_size // self.patch_size
        self.dense = F.normalize(torch.randn(256, n, n, self.embed_dim, generator=g), dim=-1)
        self.crops_seen = 0

    def encode_text(self, names, templates=("a photo of a {}.",)) -> torch.Tensor:
        return self.vectors[: len(names)].clone()

    def encode_crops(self, crops: torch.Tensor):
        B = crops.shape[0]
        self.dev.run(B * self.ms / 1e3)
        idx = torch.arange(self.crops_seen, self.crops_seen + B)
        self.crops_seen += B
        return self.vectors[idx % 3], self.dense[idx % 256]

    def encode_dense(self, images):
        raise NotImplementedError


def _blob_masks(h: int, w: int, n: int, seed: int) -> np.ndarray:
    """(n, h, w) bool ellipses of mixed sizes (what the simulated device 'computes')."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.03, 0.4) * h, rng.uniform(0.03, 0.4) * w
        out[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return out


class SleepSam:
    """SamModel stand-in (ViT-H): real host-side resize; encoder, point and automatic decoders sleep."""

    model_id = "sleep-sam"
    weights_sha256 = None
    image_size = 1024

    def __init__(self, dev: _Device, encoder_ms: float, points_ms: float, amg_ms: float, n_auto: int,
                 resize_ms: float = 0.0):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.dev, self.resize_ms = dev, resize_ms
        self.encoder_ms, self.points_ms, self.amg_ms, self.n_auto = encoder_ms, points_ms, amg_ms, n_auto
        self.device = torch.device("cpu")
        self.transform = ResizeLongestSide(self.image_size)
        self._masks: dict[tuple[int, int], np.ndarray] = {}

    def _blobs(self, hw):
        if hw not in self._masks:
            self._masks[hw] = _blob_masks(*hw, self.n_auto + 8, seed=hw[0] * 7919 + hw[1])
        return self._masks[hw]

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return self.transform.apply_image(image)

    def prepare_on_device(self, image: torch.Tensor) -> torch.Tensor:
        self.dev.run(self.resize_ms / 1e3)
        h, w = self.transform.get_preprocess_shape(image.shape[0], image.shape[1], self.image_size)
        return torch.empty(h, w, 3, dtype=torch.uint8)

    def embed(self, image: np.ndarray) -> SamEmbedding:
        return self.embed_many([image])[0]

    def embed_many(self, images, prepared=None):
        if prepared is None:
            prepared = [self.prepare(im) for im in images]
        self.dev.run(len(images) * self.encoder_ms / 1e3)
        for im in images:
            self._blobs(im.shape[:2])
        return [SamEmbedding(original_hw=im.shape[:2], input_hw=r.shape[:2], features=None)
                for im, r in zip(images, prepared)]

    def predict_points(self, emb, points, outputs="multimask"):
        self.dev.run(self.points_ms / 1e3)
        n, m = len(points), {"all4": 4, "multimask": 3, "single": 1}[outputs]
        blobs = self._blobs(tuple(emb.original_hw))
        masks = np.repeat(blobs[self.n_auto : self.n_auto + n][:, None], m, axis=1)  # the device-to-host copy
        return masks, np.tile(np.array([0.9, 0.8, 0.7, 0.6][:m], np.float32), (n, 1))

    def generate(self, emb, cfg):
        self.dev.run(self.amg_ms / 1e3)
        blobs = self._blobs(tuple(emb.original_hw))[: self.n_auto].copy()  # the device-to-host copy
        return [AutoMask(segmentation=m, predicted_iou=0.9, stability_score=0.97) for m in blobs]


def _write_images(folder: Path, n: int, hw: tuple[int, int]) -> None:
    """World-like JPEGs (flat regions + sensor noise, so decoding costs what a photo's does)."""
    from PIL import Image

    from fmbseg.testing.world import write_world

    write_world(folder, n, seed=0, sizes=(hw,), formats=("png",))
    rng = np.random.default_rng(0)
    for p in sorted((folder / "images").glob("*.png")):
        im = np.asarray(Image.open(p).convert("RGB")).astype(np.int16)
        im = np.clip(im + rng.normal(0, 6, im.shape), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(p.with_suffix(".jpg"), quality=90)
        p.unlink()


def _worker(args, campaign: str, shard_ids: list[int], pipeline: bool, lock, out) -> None:
    """One label worker: its own stand-ins on the shared simulated device; reports (model seconds, start, end)."""
    torch.set_num_threads(1)
    from stages import models_cache
    from stages.label import label_shard
    from stages.label_pipeline import ExecutionConfig

    dev = _Device(lock)
    clip = SleepClip(dev, args.clip_ms_per_crop)
    sam = SleepSam(dev, args.sam_encoder_ms, args.points_ms, args.amg_ms, args.auto_masks, args.resize_ms)
    models_cache.register_models("base", "cpu", clip, sam)
    simulate_device_tensor_work(dev, args.clip_ms_per_crop, args.pool_ms, args.resize_ms)
    execution = ExecutionConfig(pipeline=pipeline, prefetch=args.prefetch, host_workers=args.host_workers,
                                sam_batch=args.sam_batch, device_resize=args.device_resize)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = []
    for sid in shard_ids:
        r = label_shard(campaign, sid, "cpu", retry_failed=False, execution=execution)
        if r["failed"]:  # a stand-in out of step with the code: measure nothing rather than failing images
            raise RuntimeError(f"shard {sid}: {r['failed']} images failed: {r['failure_reasons']}")
        stats.append(r.get("pipeline"))
    out.put((dev.busy, t0, time.perf_counter(), stats, r["timings"], time.process_time() - c0))


def _run(args, work: Path, mode: str, round_: int) -> tuple[float, float, dict | None]:
    """One measured run of `mode` on a fresh campaign -> (images/s, ratio to the model-time bound, lane split)."""
    from stages.label import LabelConfig, plan_campaign

    workers = 2 if mode.startswith("2x") else 1
    pipeline = mode.endswith("pipelined")
    campaign = work / f"c-{mode}-{round_}"
    cfg = LabelConfig(images=str(work / "w" / "images"), vocab=str(work / "w" / "classes.txt"),
                      campaign=str(campaign), preset="base", device="cpu",
                      shard_size=args.images // workers)
    ctx = mp.get_context("fork")
    lock = ctx.Lock()
    q = ctx.Queue()
    # Planning needs the models' record: register the stand-ins in this process too.
    from stages import models_cache

    dev = _Device(lock)
    models_cache.register_models("base", "cpu", SleepClip(dev, 0), SleepSam(dev, 0, 0, 0, 0))
    shards = plan_campaign(cfg)
    procs = [ctx.Process(target=_worker, args=(args, str(campaign), shards[w::workers], pipeline, lock, q))
             for w in range(workers)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"worker exited with {p.exitcode}")
    busy = sum(r[0] for r in res)
    wall = max(r[2] for r in res) - min(r[1] for r in res)
    timings = {k: sum(r[4][k] for r in res) / args.images for k in res[0][4]}
    timings["host CPU"] = sum(r[5] for r in res) / args.images  # CPU seconds of the worker processes per image
    return args.images / wall, busy / wall, res[0][3][-1], timings


def host_breakdown(folder: Path, n_auto: int, device_resize: bool = False) -> dict[str, float]:
    """CPU ms per image of each part of the host path, one thread, the stand-ins at zero device time: the real
    functions `label_shard` runs (serial loop's order), each timed alone with `time.thread_time`."""
    import threading

    from fmbseg.images import load_image
    from fmbseg.models.sliding import prepare_sliding
    from fmbseg.stage1 import Stage1Config, detect_classes, label_candidates, merge_masks, sam_candidates
    from stages.label_pipeline import ShardRows
    from storage.fs import CampaignRoot
    from storage.shard_writer import commit_shard
    from storage.tables import images_table, masks_table

    dev = _Device(threading.Lock())
    clip, sam = SleepClip(dev, 0.0), SleepSam(dev, 0.0, 0.0, 0.0, n_auto)
    simulate_device_tensor_work(dev, 0.0, 0.0)
    import fmbseg.models.sliding as sliding

    config = Stage1Config()
    names = [f"class{k}" for k in range(3)]
    text = clip.encode_text(names)
    acc = ShardRows(names)
    parts: dict[str, float] = {}

    def timed(name, fn, *a):
        t0 = time.thread_time()
        out = fn(*a)
        parts[name] = parts.get(name, 0.0) + time.thread_time() - t0
        return out

    paths = sorted((folder / "images").glob("*.jpg"))
    for i, path in enumerate(paths):
        image = timed("decode + EXIF", load_image, str(path))
        inp = timed("CLIP upscale (PIL bicubic, unless on the device) + crops", prepare_sliding, image,
                    clip.input_size, clip.patch_size, config.upscale, config.max_side, device_resize)
        prepared = (sam.prepare_on_device(torch.from_numpy(image)) if device_resize
                    else timed("SAM long-side resize (PIL bilinear)", sam.prepare, image))
        sf = sliding.sliding_features_many(clip, [inp], config.clip_batch_size, False)[0]
        det = timed("detection (on the stand-in features)", detect_classes, sf, text, config)
        emb = sam.embed_many([image], [prepared])[0]
        cand = timed("candidates (device-to-host copies, emptiness)", sam_candidates, sam, emb, det, config)
        masks = timed("scores (pooling input; pooling itself on the device)", label_candidates, cand, det, config)
        selected, label = timed("seeded draw + label-map merge", merge_masks, masks, *image.shape[:2], config, 0,
                                path.name)
        entry = type("Entry", (), {"image_id": path.name, "path": str(path)})()
        timed("RLE + mask rows + label-map zlib", acc.add_ok, entry, image.shape[:2], masks, selected, label)
    root = CampaignRoot(str(folder / "breakdown-campaign"))

    def commit():
        commit_shard(root, 0, "x" * 64, images_table(acc.rows, names), masks_table(acc.cols, names), acc.labels,
                     failure_reasons={}, seconds=0.0, code_version="bench")

    timed("shard commit (Parquet, Zarr, fsync; per image)", commit)
    return {k: 1e3 * v / len(paths) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images per run (default 32; even)")
    ap.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is printed")
    ap.add_argument("--modes", nargs="+", default=["serial", "pipelined", "2x-serial", "2x-pipelined"],
                    choices=["serial", "pipelined", "2x-serial", "2x-pipelined"])
    ap.add_argument("--clip-ms-per-crop", type=float, default=0.162e12 / (EFFICIENCY * PEAK_BF16) * 1e3)
    ap.add_argument("--sam-encoder-ms", type=float, default=6.0e12 / (EFFICIENCY * PEAK_BF16) * 1e3)
    ap.add_argument("--amg-ms", type=float, default=3.7e12 / (EFFICIENCY * PEAK_BF16) * 1e3)
    ap.add_argument("--points-ms", type=float, default=0.3)
    ap.add_argument("--pool-ms", type=float, default=0.5, help="mask pooling of one image on the device")
    ap.add_argument("--device-resize", action="store_true",
                    help="the CLIP upscale and SAM resize on the device (ExecutionConfig.device_resize, the CUDA "
                         "default), each taking --resize-ms of simulated device time instead of host CPU")
    ap.add_argument("--resize-ms", type=float, default=0.15,
                    help="device time of one exact resize (estimate: ~40 small int32 kernels on a few MB)")
    ap.add_argument("--auto-masks", type=int, default=60, help="automatic masks per image (default 60)")
    ap.add_argument("--gpu-scale", type=float, default=1.0,
                    help="multiply every simulated GPU time (e.g. 10: a device 10x slower than the H200 estimate, "
                         "to see the pipeline's overlap when this machine's host work is the bottleneck)")
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--host-workers", type=int, default=2)
    ap.add_argument("--sam-batch", type=int, default=None)
    ap.add_argument("--breakdown", action="store_true",
                    help="also print CPU ms per image of each host part (one thread, the real functions)")
    args = ap.parse_args(argv)
    for name in ("clip_ms_per_crop", "sam_encoder_ms", "amg_ms", "points_ms", "pool_ms", "resize_ms"):
        setattr(args, name, getattr(args, name) * args.gpu_scale)

    work = Path(tempfile.mkdtemp(prefix="fmbseg-bench-pipeline-"))
    try:
        _write_images(work / "w", args.images, tuple(args.size))
        import os

        print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; GPU times x{args.gpu_scale}")
        print(f"{args.images} JPEGs {args.size[0]}x{args.size[1]}; simulated GPU per image: CLIP "
              f"{args.clip_ms_per_crop:.3f} ms/crop, SAM encoder {args.sam_encoder_ms:.1f} ms, AMG "
              f"{args.amg_ms:.1f} ms, points {args.points_ms:.1f} ms; {args.auto_masks} automatic masks/image")
        if args.breakdown:
            torch.set_num_threads(1)
            host_breakdown(work / "w", args.auto_masks, args.device_resize)  # warm-up
            parts = host_breakdown(work / "w", args.auto_masks, args.device_resize)
            print("\nhost CPU per image, ms (one thread, the real host functions; the stand-ins' device time 0):")
            for k, v in parts.items():
                print(f"  {k:55} {v:6.1f}")
            print(f"  {'total':55} {sum(parts.values()):6.1f}")
        _run(args, work, "serial", -1)  # warm-up: imports, first allocations, page cache
        results: dict[str, list] = {m: [] for m in args.modes}
        for r in range(args.rounds):
            for m in args.modes:
                results[m].append(_run(args, work, m, r))
                shutil.rmtree(work / f"c-{m}-{r}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'mode':14} {'images/s':>9} {'÷ bound':>8}   (median of {args.rounds}; 1.0 = the GPU never waits; "
          f"target >= 0.9)")
    for m, rs in results.items():
        ips = statistics.median(x[0] for x in rs)
        ratio = statistics.median(x[1] for x in rs)
        print(f"{m:14} {ips:9.2f} {ratio:8.3f}   runs: {', '.join(f'{x[1]:.3f}' for x in rs)}")
    print("\nper image, ms of each part (summed over lanes; the model lane's parts include their sleeps; 'host CPU' "
          "= CPU time the workers used: with c free cores the bound is reachable only if host CPU / c < GPU time):")
    for m, rs in results.items():
        print(f"{m:14} " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in rs[-1][3].items()))
    print("\nhost cores the bound needs (0.9 x host CPU per image / GPU time per image; the CPUs this run could get "
          "bound it above):")
    for m, rs in results.items():
        gpu = statistics.median(x[1] / x[0] for x in rs)  # s of simulated GPU per image = (busy / wall) / (n / wall)
        cpu = statistics.median(x[3]["host CPU"] for x in rs)
        print(f"{m:14} GPU {1e3 * gpu:.1f} ms/image, host CPU {1e3 * cpu:.1f} ms/image -> {0.9 * cpu / gpu:.2f} cores "
              f"(this run used {cpu * statistics.median(x[0] for x in rs):.2f})")
    for m, rs in results.items():
        st = rs[-1][2]
        if st:
            w = st["wall"]
            print(f"{m}: last shard lanes: GPU waiting for host {st['model_wait_host'] / w:.0%}, host (writer) "
                  f"waiting for GPU {st['writer_wait_model'] / w:.0%}, prefetch threads busy "
                  f"{st['prefetch_busy'] / (w * st['host_workers']):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
