"""The five segmenters of DESIGN §2 behind one interface: `predict(image (H, W, 3) uint8, class_names) -> (H, W)
int64` class indices into `class_names` (a name may be a list of synonyms whose text embeddings are averaged).

- `maskclip`: per-pixel arg-max of cosine(dense CLIP, text), similarities upsampled bilinearly before the arg-max.
- `fmbseg`: the same over DINOv2 features passed through the trained alignment module.
- `stage1.1`, `stage1.2`, `stage1`: Stage 1 on the whole test image at its Stage-1 settings, masks painted in
  increasing score order (`stage1` paints all 1.1 and *all* 1.2 masks); pixels no mask covers take the
  `maskclip` prediction of the same image.

`maskclip` and `fmbseg` run TCL's protocol (`SlidingWindow`): resize so the short side is 448 with the long side
at most 2048 (aspect kept), 448² windows at stride 224 (last row/column flush with the border), logits averaged
over overlaps, the arg-max map resized (nearest) to the input's resolution.

Background rule (voc21, coco_object): with `background_names` set, those names (the 91 COCO-Stuff stuff classes)
are added as extra prompts and every one of them predicts the class named "background".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.alignment import AlignmentConfig, AlignmentModule, load_alignment, nearest_resize, resize_image
from fmbseg.device import autocast
from fmbseg.models.base import ClipModel, DinoModel

ClassNames = Sequence["str | Sequence[str]"]
SEGMENTER_NAMES = ("maskclip", "stage1.1", "stage1.2", "stage1", "fmbseg")
STAGE1_SEGMENTERS = ("stage1.1", "stage1.2", "stage1")


class Segmenter(Protocol):
    name: str

    def predict(self, image: np.ndarray, class_names: ClassNames) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W) int64 indices into class_names."""


@dataclass(frozen=True)
class Prompts:
    """What the text encoder sees: `prompts[i]` (a name or a synonym list) predicts class `to_class[i]`."""

    prompts: tuple
    to_class: np.ndarray       # (P,) int64

    @property
    def key(self) -> tuple:
        return tuple(p if isinstance(p, str) else tuple(p) for p in self.prompts)


def build_prompts(class_names: ClassNames, background_names: Sequence[str] = ()) -> Prompts:
    """The class names in order, then (when a class is named "background" and `background_names` is given) the
    background names, all mapped to that class."""
    if len(class_names) == 0:
        raise ValueError("no class names given")
    prompts = [n if isinstance(n, str) else tuple(n) for n in class_names]
    to_class = list(range(len(prompts)))
    primary = [p if isinstance(p, str) else p[0] for p in prompts]
    if background_names and "background" in primary:
        bg = primary.index("background")
        extra = [n for n in background_names if n not in primary]
        prompts += extra
        to_class += [bg] * len(extra)
    return Prompts(tuple(prompts), np.asarray(to_class, dtype=np.int64))


class TextCache:
    """Text embeddings per prompt list, computed once (an evaluation asks for the same list per image)."""

    def __init__(self, clip: ClipModel):
        self.clip = clip
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, prompts: Prompts) -> torch.Tensor:
        """-> (P, D) float32 L2-normalised on the CLIP model's device."""
        if prompts.key not in self._cache:
            names = [p if isinstance(p, str) else list(p) for p in prompts.prompts]
            with torch.no_grad():
                t = self.clip.encode_text(names)
            self._cache[prompts.key] = F.normalize(t.float(), dim=-1)
        return self._cache[prompts.key]


@dataclass(frozen=True)
class SlidingWindow:
    """TCL's evaluation protocol (DESIGN §2)."""

    short_side: int = 448
    max_long_side: int = 2048
    window: int = 448
    stride: int = 224
    batch_size: int = 8

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """mmsegmentation's keep-ratio resize to scale (long ≤ max_long_side, short = short_side), rounded half up
        as mmcv's `rescale_size` does (`int(x + 0.5)`, not Python's round-half-to-even)."""
        scale = min(self.max_long_side / max(height, width), self.short_side / min(height, width))
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y0, x0, y1, x1) windows over an image of that size, as mmsegmentation's slide inference."""
        wh, ww = min(self.window, height), min(self.window, width)
        rows = max(height - self.window + self.stride - 1, 0) // self.stride + 1
        cols = max(width - self.window + self.stride - 1, 0) // self.stride + 1
        out = []
        for r in range(rows):
            for c in range(cols):
                y1, x1 = min(r * self.stride + wh, height), min(c * self.stride + ww, width)
                out.append((y1 - wh, x1 - ww, y1, x1))
        return out


