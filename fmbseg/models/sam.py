"""SAM adapter over segment_anything: one image-encoder pass per image, reused by point prompts and by automatic
mask generation.

Coordinates: callers give continuous `(x, y)` original-image pixels (the centre of pixel column j is j + 0.5).
segment_anything's prompt encoder instead treats a coordinate as a pixel *index* (it adds 0.5 to reach the pixel
centre), so a continuous point is scaled into the resized input frame and then shifted by -0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn

from fmbseg.device import autocast
from fmbseg.models.base import POINT_OUTPUTS, AutoMask, AutoMaskConfig, SamEmbedding

# Which of the decoder's 4 outputs (0: single-mask token, 1-3: multimask tokens) each `outputs` choice returns.
_OUTPUT_SLICES = {"all4": slice(0, 4), "multimask": slice(1, 4), "single": slice(0, 1)}
assert set(_OUTPUT_SLICES) == set(POINT_OUTPUTS)


@dataclass(frozen=True)
class SamArch:
    """A SAM architecture (segment_anything's `_build_sam` with every size a parameter).

    Defaults are the released models' (1024 px input, 16 px patches, 256-d prompts)."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    pixel_mean: tuple[float, float, float] = field(default=(123.675, 116.28, 103.53))
    pixel_std: tuple[float, float, float] = field(default=(58.395, 57.12, 57.375))


def build_sam(arch: SamArch) -> nn.Module:
    """A randomly initialised `segment_anything.modeling.Sam` (honours an enclosing `torch.device` context)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = arch.image_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(arch.encoder_global_attn_indexes),
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(arch.pixel_mean),
        pixel_std=list(arch.pixel_std),
    )
    return sam.eval()


def default_points_per_batch(device: torch.device) -> int:
    """Grid points per automatic-mask decoder call: 512 on CUDA (the decoder is small; big batches fill the GPU),
    64 elsewhere (the CPU gains nothing from more and holds (b, 3, H, W) float32 logits per batch)."""
    return 512 if torch.device(device).type == "cuda" else 64


class SegmentAnythingModel:
    """`SamModel` over a segment_anything `Sam` (frozen, eval mode)."""

    def __init__(self, sam: nn.Module, model_id: str, device: torch.device, weights_sha256: str | None = None,
                 *, fused_attention: bool = True, compile: bool = False, points_per_batch: int | None = None):
        """`fused_attention`: the image encoder's attention through `scaled_dot_product_attention` (equal to the
        stock path within float rounding, see `fmbseg.models.sam_attention`). `compile`: run the image encoder
        through `torch.compile` (for GPU runs; an execution setting, not part of any config hash).
        `points_per_batch`: grid points per automatic-mask decoder call, an execution setting that does not change
        the masks (tested); default 64 on CPU, 512 on CUDA (`default_points_per_batch`)."""
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam.to(device).eval().requires_grad_(False)
        self.device = device
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        self.image_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.image_size)
        self.fused_attention = bool(fused_attention)
        if self.fused_attention:
            from fmbseg.models.sam_attention import use_fused_attention

            use_fused_attention(self.sam.image_encoder)
        self.encoder = torch.compile(self.sam.image_encoder) if compile else self.sam.image_encoder
        if points_per_batch is not None and (isinstance(points_per_batch, bool) or int(points_per_batch) < 1):
            raise ValueError(f"points_per_batch must be a positive integer, got {points_per_batch!r}")
        self.points_per_batch = int(points_per_batch) if points_per_batch else default_points_per_batch(device)

    # -- encoder ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, image: np.ndarray) -> SamEmbedding:
        """(H, W, 3) uint8 RGB -> one image-encoder pass; features (1, C, h, w) float32 on the device.

        Preprocessing is SamPredictor's: resize the long side to `image_size` (PIL), normalise, pad bottom-right."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            desc = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
            raise ValueError(f"SAM embed expects an (H, W, 3) uint8 RGB array, got {desc.strip()}")
        h, w = image.shape[:2]
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None].float()
        x = self.sam.preprocess(x)
        with autocast(self.device):
            features = self.encoder(x)
        return SamEmbedding(original_hw=(h, w), input_hw=tuple(resized.shape[:2]), features=features.float())

    # -- prompts ---------------------------------------------------------------------------------------------
    def _features(self, emb: SamEmbedding) -> torch.Tensor:
        f = emb.features
        dim = self.sam.prompt_encoder.embed_dim
        if not isinstance(f, torch.Tensor) or f.ndim != 4 or f.shape[:2] != (1, dim):
            raise TypeError(
                f"this SamEmbedding was not made by {self.model_id} (expected features (1, {dim}, h, w), got "
                f"{type(f).__name__} {tuple(getattr(f, 'shape', ()))})"
            )
        return f.to(self.device)

    def to_model_coords(self, points: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """Continuous (x, y) original px -> segment_anything's input-frame pixel-index coordinates."""
        return self.transform.apply_coords(np.asarray(points, dtype=np.float64), original_hw) - 0.5

    @torch.no_grad()
    def decode_low_res(self, emb: SamEmbedding, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords (N, n, 2) in segment_anything's input-frame pixel-index convention (what `to_model_coords`
        returns; the automatic-mask grid is given there directly, as the stock generator does), all positive ->
        low-resolution mask logits (N, 4, h, w) and predicted IoU (N, 4), in the decoder's (autocast) dtype, from
        ONE prompt-encoder/decoder call. Output 0 is SAM's single-mask token, 1..3 its multimask tokens.

        The coordinates' dtype is kept up to the positional encoding (float64 grid points are shifted and scaled in
        float64 exactly as in `SamAutomaticMaskGenerator`)."""
        features = self._features(emb)
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)
        # Prompt and dense positional encodings stay float32: they are sin/cos of coordinates times random
        # frequencies, and bf16's 8-bit mantissa would move a point by several input pixels.
        sparse, dense = self.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        with autocast(self.device):
            # predict_masks is what MaskDecoder.forward calls before slicing [0:1] or [1:4]: all 4 outputs cost
            # the same single transformer pass.
            low_res, iou = self.sam.mask_decoder.predict_masks(
                image_embeddings=features,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
            )
        return low_res, iou

    def upsample(self, low_res: torch.Tensor, emb: SamEmbedding) -> torch.Tensor:
        """Low-resolution logits (..., h, w) -> float32 logits (..., H, W) at the original resolution
        (`Sam.postprocess_masks`: bilinear to the padded input, crop the padding, bilinear to the original)."""
        lead = low_res.shape[:-2]
        x = low_res.float().reshape(-1, 1, *low_res.shape[-2:])
        out = self.sam.postprocess_masks(x, emb.input_hw, emb.original_hw)
        return out.reshape(*lead, *out.shape[-2:])

    @torch.no_grad()
    def decode(self, emb: SamEmbedding, points: np.ndarray, outputs: str = "multimask"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """points (N, n, 2) continuous original px, all positive -> mask logits (N, M, H, W) at the original
        resolution and predicted IoU (N, M), float32 on the device, from ONE prompt-encoder/decoder call.
        `outputs`: `multimask` (M = 3, SAM's multimask tokens), `single` (M = 1, the single-mask token) or `all4`
        (M = 4: the single-mask token, then the 3 multimask tokens)."""
        sl = _OUTPUT_SLICES.get(outputs)
        if sl is None:
            raise ValueError(f"outputs must be one of {', '.join(POINT_OUTPUTS)}, got {outputs!r}")
        coords = torch.as_tensor(self.to_model_coords(points, emb.original_hw), dtype=torch.float32, device=self.device)
        low_res, iou = self.decode_low_res(emb, coords)
        return self.upsample(low_res[:, sl], emb), iou[:, sl].float()

    def predict_points(self, emb: SamEmbedding, points: np.ndarray, outputs: str = "multimask"
                       ) -> tuple[np.ndarray, np.ndarray]:
        """points (N, n, 2) (x, y) original px -> masks (N, M, H, W) bool, iou_pred (N, M) float32; M and the
        order of the outputs as in `decode` (`all4`: token 0 = single-mask output first)."""
        sl = _OUTPUT_SLICES.get(outputs)
        if sl is None:
            raise ValueError(f"outputs must be one of {', '.join(POINT_OUTPUTS)}, got {outputs!r}")
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 3 or points.shape[2] != 2 or (points.shape[0] and points.shape[1] == 0):
            raise ValueError(f"points must be (N, n, 2) (x, y) with n >= 1, got shape {points.shape}")
        if not np.isfinite(points).all():
            raise ValueError("points contain NaN or infinite coordinates")
        h, w = emb.original_hw
        m = len(range(4)[sl])
        if points.shape[0] == 0:
            return np.zeros((0, m, h, w), dtype=bool), np.zeros((0, m), dtype=np.float32)
        logits, iou = self.decode(emb, points, outputs)
        masks = (logits > self.sam.mask_threshold).cpu().numpy()
        return masks, iou.cpu().numpy().astype(np.float32)

    def generate(self, emb: SamEmbedding, cfg: AutoMaskConfig) -> list[AutoMask]:
        """Automatic masks from the precomputed embedding (see `fmbseg.models.sam_automask`)."""
        from fmbseg.models.sam_automask import generate_masks

        return generate_masks(self, emb, cfg)

    # -- the relabel store (stages/relabel.py) ---------------------------------------------------------------
    def embedding_arrays(self, emb: SamEmbedding) -> dict[str, np.ndarray]:
        """The embedding as host arrays: `features` (1, C, h, w) float32, the encoder output as computed (on CUDA
        the bf16 autocast output widened to float32, so it holds bf16 values exactly)."""
        return {"features": self._features(emb).detach().cpu().numpy()}

    def embedding_from_arrays(self, arrays: dict[str, np.ndarray], original_hw: tuple[int, int],
                              input_hw: tuple[int, int]) -> SamEmbedding:
        """The inverse of `embedding_arrays`: the same features on this model's device."""
        emb = SamEmbedding(original_hw=(int(original_hw[0]), int(original_hw[1])),
                           input_hw=(int(input_hw[0]), int(input_hw[1])),
                           features=torch.from_numpy(np.ascontiguousarray(arrays["features"])).to(self.device))
        self._features(emb)  # another model's embedding fails here, naming the shapes
        return emb

    # -- batched encoder (the label pipeline) ------------------------------------------------------------------
    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The host half of `embed`: (H, W, 3) uint8 -> the long-side-resized (h', w', 3) uint8 input (PIL), so the
        label pipeline can run it ahead of the GPU."""
        return self.transform.apply_image(image)

    def prepare_on_device(self, image: torch.Tensor) -> torch.Tensor | None:
        """`prepare` of an (H, W, 3) uint8 tensor on the device -> the same bytes as a device tensor
        (`fmbseg.resample.pil_resize`, bilinear as `ResizeLongestSide`'s PIL path), or None when Pillow's pass order
        for this size is unknown (the caller then uses `prepare`)."""
        from fmbseg.resample import pass_order, pil_resize

        H, W = int(image.shape[0]), int(image.shape[1])
        h, w = self.transform.get_preprocess_shape(H, W, self.image_size)
        if pass_order((H, W), (h, w), "bilinear") is None:
            return None
        return pil_resize(image, h, w, "bilinear")

    @torch.no_grad()
    def embed_many(self, images: list[np.ndarray], prepared: list[np.ndarray] | None = None) -> list[SamEmbedding]:
        """`embed` of several images in one encoder batch -> one SamEmbedding each, equal to `embed(image)` up to
        the encoder's batch-size dependence (bit-equal on this CPU for the tested sizes; bf16 noise on CUDA).
        `prepared[i]` (optional) is `prepare(images[i])`, already computed."""
        if not images:
            return []
        for image in images:
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                desc = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
                raise ValueError(f"SAM embed expects an (H, W, 3) uint8 RGB array, got {desc.strip()}")
        if prepared is None:
            prepared = [self.prepare(image) for image in images]
        x = torch.cat([self.sam.preprocess(torch.as_tensor(r).to(self.device, non_blocking=True)
                                           .permute(2, 0, 1).contiguous()[None].float()) for r in prepared])
        with autocast(self.device):
            features = self.encoder(x)
        return [SamEmbedding(original_hw=tuple(image.shape[:2]), input_hw=tuple(r.shape[:2]),
                             features=features[i : i + 1].float())
                for i, (image, r) in enumerate(zip(images, prepared))]
