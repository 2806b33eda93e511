"""The `oracle` preset (DESIGN §6): deterministic stand-ins for CLIP, SAM and DINOv2 on the synthetic world, behind
the same Protocols as the real adapters (fmbseg/models/base.py), so the pipeline's coordinate, stitching, resizing
and bookkeeping logic is scored where the right answer is known.

- CLIP-oracle: a patch's embedding is sum_c (fraction of its pixels whose nearest palette colour is c) * e_c with
  e_c orthonormal in D = 32 dims; a crop's CLS the same over the whole crop; the text "a photo of a {name}." is
  e_name (the template is parsed back out of the sentence), an unknown name a unit vector seeded by sha256(name).
  Confusable classes (off by default, for the label-quality diagnostics): `similar={("orange", "yellow"): 0.95}`
  tilts e_yellow towards e_orange so that their cosine is 0.95 (images and texts alike, as for two near-synonyms
  in a real CLIP), and `noise=s` adds Gaussian noise of norm about s to every patch and CLS embedding before
  normalisation, seeded by the pixels given (the same crop always gets the same noise), one noise vector per
  block of `noise_block` x `noise_block` patches. Without noise a patch is
  still nearest to its own colour's text; with it, similar classes get mixed up, more so the closer they are.
- SAM-oracle: `embed` labels the 4-connected same-colour regions once; point prompts give the union of the regions
  containing the points in every output: the single-mask output (token 0) with predicted IoU 0.93, the three
  multimask outputs with 0.95 / 0.90 / 0.85 (so `all4` and `multimask` pick the same mask and score); automatic generation gives
  every region of allowed area hit by a grid point (SAM's `build_point_grid`), predicted IoU 0.95, stability 1.0.
  Regions are disjoint, so box NMS would only drop correct masks whose boxes happen to overlap: the oracle skips it.
- DINO-oracle: a patch's mean colour through a fixed random linear map to C = 64 dims, plus noise seeded by the
  image content (sha256 of its bytes), so cached and recomputed features are equal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.device import resolve_device
from fmbseg.models.base import AutoMask, AutoMaskConfig, SamEmbedding
from fmbseg.testing.components import label_regions
from fmbseg.testing.palette import NUM_COLOURS, PALETTE_NAMES, nearest_colour, nearest_colour_torch

ORACLE_SEED = 20240314
MULTIMASK_IOU = (0.95, 0.90, 0.85)
SINGLE_MASK_IOU = 0.93
# Predicted IoU of each `outputs` choice of predict_points, in SegmentAnythingModel's output order.
_POINT_IOU = {"all4": (SINGLE_MASK_IOU, *MULTIMASK_IOU), "multimask": MULTIMASK_IOU, "single": (SINGLE_MASK_IOU,)}
AUTO_PREDICTED_IOU = 0.95
AUTO_STABILITY = 1.0


def _seed_of(*parts: bytes) -> int:
    """A 63-bit seed from the sha256 of the given bytes (stable across processes, unlike `hash`)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return int.from_bytes(h.digest()[:8], "big") & ((1 << 63) - 1)


