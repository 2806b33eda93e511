"""Stage 1's vocabulary-independent per-image results (`Stage1Kept`) as named host arrays and back: what a
campaign's relabel store holds per image (docs/STORAGE.md "Relabel store"), with no loss.

Arrays of one image (shapes and dtypes as computed; nothing is rounded here):
- `crop_cls` (N, D) float32: each crop's L2-normalised CLIP CLS embedding, row-major crop order;
- `crop_boxes` (N, 4) int64: the crops, XYXY upscaled px;
- `dense` (Hg, Wg, D) float32: the stitched, L2-normalised dense CLIP map;
- `scale_xy` (2,) float64: upscaled px per original px along x, y; `patch_size` (1,) int64; `image_hw` (2,) int64;
- only for an image that got a SAM pass: `sam_hw` (4,) int64 = original (H, W) then the encoder input (h', w');
  `sam_<name>` the SAM adapter's `embedding_arrays` (real SAM: `sam_features` (1, 256, 64, 64) float32);
  `auto_masks` (n, ceil(H*W / 8)) uint8, each 1.2 automatic mask row-major flattened and `np.packbits`-ed;
  `auto_scores` (n,) float64, SAM's predicted IoU of each (the Python float Stage 1 used).
"""

from __future__ import annotations

import numpy as np
import torch

from fmbseg.models.sliding import SlidingFeatures
from fmbseg.stage1 import Stage1Kept

SAM_PREFIX = "sam_"


def kept_to_arrays(kept: Stage1Kept, sam) -> dict[str, np.ndarray]:
    """-> {name: host array} (see the module docstring). `sam`: the adapter that made `kept.embedding`."""
    sf = kept.features
    out = {
        "crop_cls": sf.crop_cls.detach().float().cpu().numpy(),
        "crop_boxes": np.asarray(sf.crop_boxes, np.int64),
        "dense": sf.dense.detach().float().cpu().numpy(),
        "scale_xy": np.asarray(sf.scale_xy, np.float64),
        "patch_size": np.asarray([sf.patch_size], np.int64),
        "image_hw": np.asarray(sf.image_hw, np.int64),
    }
    if kept.embedding is not None:
        emb = kept.embedding
        H, W = emb.original_hw
        out["sam_hw"] = np.asarray([*emb.original_hw, *emb.input_hw], np.int64)
        for name, arr in sam.embedding_arrays(emb).items():
            out[SAM_PREFIX + name] = np.asarray(arr)
        autos = kept.autos or []
        packed = [np.packbits(np.asarray(m, bool).reshape(-1)) for m, _ in autos]
        for m, _ in autos:
            if m.shape != (H, W):
                raise ValueError(f"an automatic mask of shape {m.shape} for a {(H, W)} image")
        out["auto_masks"] = (np.stack(packed) if packed else np.zeros((0, (H * W + 7) // 8), np.uint8))
        out["auto_scores"] = np.asarray([float(s) for _, s in autos], np.float64)
    return out


def kept_from_arrays(arrays: dict[str, np.ndarray], sam, device: torch.device | str) -> Stage1Kept:
    """The inverse of `kept_to_arrays`: features on `device` (the CLIP model's), the embedding on `sam`'s."""
    hw = tuple(int(v) for v in arrays["image_hw"])
    sf = SlidingFeatures(
        crop_cls=torch.from_numpy(np.ascontiguousarray(arrays["crop_cls"], np.float32)).to(device),
        crop_boxes=np.asarray(arrays["crop_boxes"], np.int64),
        dense=torch.from_numpy(np.ascontiguousarray(arrays["dense"], np.float32)).to(device),
        scale_xy=(float(arrays["scale_xy"][0]), float(arrays["scale_xy"][1])),
        patch_size=int(arrays["patch_size"][0]),
        image_hw=(hw[0], hw[1]),
    )
    if "sam_hw" not in arrays:
        return Stage1Kept(sf)
    h, w, ih, iw = (int(v) for v in arrays["sam_hw"])
    emb = sam.embedding_from_arrays({k[len(SAM_PREFIX):]: v for k, v in arrays.items() if k.startswith(SAM_PREFIX)
                                     and k != "sam_hw"}, (h, w), (ih, iw))
    bits = np.asarray(arrays["auto_masks"], np.uint8)
    masks = np.unpackbits(bits, axis=1, count=h * w).astype(bool).reshape(-1, h, w) if len(bits) else []
    autos = [(masks[i], float(s)) for i, s in enumerate(np.asarray(arrays["auto_scores"], np.float64))]
    return Stage1Kept(sf, emb, autos)
