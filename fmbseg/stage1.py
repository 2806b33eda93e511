"""The per-image Stage-1 algorithm (DESIGN §1): CLIP crop detection + SAM point queries (1.1), SAM automatic masks
labeled by pooled dense CLIP (1.2), scores, and the seeded merge into one pseudo-label map.

One CLIP sliding-window pass and ONE SAM image embedding per image serve both stages. Coordinates are original
image px, (x, y), x right, y down; masks and label maps are (H, W) at the original resolution.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg import IGNORE_LABEL
from fmbseg.device import synchronize
from fmbseg.models.base import ClipModel, SamEmbedding, SamModel
from fmbseg.models.sliding import SlidingFeatures, sliding_window_features
from fmbseg.pooling import mask_pool
from fmbseg.stage1_config import Stage1Config

STAGE_11 = "1.1"
STAGE_12 = "1.2"


@dataclass
class Stage1Mask:
    """One pseudo-mask: `mask (H, W) bool`; `score` = cosine(mean dense CLIP under the mask, class text);
    `sam_score` = SAM's predicted IoU."""

    stage: str
    class_id: int
    score: float
    sam_score: float
    mask: np.ndarray


@dataclass
class Stage1Result:
    """Stage 1 of one image. `masks`: all 1.1 masks (class-id order) then all 1.2 masks (SAM order), mask_id =
    index; `selected (n,) bool` the merge selection; `label (H, W) uint16` with IGNORE_LABEL where uncovered;
    `timings` in seconds: clip, sam_encoder, sam_decoder, labeling."""

    height: int
    width: int
    detected: list[int]
    masks: list[Stage1Mask]
    selected: np.ndarray
    label: np.ndarray
    timings: dict[str, float]
    kept: "Stage1Kept | None" = None  # with run_stage1(keep=True): what a relabel needs (Stage1Kept)


@dataclass
class Stage1Kept:
    """What Stage 1 computed for one image that does not depend on the vocabulary, i.e. what a relabel with another
    vocabulary reads instead of running the image encoders: the sliding-window features (crop CLS, dense map,
    geometry), and, when the image got a SAM pass, its SAM embedding and its 1.2 automatic masks
    `autos = [(mask (H, W) bool, sam_score)]` in SAM order (`embedding` and `autos` are both None otherwise)."""

    features: SlidingFeatures
    embedding: SamEmbedding | None = None
    autos: list[tuple[np.ndarray, float]] | None = None


def selection_rng(seed: int, image_id: str) -> np.random.Generator:
    """The generator of the 1.2 draw: seeded by (campaign seed, first 8 bytes of sha256(image_id) big-endian), so
    the draw is the same in every rerun and every worker, and independent between images."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_id, str):
        raise TypeError(f"image_id must be a string, got {type(image_id).__name__}")
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "big")])


def select_masks(stages: Sequence[str], fraction: float, seed: int, image_id: str) -> np.ndarray:
    """(n,) bool: every 1.1 mask, plus exactly round(fraction * n12) of the n12 1.2 masks (halves round up) drawn
    without replacement by `selection_rng(seed, image_id)`."""
    stages = list(stages)
    selected = np.array([s == STAGE_11 for s in stages], dtype=bool)
    idx12 = np.flatnonzero([s == STAGE_12 for s in stages])
    k = int(math.floor(fraction * idx12.size + 0.5))
    if k:
        chosen = selection_rng(seed, image_id).choice(idx12.size, size=k, replace=False)
        selected[idx12[chosen]] = True
    return selected


def merge_label_map(masks: Sequence[Stage1Mask], selected: np.ndarray | Sequence[bool], height: int,
                    width: int) -> np.ndarray:
    """Paint the selected masks in increasing `score` order (the highest score wins an overlap; equal scores: the
    later mask wins) -> (H, W) uint16 class ids, IGNORE_LABEL where no selected mask covers."""
    selected = np.asarray(selected, dtype=bool)
    if selected.shape != (len(masks),):
        raise ValueError(f"selected must have one flag per mask ({len(masks)}), got shape {selected.shape}")
    label = np.full((height, width), IGNORE_LABEL, dtype=np.uint16)
    idx = np.flatnonzero(selected)
    order = idx[np.argsort([masks[i].score for i in idx], kind="stable")]
    for i in order:
        m = masks[i]
        if m.mask.shape != (height, width):
            raise ValueError(f"mask {i} has shape {m.mask.shape}, the label map is {(height, width)}")
        if not 0 <= m.class_id < IGNORE_LABEL:
            raise ValueError(f"mask {i} has class id {m.class_id}, outside [0, {IGNORE_LABEL})")
        np.copyto(label, np.uint16(m.class_id), where=np.asarray(m.mask, dtype=bool))  # 2x `label[m.mask] =`
    return label


class _Clock:
    def __init__(self, devices: Sequence[torch.device]):
        self.devices = list(devices)
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        for d in self.devices:
            synchronize(d)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._t
        self._t = now


@dataclass
class Detection:
    """Stage 1.1's CLIP phase for one image: the sliding-window features, the class text (K, D) normalised on the
    features' device, the detected class ids (ascending), and `points (n_detected, k, 2)` (x, y) original px, the
    cell centres of each detected class's top-k dense similarities (None when nothing is detected)."""

    features: SlidingFeatures
    text: torch.Tensor
    detected: list[int]
    points: np.ndarray | None


