"""The interfaces every model adapter satisfies (real open_clip / segment-anything / transformers models and the
oracle stand-ins of the synthetic world alike).

Conventions: images are `np.ndarray (H, W, 3) uint8` RGB, upright. Tensors fed to adapters are
`(B, 3, H, W) float32` in [0, 1], not normalised (each adapter normalises with its own statistics).
Point coordinates are `(x, y)` in original-image pixels, continuous (pixel centre of column j is j + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from annotated_types import Ge, Le
from pydantic import Field, model_validator

from fmbseg.settings import Settings

# Which of SAM's 4 decoder outputs a point prompt returns (see `SamModel.predict_points`).
POINT_OUTPUTS = ("all4", "multimask", "single")


Fraction = Annotated[float, Ge(0), Le(1)]


class AutoMaskConfig(Settings):
    """Settings of SAM's automatic mask generation (DESIGN §1, Stage 1.2). Areas are fractions of the image.
    The decode batch is not here: it changes no output, so it is the SAM adapter's execution setting.
    `fmbseg.stage1.Stage1Config` extends these fields (one definition of each)."""

    what: ClassVar[str] = "automatic-mask config"

    points_per_side: Annotated[int, Ge(1)] = Field(
        32, description="Stage 1.2: SAM's automatic masks are prompted by a points_per_side x points_per_side grid "
        "of single points over the image.")
    pred_iou_thresh: Fraction = Field(
        0.88, description="Stage 1.2: keep an automatic mask when SAM's predicted IoU is at least this.")
    stability_score_thresh: Fraction = Field(
        0.95, description="Stage 1.2: keep an automatic mask when its stability score (IoU of the mask thresholded "
        "at +/- stability_score_offset) is at least this.")
    stability_score_offset: Annotated[float, Ge(0)] = Field(
        1.0, description="Stage 1.2: the logit offset of the stability score.")
    box_nms_thresh: Fraction = Field(
        0.7, description="Stage 1.2: box IoU above which the automatic mask with the lower predicted IoU is "
        "suppressed.")
    min_area_frac: Fraction = Field(
        0.0005, description="Stage 1.2: drop automatic masks smaller than this fraction of the image area.")
    max_area_frac: Fraction = Field(
        0.95, description="Stage 1.2: drop automatic masks larger than this fraction of the image area.")

    @model_validator(mode="after")
    def _area_range(self):
        if self.min_area_frac > self.max_area_frac:
            raise ValueError(f"min_area_frac {self.min_area_frac} exceeds max_area_frac {self.max_area_frac}")
        return self


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
