"""The interfaces every model adapter satisfies (real open_clip / segment-anything / transformers models and the
oracle stand-ins of the synthetic world alike).

Conventions: images are `np.ndarray (H, W, 3) uint8` RGB, upright. Tensors fed to adapters are
`(B, 3, H, W) float32` in [0, 1], not normalised (each adapter normalises with its own statistics).
Point coordinates are `(x, y)` in original-image pixels, continuous (pixel centre of column j is j + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

# The automatic-mask settings and the point-output names are defined with the other Stage-1 settings.
from fmbseg.stage1_config import POINT_OUTPUTS, AutoMaskConfig  # noqa: F401 - re-exported


@dataclass
class AutoMask:
    """One automatic mask: `segmentation (H, W) bool` at the original resolution."""

    segmentation: np.ndarray
    predicted_iou: float
    stability_score: float


@dataclass
class SamEmbedding:
    """The result of one SAM image-encoder pass; reusable by point prompts and automatic generation.

    `original_hw` is the image's (H, W); `features` is whatever the implementation needs
    (the encoder output `(1, 256, h, w)` for real SAM, the image itself for the oracle)."""

    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    features: Any


@runtime_checkable
class ClipModel(Protocol):
    input_size: int
    patch_size: int
    embed_dim: int
    model_id: str
    weights_sha256: str | None
    device: torch.device

    def encode_text(
        self, names: Sequence[str | Sequence[str]], templates: Sequence[str] = ("a photo of a {}.",)
    ) -> torch.Tensor:
        """-> (K, D) L2-normalised; a name given as a list of synonyms averages their embeddings."""

    def encode_crops(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> cls (B, D), dense (B, S/P, S/P, D), both L2-normalised."""

    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of P -> (B, H/P, W/P, D) L2-normalised."""


@runtime_checkable
class SamModel(Protocol):
    image_size: int
    model_id: str
    weights_sha256: str | None
    device: torch.device

    def embed(self, image: np.ndarray) -> SamEmbedding:
        """(H, W, 3) uint8 -> embedding; exactly one image-encoder pass."""

    def predict_points(self, emb: SamEmbedding, points: np.ndarray, outputs: str = "multimask"
                       ) -> tuple[np.ndarray, np.ndarray]:
        """points (N, n, 2) (x, y) original px, all positive, one decoder call for the N prompt sets
        -> masks (N, M, H, W) bool at original resolution, iou_pred (N, M) float32. `outputs` (POINT_OUTPUTS):
        `multimask` M = 3 (SAM's multimask tokens 1-3), `single` M = 1 (the single-mask token 0), `all4` M = 4
        (token 0 first, then tokens 1-3), all from the same decoder call."""

    def generate(self, emb: SamEmbedding, cfg: AutoMaskConfig) -> list[AutoMask]:
        """Automatic masks from the precomputed embedding (no crop layers, no re-embedding)."""


@runtime_checkable
class DinoModel(Protocol):
    patch_size: int
    embed_dim: int
    model_id: str
    weights_sha256: str | None
    device: torch.device

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of patch_size -> (B, H/p, W/p, C), CLS/registers dropped."""


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
