"""The five segmenters of DESIGN §2 behind one interface: `predict(image (H, W, 3) uint8, class_names) -> (H, W)
int64` class indices into `class_names` (a name may be a list of synonyms whose text embeddings are averaged).

- `maskclip`: per-pixel arg-max of cosine(dense CLIP, text), similarities upsampled bilinearly before the arg-max.
- `fmbseg`: the same over DINOv2 features passed through the trained alignment module.
- `stage1.1`, `stage1.2`, `stage1`: Stage 1 on the whole test image at its Stage-1 settings, masks painted in
  increasing score order (`stage1` paints all 1.1 and *all* 1.2 masks); pixels no mask covers take the
  `maskclip` prediction of the same image.

`maskclip` and `fmbseg` run TCL's protocol (`fmbseg.protocol`, mmseg 0.27 / mmcv 1.6): resize the uint8 image as
mmcv does (cv2 INTER_LINEAR, no antialiasing) so the short side is 448 with the long side at most 2048 (aspect
kept), 448² windows at stride 224 (last row/column flush with the border; a window not a multiple of the patch is
zero-padded after normalisation, centred, as TCL pads it), logits averaged over overlaps, then the logits resized
bilinearly to the input's resolution and the arg-max taken there.

Background rule (voc21, coco_object): with `background_names` set, those names (the 91 COCO-Stuff stuff classes)
are added as extra prompts and every one of them predicts the class named "background".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.alignment import AlignmentConfig, AlignmentModule, load_alignment
from fmbseg.device import autocast
from fmbseg.models.base import ClipModel, DinoModel, to_tensor
from fmbseg.protocol import SlidingWindow, patch_padding, resize_uint8, upsampled_argmax

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
        """-> (P, D) float32 L2-normalised on the CLIP model's device, computed in float32 even when the caller
        runs under bf16 autocast (once per vocabulary, so full precision costs nothing; bf16 text embeddings
        move cosine logits by ~1e-2, enough to flip near-tied pixels)."""
        if prompts.key not in self._cache:
            names = [p if isinstance(p, str) else list(p) for p in prompts.prompts]
            with torch.no_grad(), torch.autocast(self.clip.device.type, enabled=False):
                t = self.clip.encode_text(names)
            self._cache[prompts.key] = F.normalize(t.float(), dim=-1)
        return self._cache[prompts.key]


def sliding_logits(image: np.ndarray, embed: Callable[[torch.Tensor], torch.Tensor], text: torch.Tensor,
                   patch: int, window: SlidingWindow, device: torch.device,
                   pixel_mean: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """Cosine similarities averaged over the sliding windows (mmseg `slide_inference` over TCL's per-window step).

    image (H, W, 3) uint8, resized like mmcv (`resize_uint8`) to `window.resized_hw`; embed: (B, 3, h, w) in
    [0, 1] (h, w multiples of `patch`) -> (B, h/p, w/p, D); text (P, D) normalised -> (P, H', W') float32
    logits at the resized size. A window whose side is not a multiple of `patch` (only when the resized image is
    smaller than a window) is padded as TCL pads it: centred (`patch_padding`), with `pixel_mean` (the model's
    normalisation mean in [0, 1], so the padding is 0 after normalisation); its logits are upsampled bilinearly
    to the padded size and the padding cut off."""
    h, w = image.shape[:2]
    rh, rw = window.resized_hw(h, w)
    x = to_tensor(resize_uint8(image, (rh, rw))).to(device)
    return window_logits(x, embed, text, patch, window, device, pixel_mean)


def window_logits(x: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], text: torch.Tensor, patch: int,
                  window: SlidingWindow, device: torch.device,
                  pixel_mean: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """The sliding-window part of `sliding_logits` on an already resized (3, H', W') [0, 1] image."""
    rh, rw = x.shape[1:]
    boxes = window.windows(rh, rw)
    wh, ww = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
    left, right, top, bottom = patch_padding(wh, ww, patch)
    ph, pw = wh + top + bottom, ww + left + right
    fill = torch.as_tensor(pixel_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    acc = torch.zeros((text.shape[0], rh, rw), dtype=torch.float32, device=device)
    count = torch.zeros((1, rh, rw), dtype=torch.float32, device=device)
    text = text.to(device)
    for b0 in range(0, len(boxes), window.batch_size):
        chunk = boxes[b0:b0 + window.batch_size]
        crops = torch.stack([x[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
        if (ph, pw) != (wh, ww):
            padded = fill.expand(len(chunk), 3, ph, pw).clone()
            padded[:, :, top:top + wh, left:left + ww] = crops
            crops = padded
        with torch.no_grad(), autocast(device):
            feats = embed(crops)
        sims = torch.einsum("bhwd,pd->bphw", F.normalize(feats.float(), dim=-1), text)
        for (y0, x0, y1, x1), s in zip(chunk, sims):
            # one window at a time: (P, 448, 448) float32 is 120 MB at P = 150, a batch of them would not fit 2 GB
            up = F.interpolate(s[None], size=(ph, pw), mode="bilinear", align_corners=False)[0]
            acc[:, y0:y1, x0:x1] += up[:, top:top + wh, left:left + ww]
            count[:, y0:y1, x0:x1] += 1
    return acc / count


class DenseSegmenter:
    """Arg-max of sliding-window cosine logits of a dense embedding function against the text embeddings."""

    name = "dense"

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], text: TextCache, patch: int,
                 device: torch.device, background_names: Sequence[str] = (), window: SlidingWindow = SlidingWindow(),
                 pixel_mean: Sequence[float] = (0.0, 0.0, 0.0)):
        self.embed = embed      # (B, 3, h, w) in [0, 1] -> (B, h/p, w/p, D)
        self.text = text
        self.patch = patch
        self.device = device
        self.background_names = tuple(background_names)
        self.window = window
        self.pixel_mean = tuple(float(v) for v in pixel_mean)

    def logits(self, image: np.ndarray, class_names: ClassNames) -> tuple[torch.Tensor, Prompts]:
        """-> ((P, H', W') logits at the protocol's resized size, the prompts they score)."""
        prompts = build_prompts(class_names, self.background_names)
        return sliding_logits(image, self.embed, self.text(prompts), self.patch, self.window, self.device,
                              self.pixel_mean), prompts

    def predict(self, image: np.ndarray, class_names: ClassNames) -> np.ndarray:
        """The logits resized bilinearly to the image's own size, arg-max there (mmseg/TCL), prompts -> classes."""
        _check_image(image)
        logits, prompts = self.logits(image, class_names)
        best = upsampled_argmax(logits, image.shape[:2]).cpu().numpy()
        return prompts.to_class[best]


def model_pixel_mean(model) -> tuple[float, float, float]:
    """The per-channel mean (in [0, 1]) a model adapter subtracts before its encoder (`pixel_mean`), i.e. the input
    that is 0 after normalisation; (0, 0, 0) for a model that does not normalise (the oracle stand-ins)."""
    mean = getattr(model, "pixel_mean", None)
    return (0.0, 0.0, 0.0) if mean is None else tuple(float(v) for v in mean)


class MaskClipSegmenter(DenseSegmenter):
    """`maskclip`: dense CLIP (MaskCLIP value path) against the text embeddings."""

    name = "maskclip"

    def __init__(self, clip: ClipModel, background_names: Sequence[str] = (), window: SlidingWindow = SlidingWindow(),
                 text: TextCache | None = None):
        super().__init__(clip.encode_dense, text or TextCache(clip), clip.patch_size, clip.device,
                         background_names, window, model_pixel_mean(clip))
        self.clip = clip


class FmbsegSegmenter(DenseSegmenter):
    """`fmbseg`: frozen DINOv2 patch features -> alignment module -> CLIP text space."""

    name = "fmbseg"

    def __init__(self, dino: DinoModel, alignment: AlignmentModule, clip: ClipModel,
                 background_names: Sequence[str] = (), window: SlidingWindow = SlidingWindow(),
                 text: TextCache | None = None):
        super().__init__(self._embed, text or TextCache(clip), dino.patch_size, dino.device, background_names,
                         window, model_pixel_mean(dino))
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
