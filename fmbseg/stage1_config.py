"""The Stage-1 settings (DESIGN §1), each defined once with its type, bounds, default and description
(fmbseg/settings.py): `AutoMaskConfig` (SAM's automatic masks, Stage 1.2) and `Stage1Config`, which extends it
with the rest. `Stage1Config.to_dict()` is the `stage1` dict of campaign.json, which the campaign's config hash
covers; `Stage1Overrides` is the `stage1` parameter of the flows and the Stage-1 flags of `fmbseg label`.

Kept free of torch, so the CLI builds its flags from these models without loading the models' libraries.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Gt, Le, MinLen
from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from fmbseg.settings import Settings, overrides_model

# Dense CLIP paths (DESIGN §3, fmbseg/models/clip.py implements them).
DENSE_MODES = ("maskclip", "clearclip", "sclip")
DenseMode = Literal[DENSE_MODES]

# Which of SAM's 4 decoder outputs a point prompt returns (see `SamModel.predict_points`).
POINT_OUTPUTS = ("all4", "multimask", "single")

Fraction = Annotated[float, Ge(0), Le(1)]


class AutoMaskConfig(Settings):
    """Settings of SAM's automatic mask generation (DESIGN §1, Stage 1.2). Areas are fractions of the image.
    The decode batch is not here: it changes no output, so it is the SAM adapter's execution setting.
    `Stage1Config` extends these fields (one definition of each)."""

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


STAGE12_UNDETECTED = ("paper", "drop")
# What a stored campaign config that predates a field meant (see `Stage1Config.from_stored`).
_LEGACY_VALUES = {"point_outputs": "multimask", "stage12_undetected": "paper"}

PointOutputs = Literal[POINT_OUTPUTS]
Stage12Undetected = Literal[STAGE12_UNDETECTED]
PositiveInt = Annotated[int, Ge(1)]


def _check_templates(templates: tuple[str, ...]) -> tuple[str, ...]:
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must be a string with exactly one '{{}}'")
    return templates


def _not_one_string(v: Any) -> Any:
    if isinstance(v, str):
        raise ValueError("templates must be a list of strings, not one string")
    return v


Templates = Annotated[tuple[str, ...], BeforeValidator(_not_one_string), MinLen(1), AfterValidator(_check_templates)]


class Stage1Config(AutoMaskConfig):
    """Every Stage-1 setting (DESIGN §1) with its default: the automatic-mask fields of `AutoMaskConfig` and the
    ones below. `to_dict()` is what campaign.json stores and the campaign's Stage-1 config hash covers."""

    what: ClassVar[str] = "Stage-1 config"

    upscale: Annotated[float, Gt(0)] = Field(
        2.0, description="Stage 1.1: the image is upscaled by this factor before CLIP's sliding window (capped by "
        "max_side).")
    max_side: PositiveInt = Field(
        2048, description="Stage 1.1: the long side of the upscaled image is at most this many pixels.")
    clip_batch_size: PositiveInt = Field(
        32, description="Stage 1.1: CLIP crops per forward pass of the sliding window.")
    min_crop_votes: PositiveInt = Field(
        1, description="Stage 1.1: a class is detected when it is the best class of at least this many crops.")
    points_per_class: PositiveInt = Field(
        5, description="Stage 1.1: positive point prompts per detected class (its most similar dense CLIP "
        "patches), one SAM prompt.")
    # Kept (and hashed) so campaigns written before keep their hash; the automatic-mask decode batch is now the SAM
    # adapter's execution setting (`make_sam(points_per_batch=...)`, default by device), which changes no output.
    points_per_batch: PositiveInt = Field(
        64, description="Changes no output (the decode batch is now the SAM adapter's execution setting); kept "
        "because campaigns record it: set it only to extend a campaign labelled with another value.")
    stage12_fraction: Fraction = Field(
        0.75, description="Merge: the fraction of Stage-1.2 masks drawn (seeded per image) into the label map; "
        "every Stage-1.1 mask is kept.")
    templates: Templates = Field(
        ("a photo of a {}.",), description="CLIP text prompts, each with one '{}' for the class name; a class's "
        "text embedding is the mean over the templates.")
    # A campaign.json written before this field existed reads it as maskclip (the only path then; `from_stored`).
    dense_mode: DenseMode = Field(
        "maskclip", description="Dense CLIP features (DESIGN §3): maskclip (value path), clearclip (q-q attention, "
        "no residual or FFN in the last block) or sclip (q-q + k-k attention).")
    point_outputs: PointOutputs = Field(
        "all4", description="Stage 1.1: which SAM decoder outputs a class's point set may pick from (the highest "
        "predicted IoU wins): all4 (the single-mask token and the 3 multimask tokens), multimask (tokens 1-3, what "
        "campaigns labelled before this setting used) or single (token 0).")
    stage12_undetected: Stage12Undetected = Field(
        "paper", description="Stage 1.2: paper gives an automatic mask the best detected class; drop discards a "
        "mask whose best class over the whole vocabulary was not detected (an A/B option, not the paper's).")

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> "Stage1Config":
        """The config a stored campaign was labelled with: like `from_dict`, except that a field added after the
        campaign was written takes the value that reproduces the old behaviour (a missing `point_outputs` is
        `multimask`, a missing `stage12_undetected` is `paper`), not today's default."""
        return cls.from_dict({**_LEGACY_VALUES, **d})

    def auto_mask_config(self) -> AutoMaskConfig:
        return AutoMaskConfig(**{name: getattr(self, name) for name in AutoMaskConfig.model_fields})


# The `stage1` parameter of the flows and the Stage-1 flags of `fmbseg label`: any subset of the settings, on top of
# the preset's.
Stage1Overrides = overrides_model(
    Stage1Config, "Stage1Overrides", "Stage-1 settings to change; empty ones keep the preset's value.")
