"""The training settings of Stage 2 (DESIGN §1), each defined once with its type, bounds, default and description
(fmbseg/settings.py), and what their "auto" values resolve to. `TrainConfig.hashed()` is what the train hash
covers; `TrainOverrides` is the `train` parameter of the flows and the training flags of `fmbseg train`.

Kept free of torch, so the CLI builds its flags from this model without loading torch.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import Field, Strict

from fmbseg.settings import AsGiven, Settings, overrides_model

# Settings that do not change the trained weights, left out of the train hash.
UNHASHED = ("device",)

# `--epochs auto`: the paper's 10 epochs, or enough epochs for this many SGD steps at the reference batch of 5
# images, whichever is more. The budget is counted in image passes at batch 5 (issue 8: batch 1 with 1000 steps
# does not align), so a larger --batch-size gets the same epochs, i.e. fewer steps.
AUTO_MIN_EPOCHS = 10
AUTO_MIN_STEPS = 2000
AUTO_REF_BATCH = 5


# `train_size="auto"`: DESIGN's 448 px view, or 224 px on a campaign small enough that `--epochs auto` at least
# doubles the paper's 10 epochs (< 500 images). There the 2000-step floor multiplies the number of steps by
# 1000 / images, and each step's TSupCon cost grows with the square of the patches per batch (5 x 32² at 448,
# 5 x 16² at 224: 16x less): measured on the 2-core CPU, 2000 steps at 448 take hours, at 224 minutes.
AUTO_SIZE_LARGE, AUTO_SIZE_SMALL, AUTO_SIZE_MIN_IMAGES = 448, 224, 500


def auto_train_size(images: int) -> int:
    """448 for a campaign of >= 500 images, else 224."""
    return AUTO_SIZE_LARGE if images >= AUTO_SIZE_MIN_IMAGES else AUTO_SIZE_SMALL


def auto_epochs(images: int) -> int:
    """max(10, the fewest epochs giving >= 2000 steps at batch 5) for a campaign of `images` images."""
    steps_per_epoch = max(1, math.ceil(images / AUTO_REF_BATCH))
    return max(AUTO_MIN_EPOCHS, math.ceil(AUTO_MIN_STEPS / steps_per_epoch))


Auto = Literal["auto"]
PositiveInt = Annotated[int, Ge(1)]
Bool = Annotated[bool, Strict()]  # true or false, not "yes" or 1


class TrainConfig(Settings):
    """DESIGN §1 Stage-2 defaults.

    `epochs`: an integer or "auto" (`auto_epochs` of the campaign's image count). `train_size`: a multiple of the
    DINOv2 patch or "auto" (`auto_train_size`). `cache_features`: True, False or "auto" (cache when the disk has
    room, see `resolve_cache`). All three are resolved before hashing (`resolved`), so the train hash names what
    actually ran: cached features are fp16, so a cached run's weights differ (slightly) from an uncached one's and
    the two never share a checkpoint; an explicit setting equal to what "auto" resolves to shares the hash.
    `procrustes`: after every epoch, turn the output space so the epoch's class centroids point at their text
    anchors (`fmbseg.alignment.rotate_to_anchors`; TSupCon itself is unchanged, see docs/STAGE2.md).
    `crop_min`: every batch trains on a random window of each image's patch grid, its sides drawn in
    [ceil(crop_min x side), side] (`fmbseg.alignment.random_windows`); 1 = the whole view every time. Numbers are
    hashed as given (`AsGiven`: lr 1 and lr 1.0 are different checkpoints, as they always were)."""

    what: ClassVar[str] = "train config"

    epochs: PositiveInt | Auto = Field(
        "auto", description="Training epochs; auto: 10, or enough epochs for >= 2000 SGD steps at batch 5 on a "
        "small campaign (the larger of the two).")
    batch_size: PositiveInt = Field(5, description="Images per SGD step.")
    lr: AsGiven(Gt(0)) = Field(0.1, description="Initial learning rate (cosine schedule to 0).")
    momentum: AsGiven(Ge(0), Lt(1)) = Field(0.9, description="SGD momentum.")
    weight_decay: AsGiven(Ge(0)) = Field(1e-4, description="SGD weight decay.")
    temperature: AsGiven(Gt(0)) = Field(0.1, description="TSupCon temperature tau.")
    train_size: PositiveInt | Auto = Field(
        "auto", description="Training view in px: short side resized, centre-cropped square, a multiple of the "
        "DINOv2 patch (14); auto: 448, or 224 on a campaign of fewer than 500 images.")
    seed: int = Field(0, description="Training seed (initialisation and the per-epoch shuffle).")
    cache_features: Bool | Auto = Field(
        "auto", description="Cache DINOv2 features (fp16) in <campaign>/features/; auto: when the campaign is on a "
        "local disk with room for it. Cached and uncached runs are different checkpoints.")
    procrustes: Bool = Field(
        True, description="After each epoch, turn the output space so the class centroids point at their text "
        "anchors (docs/STAGE2.md); false: the paper's plain SGD.")
    crop_min: Annotated[float, Gt(0), Le(1)] = Field(
        0.4, description="Each batch trains on random windows of the patch grid, sides drawn from crop_min x the "
        "grid's side to all of it (fmbseg.alignment.random_windows); 1: always the whole view. Small campaigns "
        "otherwise learn each class by its images' context (docs/STAGE2.md).")
    device: str = Field("auto", description="auto, cpu or cuda[:N]; not part of the train hash.")

    def hashed(self) -> dict:
        if "auto" in (self.epochs, self.train_size, self.cache_features):
            raise ValueError("resolve epochs, train_size and cache_features (TrainConfig.resolved) before hashing")
        d = {k: v for k, v in self.to_dict().items() if k not in UNHASHED}
        if d["crop_min"] == 1:
            # The whole view every step is what checkpoints written before `crop_min` existed did: they keep their
            # hash under `crop_min=1`.
            del d["crop_min"]
        return d

    def resolved(self, images: int, cache: bool) -> "TrainConfig":
        """This config with every "auto" resolved for a campaign of `images` images: epochs = auto_epochs(images),
        train_size = auto_train_size(images), cache_features = `cache`."""
        return self.replace(epochs=auto_epochs(images) if self.epochs == "auto" else self.epochs,
                            train_size=auto_train_size(images) if self.train_size == "auto" else self.train_size,
                            cache_features=cache if self.cache_features == "auto" else self.cache_features)


# The `train` parameter of the flows and the training flags of `fmbseg train`: any subset of the settings.
TrainOverrides = overrides_model(TrainConfig, "TrainOverrides",
                                 "Training settings to change; empty ones keep their default.")