def check_stage1_inputs(image: np.ndarray, clip: ClipModel, text: torch.Tensor, config: Stage1Config, seed: int,
                        image_id: str) -> None:
    """The argument checks of `run_stage1`, before any model work (ValueError / TypeError naming the problem)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {getattr(image, 'shape', None)} "
                         f"{getattr(image, 'dtype', None)}")
    if not isinstance(text, torch.Tensor) or text.ndim != 2 or text.shape[0] < 1:
        raise ValueError(f"text must be a (K, D) tensor with K >= 1, got {tuple(getattr(text, 'shape', ()))}")
    if text.shape[1] != clip.embed_dim:
        raise ValueError(f"text embeddings have D={text.shape[1]}, {clip.model_id} embeds into D={clip.embed_dim}")
    if getattr(clip, "dense_mode", config.dense_mode) != config.dense_mode:
        raise ValueError(f"the Stage-1 config asks for dense_mode {config.dense_mode!r} but {clip.model_id} was "
                         f"built with {clip.dense_mode!r}; build it with make_clip(..., dense_mode=...)")
    selection_rng(seed, image_id)  # validates seed and image_id before any model work


def detect_classes(sf: SlidingFeatures, text: torch.Tensor, config: Stage1Config) -> Detection:
    """Phase 1 (after the sliding-window CLIP pass): crops vote for their arg-max class; the stitched dense map
    locates each detected class's point prompts."""
    K = text.shape[0]
    text = F.normalize(text.to(sf.dense.device, torch.float32), dim=-1)
    votes = torch.bincount((sf.crop_cls @ text.T).argmax(1), minlength=K)
    detected = [int(k) for k in torch.nonzero(votes >= config.min_crop_votes).flatten().tolist()]
    points = None
    if detected:
        dense = sf.dense.reshape(-1, sf.dense.shape[-1])
        sims = dense @ text[detected].T  # (cells, n_detected)
        top = sims.topk(min(config.points_per_class, dense.shape[0]), dim=0).indices.T.cpu().numpy()  # (nd, k)
        points = sf.cell_centres().reshape(-1, 2)[top]  # (nd, k, 2) (x, y) original px
    return Detection(features=sf, text=text, detected=detected, points=points)