def _check_images(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected a (B, 3, H, W) tensor, got {tuple(getattr(x, 'shape', ()))}")


class OracleClip:
    """ClipModel stand-in: embeddings are palette-colour fractions mapped to orthonormal class vectors."""

    model_id = "oracle-clip"
    weights_sha256 = None

    def __init__(self, device: torch.device, input_size: int = 224, patch_size: int = 16, embed_dim: int = 32,
                 dense_mode: str = "maskclip", similar: dict[tuple[str, str], float] | None = None,
                 noise: float = 0.0, noise_block: int = 1):
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if embed_dim < NUM_COLOURS:
            raise ValueError(f"embed_dim must be >= {NUM_COLOURS} to hold orthonormal colour vectors")
        self.device = device
        self.input_size = input_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        # Recorded for symmetry with OpenClipModel; the oracle's dense features are exact in every mode.
        self.dense_mode = dense_mode
        g = torch.Generator().manual_seed(ORACLE_SEED)
        q, _ = torch.linalg.qr(torch.randn(embed_dim, embed_dim, generator=g, dtype=torch.float64))
        vectors = q[:, :NUM_COLOURS].T.contiguous()  # (12, D) orthonormal rows
        self.similar = _check_similar(similar)
        for (a, b), rho in self.similar.items():
            # e_b' = rho e_a + sqrt(1 - rho^2) e_b: unit norm, cosine rho with e_a, still orthogonal to the rest.
            ia, ib = PALETTE_NAMES.index(a), PALETTE_NAMES.index(b)
            vectors[ib] = rho * vectors[ia] + np.sqrt(1.0 - rho * rho) * vectors[ib]
        if not (isinstance(noise, (int, float)) and np.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        self.noise = float(noise)
        if not (isinstance(noise_block, int) and noise_block >= 1):
            raise ValueError(f"noise_block must be an int >= 1 (patches), got {noise_block!r}")
        self.noise_block = noise_block
        if self.similar or self.noise:
            # Campaigns record the model id: a confusable oracle must not pass for the exact one.
            pairs = ",".join(f"{a}~{b}={rho:g}" for (a, b), rho in sorted(self.similar.items()))
            self.model_id = f"oracle-clip/similar[{pairs}]/noise={self.noise:g}x{noise_block}"
        self.colour_vectors = vectors.float().to(device)  # (12, D) unit rows (orthonormal by default)
        self._text_cache: dict[tuple, torch.Tensor] = {}

    def _word_vector(self, word: str) -> torch.Tensor:
        key = word.strip().lower()
        if key in PALETTE_NAMES:
            return self.colour_vectors[PALETTE_NAMES.index(key)]
        g = torch.Generator().manual_seed(_seed_of(b"oracle-text:", key.encode("utf-8")))
        return F.normalize(torch.randn(self.embed_dim, generator=g), dim=0).to(self.device)

    def _sentence_vector(self, sentence: str, template: str) -> torch.Tensor:
        # Read the class word back out of the prompt, as a text encoder would have to.
        prefix, suffix = template.split("{}", 1)
        if sentence.startswith(prefix) and sentence.endswith(suffix) and len(sentence) >= len(prefix) + len(suffix):
            sentence = sentence[len(prefix) : len(sentence) - len(suffix)]
        return self._word_vector(sentence)

    def encode_text(
        self, names: Sequence[str | Sequence[str]], templates: Sequence[str] = ("a photo of a {}.",)
    ) -> torch.Tensor:
        """-> (K, D) L2-normalised; synonyms (a name given as a list) and templates are averaged."""
        if isinstance(names, str):
            raise TypeError("encode_text takes a sequence of names, not a single string")
        groups = tuple((n,) if isinstance(n, str) else tuple(n) for n in names)
        templates = tuple(templates)
        if not groups or any(not g for g in groups):
            raise ValueError("encode_text needs at least one name, and every synonym list at least one entry")
        for t in templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
        if not templates:
            raise ValueError("encode_text needs at least one template")
        key = (groups, templates)
        if key not in self._text_cache:
            rows = []
            for group in groups:
                vecs = [self._sentence_vector(t.format(n), t) for n in group for t in templates]
                rows.append(F.normalize(torch.stack(vecs).mean(0), dim=0))
            self._text_cache[key] = torch.stack(rows)
        return self._text_cache[key].clone()

    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.to(self.device, torch.float32)
        B, _, H, W = x.shape
        P, h, w = self.patch_size, H // self.patch_size, W // self.patch_size
        colour = nearest_colour_torch(x)  # (B, H, W)
        # Colour counts per patch by one bincount over (patch, colour) keys: the fractions of avg-pooled one-hots.
        rows = torch.arange(H, device=x.device) // P
        cols = torch.arange(W, device=x.device) // P
        patch = (torch.arange(B, device=x.device)[:, None, None] * h + rows[None, :, None]) * w + cols[None, None, :]
        counts = torch.bincount((patch * NUM_COLOURS + colour).flatten(), minlength=B * h * w * NUM_COLOURS)
        frac = counts.reshape(B, h, w, NUM_COLOURS).float() / (P * P)
        dense = frac @ self.colour_vectors
        cls = frac.mean((1, 2)) @ self.colour_vectors
        if self.noise:
            dense_noise, cls_noise = self._noise(x, (h, w))
            dense = dense + dense_noise
            cls = cls + cls_noise
        return F.normalize(cls, dim=-1), F.normalize(dense, dim=-1)

    def _noise(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise of expected norm `self.noise` per patch (B, h, w, D) and per image (B, D), seeded by each image's
        uint8 pixels, never by call order or batch composition."""
        D = self.embed_dim
        levels = (x * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        dense, cls = [], []
        b = self.noise_block
        coarse = (-(-hw[0] // b), -(-hw[1] // b))
        for img in levels:
            g = torch.Generator().manual_seed(_seed_of(b"oracle-clip-noise:", str(img.shape).encode(), img.tobytes()))
            # One vector per block of b x b patches: spatially correlated errors, which pooling does not average
            # away (as a real CLIP's errors on a whole object).
            field = torch.randn(*coarse, D, generator=g)
            dense.append(field.repeat_interleave(b, 0).repeat_interleave(b, 1)[: hw[0], : hw[1]])
            cls.append(torch.randn(D, generator=g))
        scale = self.noise / np.sqrt(D)
        return scale * torch.stack(dense).to(x.device), scale * torch.stack(cls).to(x.device)

    def encode_crops(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> cls (B, D), dense (B, S/P, S/P, D), both L2-normalised float32."""
        _check_images(crops, "encode_crops")
        if crops.shape[2:] != (self.input_size, self.input_size):
            raise ValueError(f"encode_crops: crops must be {self.input_size}x{self.input_size}, "
                             f"got {tuple(crops.shape[2:])}")
        return self._embed(crops)

    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of P -> (B, H/P, W/P, D) L2-normalised float32."""
        _check_images(images, "encode_dense")
        if images.shape[2] % self.patch_size or images.shape[3] % self.patch_size:
            raise ValueError(f"encode_dense: H and W must be multiples of {self.patch_size}, "
                             f"got {tuple(images.shape[2:])}")
        return self._embed(images)[1]


def _check_similar(similar: dict[tuple[str, str], float] | None) -> dict[tuple[str, str], float]:
    """Validate `similar`: palette-name pairs, each colour in at most one pair, cosines in [0, 1] (1: the same vector)."""
    out: dict[tuple[str, str], float] = {}
    used: set[str] = set()
    for pair, rho in (similar or {}).items():
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"similar: keys must be (name, name) pairs, got {pair!r}")
        a, b = (str(n).strip().lower() for n in pair)
        for n in (a, b):
            if n not in PALETTE_NAMES:
                raise ValueError(f"similar: {n!r} is not a palette colour; the palette is {list(PALETTE_NAMES)}")
            if n in used:
                raise ValueError(f"similar: {n!r} appears in two pairs (each colour may be in one pair only)")
            used.add(n)
        if a == b:
            raise ValueError(f"similar: pair {pair!r} names one colour twice")
        if not (isinstance(rho, (int, float)) and 0.0 <= float(rho) <= 1.0):
            raise ValueError(f"similar: cosine of {pair!r} must lie in [0, 1], got {rho!r}")
        out[(a, b)] = float(rho)
    return out


@dataclass
class OracleSamFeatures:
    """What the SAM-oracle's "encoder" computes once per image: region labels and their pixel counts."""

    regions: np.ndarray  # (H, W) int32 in [0, n_regions)
    areas: np.ndarray  # (n_regions,) int64


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n^2, 2) (x, y) in [0, 1], exactly segment_anything.utils.amg.build_point_grid (row-major, y outer)."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


class OracleSam:
    """SamModel stand-in: masks are the 4-connected same-colour regions of the image's nearest-colour map."""

    model_id = "oracle-sam"
    weights_sha256 = None
    image_size = 1024

    def __init__(self, device: torch.device):
        self.device = device
        self.embed_calls = 0  # encoder passes, so callers can check the one-embedding-per-image rule
        self.decoder_calls = 0

    def embed(self, image: np.ndarray) -> SamEmbedding:
        """(H, W, 3) uint8 -> embedding (one "encoder pass": colour classification + region labelling)."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"SAM-oracle embed: expected an (H, W, 3) uint8 image, got "
                             f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', None)}")
        self.embed_calls += 1
        H, W = image.shape[:2]
        regions, n = label_regions(nearest_colour(image))
        areas = np.bincount(regions.ravel(), minlength=n).astype(np.int64)
        scale = self.image_size / max(H, W)
        input_hw = (int(round(H * scale)), int(round(W * scale)))
        return SamEmbedding(original_hw=(H, W), input_hw=input_hw, features=OracleSamFeatures(regions, areas))

    @staticmethod
    def _features(emb: SamEmbedding) -> OracleSamFeatures:
        if not isinstance(emb, SamEmbedding) or not isinstance(emb.features, OracleSamFeatures):
            raise TypeError("SAM-oracle needs an embedding made by OracleSam.embed")
        return emb.features

    def _regions_at(self, feats: OracleSamFeatures, xy: np.ndarray) -> np.ndarray:
        H, W = feats.regions.shape
        cols = np.clip(np.floor(xy[..., 0]).astype(np.int64), 0, W - 1)
        rows = np.clip(np.floor(xy[..., 1]).astype(np.int64), 0, H - 1)
        return feats.regions[rows, cols]

    def predict_points(self, emb: SamEmbedding, points: np.ndarray, outputs: str = "multimask"
                       ) -> tuple[np.ndarray, np.ndarray]:
        """points (N, n, 2) (x, y) original px -> masks (N, M, H, W) bool, iou_pred (N, M) float32: M = 4 / 3 / 1
        for `all4` / `multimask` / `single`, every output the union of the hit regions (predicted IoU: 0.93 for
        the single-mask output, 0.95 / 0.90 / 0.85 for the multimask ones)."""
        if outputs not in _POINT_IOU:
            raise ValueError(f"outputs must be one of {', '.join(_POINT_IOU)}, got {outputs!r}")
        feats = self._features(emb)
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 3 or points.shape[2] != 2 or points.shape[1] < 1:
            raise ValueError(f"points must be (N, n, 2) with n >= 1, got shape {points.shape}")
        if not np.isfinite(points).all():
            raise ValueError("points contain NaN or infinite coordinates")
        self.decoder_calls += 1
        N = points.shape[0]
        hit = self._regions_at(feats, points)  # (N, n)
        table = np.zeros((N, feats.areas.size), dtype=bool)
        table[np.arange(N)[:, None], hit] = True
        masks = table[:, feats.regions]  # (N, H, W)
        masks = np.repeat(masks[:, None], len(_POINT_IOU[outputs]), axis=1)
        iou = np.tile(np.asarray(_POINT_IOU[outputs], dtype=np.float32), (N, 1))
        return masks, iou

    def generate(self, emb: SamEmbedding, cfg: AutoMaskConfig) -> list[AutoMask]:
        """Every region whose area lies in [min_area_frac, max_area_frac] of the image and that a grid point hits,
        in the order the grid (row-major, as SAM's) first hits them."""
        feats = self._features(emb)
        if cfg.points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {cfg.points_per_side}")
        self.decoder_calls += 1
        if AUTO_PREDICTED_IOU < cfg.pred_iou_thresh or AUTO_STABILITY < cfg.stability_score_thresh:
            return []
        H, W = feats.regions.shape
        grid = build_point_grid(cfg.points_per_side) * np.array([W, H], dtype=np.float64)
        hit = self._regions_at(feats, grid)
        ids, first = np.unique(hit, return_index=True)
        ids = ids[np.argsort(first, kind="stable")]
        total = H * W
        keep = [int(k) for k in ids
                if cfg.min_area_frac * total <= feats.areas[k] <= cfg.max_area_frac * total]
        return [AutoMask(segmentation=feats.regions == k, predicted_iou=AUTO_PREDICTED_IOU,
                         stability_score=AUTO_STABILITY) for k in keep]

    def embedding_arrays(self, emb: SamEmbedding) -> dict[str, np.ndarray]:
        """The "embedding" as host arrays (the relabel store): `regions` (H, W), `areas` (n_regions,)."""
        feats = self._features(emb)
        return {"regions": feats.regions, "areas": feats.areas}

    def embedding_from_arrays(self, arrays: dict[str, np.ndarray], original_hw: tuple[int, int],
                              input_hw: tuple[int, int]) -> SamEmbedding:
        return SamEmbedding(original_hw=(int(original_hw[0]), int(original_hw[1])),
                            input_hw=(int(input_hw[0]), int(input_hw[1])),
                            features=OracleSamFeatures(np.asarray(arrays["regions"]), np.asarray(arrays["areas"])))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The host half of `embed` (the real adapter resizes here); the oracle's "encoder" needs the image itself."""
        return image

    def embed_many(self, images: list[np.ndarray], prepared: list[np.ndarray] | None = None) -> list[SamEmbedding]:
        """`embed` of each image, in order (exact per image: one "encoder pass" each)."""
        return [self.embed(image) for image in images]


class OracleDino:
    """DinoModel stand-in: mean patch colour through a fixed linear map, plus content-seeded noise."""

    model_id = "oracle-dino"
    weights_sha256 = None
    patch_size = 14

    def __init__(self, device: torch.device, embed_dim: int = 64, noise: float = 0.05):
        self.device = device
        self.embed_dim = embed_dim
        self.noise = noise
        g = torch.Generator().manual_seed(ORACLE_SEED + 1)
        self.colour_map = torch.randn(3, embed_dim, generator=g).to(device)  # (3, C)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 14 -> (B, H/14, W/14, C) float32."""
        _check_images(images, "features")
        P = self.patch_size
        if images.shape[2] % P or images.shape[3] % P:
            raise ValueError(f"features: H and W must be multiples of {P}, got {tuple(images.shape[2:])}")
        x = images.to(self.device, torch.float32)
        mean = F.avg_pool2d(x, P)  # (B, 3, h, w)
        feats = torch.einsum("bchw,cd->bhwd", mean - 0.5, self.colour_map)
        h, w = feats.shape[1:3]
        # The noise depends on the pixels only (as uint8 levels), never on call order or batch composition.
        levels = (x * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        noise = []
        for img in levels:
            g = torch.Generator().manual_seed(_seed_of(b"oracle-dino:", str(img.shape).encode(), img.tobytes()))
            noise.append(torch.randn(h, w, self.embed_dim, generator=g))
        return feats + self.noise * torch.stack(noise).to(self.device)


def build_oracle_clip(device: str | torch.device = "cpu", dense_mode: str = "maskclip",
                      similar: dict[tuple[str, str], float] | None = None, noise: float = 0.0,
                      noise_block: int = 1) -> OracleClip:
    """The CLIP-oracle; `similar`, `noise` and `noise_block` make some classes confusable (default: exact)."""
    return OracleClip(resolve_device(device), dense_mode=dense_mode, similar=similar, noise=noise,
                      noise_block=noise_block)


def build_oracle_sam(device: str | torch.device = "cpu") -> OracleSam:
    return OracleSam(resolve_device(device))


def build_oracle_dino(device: str | torch.device = "cpu") -> OracleDino:
    return OracleDino(resolve_device(device))
