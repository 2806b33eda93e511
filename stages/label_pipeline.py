"""The pipelined per-image loop of `label_shard` (DESIGN §1, §5): the device sees back-to-back model work while the
host work of other images runs beside it.

Three lanes, one shard:
- ahead (a pool of `host_workers` threads, at most `prefetch` images in flight): decode + EXIF (`load_image`), the
  CLIP upscale and crop layout (`prepare_sliding`), SAM's long-side resize (`sam.prepare`); the upscaled image is
  pinned on CUDA so its upload is asynchronous. PIL and the JPEG/PNG decoders release the GIL, so threads do. With
  `ExecutionConfig.device_resize` (CUDA default) both resizes run in the model lane on the device instead
  (`fmbseg.resample.pil_resize`, PIL's bytes) and only the original image is pinned.
- model (the calling thread): groups of up to `sam_batch` prepared images: the sliding-window CLIP pass (crops
  batched across the group's images on CUDA), `detect_classes`, one `sam.embed_many` over the group, then per image
  `sam_candidates` + `label_candidates` (fmbseg/stage1.py's phases, the ones `run_stage1` composes).
- behind (one writer thread): `merge_masks` (the seeded draw and the label map), RLE and the rows (`ShardRows`),
  the progress callback. The shard's commit stays in `label_shard`, after the writer has drained.

Outputs are those of the serial loop (`run_stage1` per image), bit for bit on CPU, in the same order: every lane
keeps the shard's image order, a group's batched call that raises is retried image by image so only the failing
image gets a `failed` row, and batching across images is only used where it is exact (CPU) or allowed to move
results by bf16 noise (CUDA). An exception outside one image's work (a bug in the writer, a raising progress
callback) stops the shard and is re-raised in the caller, never lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fmbseg.device import synchronize
from fmbseg.images import ImageDecodeError, load_image
from storage.labels import PackedLabels
from storage.tables import EncodedMasks, encode_masks

log = logging.getLogger(__name__)

MASK_COLUMNS = ("image_id", "mask_id", "stage", "class_id", "class_name", "score", "sam_score", "area", "bbox",
                "height", "width", "rle", "selected")


@dataclass(frozen=True)
class ExecutionConfig:
    """How `label_shard` runs its images: execution only, never part of the Stage-1 config hash.

    pipeline: the three-lane loop of this module (False: the serial loop, `run_stage1` per image).
    prefetch: images decoded and prepared ahead of the model (bounds host memory).
    host_workers: threads doing that host work.
    sam_batch: images per SAM encoder batch (and per CLIP crop-filling group); None = 1 on CPU (batching buys
      nothing there and CPU GEMMs are not bit-stable across batch sizes), 4 on CUDA.
    device_resize: the CLIP upscale and SAM's long-side resize on the model's device from the uploaded original
      (`fmbseg.resample.pil_resize`: PIL's bytes, half of the host CPU per image off the host) instead of PIL in
      the ahead threads; None = on CUDA only (on CPU the torch version is far slower than PIL).
    """

    pipeline: bool = True
    prefetch: int = 4
    host_workers: int = 2
    sam_batch: int | None = None
    device_resize: bool | None = None

    def __post_init__(self):
        for name in ("prefetch", "host_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.sam_batch is not None and (isinstance(self.sam_batch, bool) or not isinstance(self.sam_batch, int)
                                           or self.sam_batch < 1):
            raise ValueError(f"sam_batch must be an integer >= 1 (or None for the device's default), got "
                             f"{self.sam_batch!r}")
        if self.device_resize is not None and not isinstance(self.device_resize, bool):
            raise ValueError(f"device_resize must be true, false or None (the device's default), got "
                             f"{self.device_resize!r}")

    def resolved_sam_batch(self, device: torch.device) -> int:
        return self.sam_batch if self.sam_batch is not None else (4 if device.type == "cuda" else 1)

    def resolved_device_resize(self, device: torch.device) -> bool:
        return bool(self.device_resize) if self.device_resize is not None else device.type == "cuda"


def _encode_image_masks(masks: Sequence, hw: tuple[int, int]) -> EncodedMasks:
    """`encode_masks` of one image's Stage-1 masks (their (H, W) bool arrays, no stack copy), each checked to have
    the image's size."""
    for m in masks:
        if m.mask.shape != tuple(hw):
            raise RuntimeError(f"Stage 1 returned a {m.mask.shape} mask for a {tuple(hw)} image")
    return encode_masks([m.mask for m in masks])


def failure_row(entry, reason: str, kind: str, hw: tuple[int, int] | None) -> dict:
    """The `images` row of a failed image (`_kind`: the failure kind the shard's marker counts, popped at commit)."""
    return {"image_id": entry.image_id, "path": entry.path, "status": "failed", "error": reason,
            "height": hw[0] if hw else None, "width": hw[1] if hw else None, "n_masks": 0, "_kind": kind}


class ShardRows:
    """The rows of one shard as they accumulate: `rows` (images table), `cols` (masks table), `labels`, and with
    `keep` (a function `Stage1Kept -> {name: host array}`, `fmbseg.kept.kept_to_arrays` bound to the SAM model) the
    relabel-store record of every `ok` image, in row order: `kept_ids`, `kept`."""

    def __init__(self, class_names: Sequence[str], keep: Callable[[Any], dict] | None = None):
        self.names = list(class_names)
        self.keep = keep
        self.kept_ids: list[str] = []
        self.kept: list[dict] = []
        self.rows: list[dict] = []
        self.cols: dict[str, list] = {k: [] for k in MASK_COLUMNS}
        self.labels = PackedLabels()
        self.n_masks = 0
        self.n_failed = 0

    def add_ok(self, entry, hw: tuple[int, int], masks: Sequence, selected: np.ndarray, label: np.ndarray,
               kept: Any = None) -> None:
        """One labelled image: RLE of its masks, its mask rows, its label map and its `ok` row (and, when the shard
        keeps a relabel store, `kept`: the image's `Stage1Kept`). All or nothing: an exception leaves the rows as
        they were (the caller then adds a failure)."""
        n = len(masks)
        record = None
        if self.keep is not None:
            if kept is None:
                raise RuntimeError(f"image {entry.image_id}: the shard keeps a relabel store but Stage 1 kept nothing")
            record = self.keep(kept)
        if label.shape != tuple(hw):
            raise RuntimeError(f"Stage 1 returned a {label.shape} label map for a {tuple(hw)} image")
        selected = np.asarray(selected, bool).reshape(-1)
        if selected.shape[0] != n:
            raise RuntimeError(f"Stage 1 returned {selected.shape[0]} selection flags for {n} masks")
        enc = _encode_image_masks(masks, hw)
        new = {
            "image_id": [entry.image_id] * n,
            "mask_id": list(range(n)),
            "stage": [m.stage for m in masks],
            "class_id": [int(m.class_id) for m in masks],
            "class_name": [self.names[m.class_id] for m in masks],
            "score": [float(m.score) for m in masks],
            "sam_score": [float(m.sam_score) for m in masks],
            "area": [int(a) for a in enc.area[:n]],
            "bbox": [enc.bbox[j] for j in range(n)],
            "height": [int(hw[0])] * n,
            "width": [int(hw[1])] * n,
            "rle": [enc.counts[j] for j in range(n)],
            "selected": [bool(s) for s in selected],
        }
        self.labels.add(entry.image_id, np.asarray(label, np.uint16))
        if record is not None:
            self.kept_ids.append(entry.image_id)
            self.kept.append(record)
        for k in MASK_COLUMNS:
            self.cols[k].extend(new[k])
        self.rows.append({"image_id": entry.image_id, "path": entry.path, "status": "ok", "error": None,
                          "height": int(hw[0]), "width": int(hw[1]), "n_masks": n})
        self.n_masks += n

    def add_failure(self, entry, reason: str, kind: str, hw: tuple[int, int] | None) -> None:
        self.rows.append(failure_row(entry, reason, kind, hw))
        self.n_failed += 1


@dataclass
class PipelineStats:
    """Where the pipeline's wall time went (seconds): `model_busy` the model lane's phase work, `model_wait_host`
    the model lane blocked on prepared images or on a full writer queue (the GPU waiting for the host),
    `writer_wait_model` the writer blocked on the model lane (the host waiting for the GPU), `prefetch_busy` the
    summed busy time of the ahead threads."""

    wall: float = 0.0
    model_busy: float = 0.0
    model_wait_host: float = 0.0
    writer_wait_model: float = 0.0
    writer_busy: float = 0.0
    prefetch_busy: float = 0.0
    host_workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class _Prepared:
    entry: Any
    image: np.ndarray | None = None
    hw: tuple[int, int] | None = None
    clip_input: Any = None
    sam_input: Any = None
    error: tuple[str, str] | None = None  # (reason, kind)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Done:
    """What the model lane hands the writer for one image, in shard order."""

    entry: Any
    hw: tuple[int, int] | None
    masks: list | None = None
    error: tuple[str, str] | None = None
    kept: Any = None  # Stage1Kept, when the shard keeps a relabel store


def failure_of(e: BaseException, entry, shard_id: int) -> tuple[str, str]:
    """`(reason, kind)` of an image's failure for its row; an error other than a decode error is logged with its
    traceback (a bug or resource error in one image must not kill the shard)."""
    if isinstance(e, ImageDecodeError):
        return str(e), e.kind
    log.warning("image %s of shard %d failed", entry.image_id, shard_id, exc_info=e)
    return f"{type(e).__name__}: {e}", type(e).__name__


class _Writer(threading.Thread):
    """The behind lane: merge, RLE and rows in shard order; records (never swallows) an exception of its own."""

    def __init__(self, acc: ShardRows, config, seed: int, timings: dict, on_image, shard_id: int, maxsize: int):
        super().__init__(name=f"label-writer-{shard_id}", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.acc, self.config, self.seed, self.timings = acc, config, seed, timings
        self.on_image, self.shard_id = on_image, shard_id
        self.error: BaseException | None = None
        self.wait = self.busy = 0.0

    def run(self) -> None:
        from fmbseg.stage1 import merge_masks

        try:
            while True:
                t0 = time.perf_counter()
                item = self.q.get()
                t1 = time.perf_counter()
                self.wait += t1 - t0
                if item is None:
                    return
                if item.error is None:
                    try:
                        H, W = item.hw
                        selected, label = merge_masks(item.masks, H, W, self.config, self.seed, item.entry.image_id)
                        t2 = time.perf_counter()
                        self.timings["labeling"] += t2 - t1
                        self.acc.add_ok(item.entry, item.hw, item.masks, selected, label, item.kept)
                        self.timings["storage"] += time.perf_counter() - t2
                    except Exception as e:  # one image's bad result must not kill the shard
                        self.acc.add_failure(item.entry, *failure_of(e, item.entry, self.shard_id), item.hw)
                else:
                    self.acc.add_failure(item.entry, *item.error, item.hw)
                if self.on_image is not None:
                    self.on_image(self.acc.n_masks, self.acc.n_failed)
                self.busy += time.perf_counter() - t1
        except BaseException as e:  # re-raised by the model lane: never lost
            self.error = e
            while True:  # drain so the model lane never blocks on a full queue after the failure
                try:
                    if self.q.get(timeout=0.05) is None:
                        return
                except queue.Empty:
                    continue


def label_entries(entries: Sequence, clip, sam, text: torch.Tensor, config, seed: int, acc: ShardRows,
                  execution: ExecutionConfig, timings: dict, on_image: Callable[[int, int], None] | None = None,
                  shard_id: int = -1) -> PipelineStats:
    """Label `entries` (PlannedImage-likes with `image_id`, `path`) into `acc`, adding to `timings` (seconds per
    part: decode, prepare, clip, sam_encoder, sam_decoder, labeling, storage). Returns the lanes' time split.
    When `acc.keep` is set, each image's `Stage1Kept` travels with its masks to `acc.add_ok`."""
    from fmbseg.models.sliding import prepare_sliding, sliding_features_many
    from fmbseg.stage1 import (Stage1Kept, auto_candidates, check_stage1_inputs, detect_classes, label_candidates,
                               sam_candidates)

    keep = acc.keep is not None

    device = clip.device
    group_size = execution.resolved_sam_batch(sam.device)
    across = device.type == "cuda"  # exact on CPU only image by image (see sliding_features_many)
    pin = device.type == "cuda"
    sam_prepare = getattr(sam, "prepare", None)
    embed_many = getattr(sam, "embed_many", None)
    device_resize = execution.resolved_device_resize(device)
    sam_prepare_on_device = getattr(sam, "prepare_on_device", None) if device_resize and sam_prepare else None
    stats = PipelineStats(host_workers=execution.host_workers)
    busy_lock = threading.Lock()
    t_start = time.perf_counter()

    def prepare(entry) -> _Prepared:
        p = _Prepared(entry)
        t0 = time.perf_counter()
        try:
            p.image = load_image(entry.path)
            p.hw = tuple(p.image.shape[:2])
            t1 = time.perf_counter()
            p.seconds["decode"] = t1 - t0
            check_stage1_inputs(p.image, clip, text, config, seed, entry.image_id)
            p.clip_input = prepare_sliding(p.image, clip.input_size, clip.patch_size, config.upscale,
                                           config.max_side, device_resize)
            if pin:
                p.clip_input.pixels = torch.from_numpy(p.clip_input.pixels).pin_memory()
            if sam_prepare_on_device is None:
                p.sam_input = sam_prepare(p.image) if sam_prepare is not None else None
            p.seconds["prepare"] = time.perf_counter() - t1
        except Exception as e:
            p.seconds.setdefault("decode", time.perf_counter() - t0)
            if isinstance(e, ImageDecodeError):
                p.hw = e.hw
            p.error = failure_of(e, entry, shard_id)
            p.image = p.clip_input = p.sam_input = None
        with busy_lock:
            stats.prefetch_busy += time.perf_counter() - t0
        return p

    def lap(name: str, t: float) -> float:
        synchronize(device)
        if sam.device != device:
            synchronize(sam.device)
        now = time.perf_counter()
        timings[name] += now - t
        stats.model_busy += now - t
        return now

    def sam_input(p: _Prepared):
        """SAM's resized input: prepared ahead on the host, or now on the device from the uploaded original (the
        CLIP input's pinned copy when it is the original) with PIL on the host for a size `pil_resize` cannot do."""
        if sam_prepare_on_device is None:
            return p.sam_input
        src = p.clip_input.pixels if p.clip_input.resize_to is not None else p.image
        out = sam_prepare_on_device(torch.as_tensor(src).to(sam.device, non_blocking=True))
        return out if out is not None else sam_prepare(p.image)

    def run_group(group: list[_Prepared]) -> list[_Done]:
        """Model phases of a group; raises if a batched call fails (the caller then retries image by image)."""
        t = time.perf_counter()
        sfs = sliding_features_many(clip, [p.clip_input for p in group], config.clip_batch_size, across)
        dets = [detect_classes(sf, text, config) for sf in sfs]
        t = lap("clip", t)
        todo = [i for i, d in enumerate(dets) if d.detected]
        embs: dict[int, Any] = {}
        if todo:
            if embed_many is not None:
                out = embed_many([group[i].image for i in todo],
                                 [sam_input(group[i]) for i in todo] if sam_prepare is not None else None)
            else:
                out = [sam.embed(group[i].image) for i in todo]
            embs = dict(zip(todo, out))
            t = lap("sam_encoder", t)
        done = []
        for i, (p, det) in enumerate(zip(group, dets)):
            kept = Stage1Kept(sfs[i]) if keep else None
            if i not in embs:
                done.append(_Done(p.entry, p.hw, masks=[], kept=kept))
                continue
            try:
                autos = auto_candidates(sam, embs[i], config) if keep else None
                cand = sam_candidates(sam, embs[i], det, config, autos)
                t = lap("sam_decoder", t)
                if keep:
                    kept.embedding, kept.autos = embs[i], autos
                done.append(_Done(p.entry, p.hw, masks=label_candidates(cand, det, config), kept=kept))
                t = lap("labeling", t)
            except Exception as e:  # one image's decoder/pooling failure: its own failed row
                done.append(_Done(p.entry, p.hw, error=failure_of(e, p.entry, shard_id)))
                t = lap("labeling", t)
        return done

    writer = _Writer(acc, config, seed, timings, on_image, shard_id, maxsize=max(execution.prefetch, 2))
    writer.start()

    def hand_over(item: _Done) -> None:
        t0 = time.perf_counter()
        while True:
            if writer.error is not None:
                raise writer.error
            try:
                writer.q.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        stats.model_wait_host += time.perf_counter() - t0

    pool = ThreadPoolExecutor(max_workers=execution.host_workers, thread_name_prefix=f"label-prefetch-{shard_id}")
    pending: deque[Future] = deque()
    todo_entries = iter(entries)
    try:
        def top_up() -> None:
            while len(pending) < execution.prefetch:
                entry = next(todo_entries, None)
                if entry is None:
                    return
                pending.append(pool.submit(prepare, entry))

        top_up()
        while pending:
            t0 = time.perf_counter()
            group = [pending.popleft().result()]
            # Take more images only when they are already prepared: batching must never make the device wait.
            while len(group) < group_size and pending and pending[0].done():
                group.append(pending.popleft().result())
            top_up()
            stats.model_wait_host += time.perf_counter() - t0
            for p in group:
                for k, v in p.seconds.items():
                    timings[k] += v
            ok = [p for p in group if p.error is None]
            results: dict[int, _Done] = {}
            if ok:
                try:
                    results = {id(p): d for p, d in zip(ok, run_group(ok))}
                except Exception as e:
                    if len(ok) == 1:
                        results = {id(ok[0]): _Done(ok[0].entry, ok[0].hw, error=failure_of(e, ok[0].entry,
                                                                                             shard_id))}
                    else:  # find the failing image: each one alone (exact: the per-image path)
                        for p in ok:
                            try:
                                results[id(p)] = run_group([p])[0]
                            except Exception as e:
                                results[id(p)] = _Done(p.entry, p.hw, error=failure_of(e, p.entry, shard_id))
            for p in group:
                hand_over(results[id(p)] if p.error is None else _Done(p.entry, p.hw, error=p.error))
                p.image = p.clip_input = p.sam_input = None  # free the host copies early
        hand_over(None)
        writer.join()
        if writer.error is not None:
            raise writer.error
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        if writer.is_alive():  # the model lane failed: stop the writer without losing its own error
            try:
                writer.q.put(None, timeout=1.0)
            except queue.Full:
                pass
            writer.join(timeout=5.0)
    stats.wall = time.perf_counter() - t_start
    stats.writer_wait_model = writer.wait
    stats.writer_busy = writer.busy
    return stats