def point_candidates(sam: SamModel, emb: SamEmbedding, det: Detection,
                     config: Stage1Config) -> list[tuple[int, np.ndarray, float, str]]:
    """Stage 1.1's decoder call: all detected classes' point sets in one call -> `(class_id, mask (H, W) bool,
    sam_score, "1.1")` per detected class, in class order (empty masks included)."""
    # Keep the output with the highest predicted IoU among `config.point_outputs` (a tie goes to the first: token 0
    # under `all4`).
    m11, iou11 = sam.predict_points(emb, det.points, config.point_outputs)
    iou11 = np.asarray(iou11, dtype=np.float32)
    best = iou11.argmax(1)
    # Copies, so the result does not keep the whole (N, M, H, W) array alive.
    return [(k, np.array(m11[i, best[i]], dtype=bool), float(iou11[i, best[i]]), STAGE_11)
            for i, k in enumerate(det.detected)]


def auto_candidates(sam: SamModel, emb: SamEmbedding, config: Stage1Config) -> list[tuple[np.ndarray, float]]:
    """Stage 1.2's automatic masks from the embedding -> `(mask (H, W) bool, sam_score)` in SAM order. They do not
    depend on the vocabulary: a campaign's relabel store keeps them (stages/relabel.py)."""
    return [(a.segmentation, float(a.predicted_iou)) for a in sam.generate(emb, config.auto_mask_config())]


def sam_candidates(sam: SamModel, emb: SamEmbedding, det: Detection, config: Stage1Config,
                   autos: Sequence[tuple[np.ndarray, float]] | None = None) -> list[tuple[int, np.ndarray, float, str]]:
    """Phase 3 (after the SAM encoder): the decoder calls of 1.1 and 1.2 on one embedding -> non-empty candidates
    `(class_id or -1, mask (H, W) bool, sam_score, stage)`, all 1.1 (class order) then all 1.2 (SAM order).
    `autos`: the 1.2 masks (`auto_candidates`) when they are already known (kept, or read back by relabel)."""
    cand = point_candidates(sam, emb, det, config)
    if autos is None:
        autos = auto_candidates(sam, emb, config)
    cand += [(-1, m, s, STAGE_12) for m, s in autos]
    return [c for c in cand if c[1].any()]


def label_candidates(cand: Sequence[tuple[int, np.ndarray, float, str]], det: Detection,
                     config: Stage1Config) -> list[Stage1Mask]:
    """Phase 4: pooled dense CLIP under each candidate -> its score (1.1) or its class and score (1.2); with
    `config.stage12_undetected == "drop"` a 1.2 mask whose best class over the whole vocabulary was not detected is
    dropped."""
    masks: list[Stage1Mask] = []
    if cand:
        sf, text = det.features, det.text
        # The masks as they are, not stacked (mask_pool fills its float chunks from them: no extra full copy).
        # Cosines in float64 (see mask_pool): scores must not depend on the worker's thread count.
        pooled = F.normalize(mask_pool([np.asarray(c[1], dtype=bool) for c in cand], sf.dense,
                                       sf.cell_size_xy).double(), dim=-1)
        cos = (pooled @ text.double().T).float().cpu().numpy()  # (n, K)
        det_ids = np.asarray(det.detected)
        is_detected = np.zeros(text.shape[0], dtype=bool)
        is_detected[det_ids] = True
        for i, (k, m, sam_score, stage) in enumerate(cand):
            if stage == STAGE_12:
                if config.stage12_undetected == "drop" and not is_detected[cos[i].argmax()]:
                    continue
                k = int(det_ids[cos[i, det_ids].argmax()])
            masks.append(Stage1Mask(stage=stage, class_id=int(k), score=float(cos[i, k]),
                                    sam_score=sam_score, mask=m))
    return masks