def sliding_logits(image: np.ndarray, embed: Callable[[torch.Tensor], torch.Tensor], text: torch.Tensor,
                   patch: int, window: SlidingWindow, device: torch.device) -> torch.Tensor:
    """Cosine similarities averaged over the sliding windows.

    image (H, W, 3) uint8; embed: (B, 3, h, w) in [0, 1] (h, w multiples of `patch`) -> (B, h/p, w/p, D)
    normalised; text (P, D) normalised -> (P, H', W') float32 logits at the protocol's resized size.
    Windows whose size is not a multiple of `patch` (images smaller than a window) are padded by edge
    replication and their logits cropped back."""
    h, w = image.shape[:2]
    rh, rw = window.resized_hw(h, w)
    x = resize_image(image, (rh, rw)).to(device)
    boxes = window.windows(rh, rw)
    wh, ww = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
    ph, pw = math.ceil(wh / patch) * patch, math.ceil(ww / patch) * patch
    acc = torch.zeros((text.shape[0], rh, rw), dtype=torch.float32, device=device)
    count = torch.zeros((1, rh, rw), dtype=torch.float32, device=device)
    text = text.to(device)
    for b0 in range(0, len(boxes), window.batch_size):
        chunk = boxes[b0:b0 + window.batch_size]
        crops = torch.stack([x[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
        if (ph, pw) != (wh, ww):
            crops = F.pad(crops, (0, pw - ww, 0, ph - wh), mode="replicate")
        with torch.no_grad(), autocast(device):
            feats = embed(crops)
        sims = torch.einsum("bhwd,pd->bphw", F.normalize(feats.float(), dim=-1), text)
        for (y0, x0, y1, x1), s in zip(chunk, sims):
            up = F.interpolate(s[None], size=(ph, pw), mode="bilinear", align_corners=False)[0]
            acc[:, y0:y1, x0:x1] += up[:, :wh, :ww]
            count[:, y0:y1, x0:x1] += 1
    return acc / count


class DenseSegmenter:
    """Arg-max of sliding-window cosine logits of a dense embedding function against the text embeddings."""

    name = "dense"

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], text: TextCache, patch: int,
                 device: torch.device, background_names: Sequence[str] = (), window: SlidingWindow = SlidingWindow()):
        self.embed = embed      # (B, 3, h, w) in [0, 1] -> (B, h/p, w/p, D)
        self.text = text
        self.patch = patch
        self.device = device
        self.background_names = tuple(background_names)
        self.window = window

    def logits(self, image: np.ndarray, class_names: ClassNames) -> tuple[torch.Tensor, Prompts]:
        """-> ((P, H', W') logits at the protocol's resized size, the prompts they score)."""
        prompts = build_prompts(class_names, self.background_names)
        return sliding_logits(image, self.embed, self.text(prompts), self.patch, self.window, self.device), prompts

    def predict(self, image: np.ndarray, class_names: ClassNames) -> np.ndarray:
        _check_image(image)
        logits, prompts = self.logits(image, class_names)
        best = logits.argmax(0).cpu().numpy()
        return nearest_resize(prompts.to_class[best], image.shape[:2])


class MaskClipSegmenter(DenseSegmenter):
    """`maskclip`: dense CLIP (MaskCLIP value path) against the text embeddings."""

    name = "maskclip"

    def __init__(self, clip: ClipModel, background_names: Sequence[str] = (), window: SlidingWindow = SlidingWindow(),
                 text: TextCache | None = None):
        super().__init__(clip.encode_dense, text or TextCache(clip), clip.patch_size, clip.device,
                         background_names, window)
        self.clip = clip


class FmbsegSegmenter(DenseSegmenter):
    """`fmbseg`: frozen DINOv2 patch features -> alignment module -> CLIP text space."""

    name = "fmbseg"

    def __init__(self, dino: DinoModel, alignment: AlignmentModule, clip: ClipModel,
                 background_names: Sequence[str] = (), window: SlidingWindow = SlidingWindow(),
                 text: TextCache | None = None):
        super().__init__(self._embed, text or TextCache(clip), dino.patch_size, dino.device, background_names,
                         window)
        self.dino = dino
        self.alignment = alignment.to(dino.device).eval()

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.alignment(self.dino.features(images).float())


def load_fmbseg(checkpoint: dict, dino: DinoModel, clip: ClipModel, background_names: Sequence[str] = (),
                window: SlidingWindow = SlidingWindow(), text: TextCache | None = None) -> FmbsegSegmenter:
    """An `fmbseg` segmenter from a loaded checkpoint (`fmbseg.checkpoint.load_checkpoint`) and the encoders it
    names; encoders other than the ones it was trained on are refused (their features mean something else)."""
    enc = checkpoint["encoders"]
    for role, model in (("dino", dino), ("clip", clip)):
        want = enc.get(role) or {}
        if want.get("model_id") != model.model_id or want.get("weights_sha256") != model.weights_sha256:
            raise ValueError(
                f"the checkpoint was trained with {role} {want.get('model_id')} (weights sha256 "
                f"{want.get('weights_sha256')}), but {model.model_id} (sha256 {model.weights_sha256}) was given")
    align_cfg = AlignmentConfig(**checkpoint["config"]["alignment"])
    module = load_alignment(align_cfg, checkpoint["model"])
    return FmbsegSegmenter(dino, module, clip, background_names, window, text)


# -- Stage 1 as a segmenter ---------------------------------------------------------------------------------------

def stage1_predictions(result, fallback: np.ndarray, to_class: np.ndarray) -> dict[str, np.ndarray]:
    """The three Stage-1 segmenters' maps from one `Stage1Result`: `stage1.1` (its 1.1 masks), `stage1.2` (its 1.2
    masks), `stage1` (all masks), each painted by Stage 1's own merge rule (increasing score, the highest wins);
    mask class ids are prompt ids, mapped through `to_class`; uncovered pixels take `fallback` (H, W) (the
    maskclip prediction). -> {name: (H, W) int64}."""
    from fmbseg import IGNORE_LABEL
    from fmbseg.stage1 import merge_label_map

    h, w = result.height, result.width
    if fallback.shape != (h, w):
        raise ValueError(f"fallback map {fallback.shape} does not match the image {(h, w)}")
    stages = np.array([m.stage for m in result.masks])
    choices = {"stage1.1": stages == "1.1", "stage1.2": stages == "1.2",
               "stage1": np.ones(len(result.masks), dtype=bool)}
    lookup = np.append(np.asarray(to_class, dtype=np.int64), -1)     # IGNORE_LABEL -> -1 via the last slot
    out = {}
    for name, selected in choices.items():
        painted = merge_label_map(result.masks, selected.reshape(len(result.masks)), h, w).astype(np.int64)
        painted = lookup[np.where(painted == IGNORE_LABEL, len(lookup) - 1, painted)]
        out[name] = np.where(painted >= 0, painted, fallback)
    return out


class Stage1Segmenters:
    """Runs Stage 1 once per image and serves `stage1.1`, `stage1.2` and `stage1` from it."""

    def __init__(self, clip: ClipModel, sam, config, maskclip: MaskClipSegmenter, seed: int = 0):
        self.clip = clip
        self.sam = sam
        self.config = config
        self.maskclip = maskclip
        self.seed = seed

    def predict_all(self, image: np.ndarray, class_names: ClassNames, image_id: str = "",
                    fallback: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """-> {"stage1.1", "stage1.2", "stage1"} (H, W) int64 maps; `fallback` is the maskclip prediction when the
        caller already has it."""
        from fmbseg.stage1 import run_stage1

        _check_image(image)
        prompts = build_prompts(class_names, self.maskclip.background_names)
        if fallback is None:
            fallback = self.maskclip.predict(image, class_names)
        text = self.maskclip.text(prompts)
        result = run_stage1(image, self.clip, self.sam, text, self.config, self.seed, image_id)
        return stage1_predictions(result, fallback, prompts.to_class)

    def segmenter(self, name: str) -> "Stage1Segmenter":
        if name not in STAGE1_SEGMENTERS:
            raise ValueError(f"unknown Stage-1 segmenter {name!r}; choose from {STAGE1_SEGMENTERS}")
        return Stage1Segmenter(self, name)


@dataclass
class Stage1Segmenter:
    """One of `stage1.1`, `stage1.2`, `stage1` with the plain `predict` interface."""

    family: Stage1Segmenters
    name: str

    def predict(self, image: np.ndarray, class_names: ClassNames) -> np.ndarray:
        return self.family.predict_all(image, class_names)[self.name]


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {getattr(image, 'shape', type(image))} "
                         f"{getattr(image, 'dtype', '')}")