def merge_masks(masks: list[Stage1Mask], height: int, width: int, config: Stage1Config, seed: int,
                image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Phase 5 (host only): the seeded 1.2 draw and the merge -> (selected (n,) bool, label (H, W) uint16)."""
    selected = select_masks([m.stage for m in masks], config.stage12_fraction, seed, image_id)
    return selected, merge_label_map(masks, selected, height, width)


def run_stage1(
    image: np.ndarray,
    clip: ClipModel,
    sam: SamModel,
    text: torch.Tensor,
    config: Stage1Config,
    seed: int,
    image_id: str,
    keep: bool = False,
) -> Stage1Result:
    """Stage 1 of one image (DESIGN §1): the phases `detect_classes` (after the sliding-window CLIP pass),
    `sam.embed`, `sam_candidates`, `label_candidates`, `merge_masks` in order (stages/label_pipeline.py batches
    the same phases across images).

    image: (H, W, 3) uint8 RGB, upright. text: (K, D) class text embeddings (made with `config.templates`;
    normalised here again). `clip` must have been built with `config.dense_mode` (checked when it says). Masks with
    no pixel are dropped. Images with no detected class get no masks (and no SAM pass). `keep`: also return the
    vocabulary-independent results (`Stage1Result.kept`, see `Stage1Kept`)."""
    check_stage1_inputs(image, clip, text, config, seed, image_id)
    H, W = image.shape[:2]
    clock = _Clock([clip.device, sam.device])
    timings = {"clip": 0.0, "sam_encoder": 0.0, "sam_decoder": 0.0, "labeling": 0.0}

    sf = sliding_window_features(clip, image, config.upscale, config.max_side, config.clip_batch_size)
    det = detect_classes(sf, text, config)
    clock.lap("clip")
    kept = Stage1Kept(sf) if keep else None

    masks: list[Stage1Mask] = []
    if det.detected:
        emb = sam.embed(image)
        clock.lap("sam_encoder")
        autos = auto_candidates(sam, emb, config) if keep else None
        cand = sam_candidates(sam, emb, det, config, autos)
        clock.lap("sam_decoder")
        masks = label_candidates(cand, det, config)
        if keep:
            kept.embedding, kept.autos = emb, autos
    selected, label = merge_masks(masks, H, W, config, seed, image_id)
    clock.lap("labeling")
    timings.update(clock.times)
    return Stage1Result(height=H, width=W, detected=det.detected, masks=masks, selected=selected, label=label,
                        timings=timings, kept=kept)


def relabel_stage1(
    kept: Stage1Kept,
    sam: SamModel,
    text: torch.Tensor,
    config: Stage1Config,
    seed: int,
    image_id: str,
    embed: Callable[[], SamEmbedding] | None = None,
) -> Stage1Result:
    """Stage 1 of one image from its kept vocabulary-independent results (`Stage1Kept`) and a new vocabulary's
    `text (K, D)`: detection, 1.1 points, the 1.1 decoder call on the kept SAM embedding, the kept 1.2 masks
    labelled against the new text, the merge. Equal to `run_stage1` with the same text on the same image and device
    (the same phases on the same values). An image that had no SAM pass but now detects a class gets one:
    `embed()` (which must return what `sam.embed(image)` returns) and `auto_candidates`; the returned
    `Stage1Result.kept` then holds them. Timings: sam_encoder (that pass), sam_decoder, labeling."""
    sf = kept.features
    H, W = sf.image_hw
    clock = _Clock([sf.dense.device, sam.device])
    timings = {"clip": 0.0, "sam_encoder": 0.0, "sam_decoder": 0.0, "labeling": 0.0}
    det = detect_classes(sf, text, config)
    clock.lap("clip")
    out = Stage1Kept(sf, kept.embedding, kept.autos)
    masks: list[Stage1Mask] = []
    if det.detected:
        if out.embedding is None:
            if embed is None:
                raise ValueError(f"image {image_id} had no SAM pass and relabel_stage1 was given no `embed`")
            out.embedding = embed()
            clock.lap("sam_encoder")
        if out.autos is None:
            out.autos = auto_candidates(sam, out.embedding, config)
        cand = sam_candidates(sam, out.embedding, det, config, out.autos)
        clock.lap("sam_decoder")
        masks = label_candidates(cand, det, config)
    selected, label = merge_masks(masks, H, W, config, seed, image_id)
    clock.lap("labeling")
    timings.update(clock.times)
    return Stage1Result(height=H, width=W, detected=det.detected, masks=masks, selected=selected, label=label,
                        timings=timings, kept=out)
