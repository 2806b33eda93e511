"""Test-only reference: TCL's evaluation path ported verbatim (minus registry/config plumbing) from its sources, so
`fmbseg.protocol` / `fmbseg.segmenters` / `fmbseg.metrics` can be checked against an independent computation.

Sources (each function body kept as written there; only `self.` state became arguments):
- mmcv 1.x `mmcv/image/geometric.py` (TCL pins mmcv-full 1.6.2): `_scale_size`, `rescale_size`, `imresize`
  (cv2 backend), `imrescale`; mmcv `mmcv/image/photometric.py` `imnormalize_` as mmseg's `Normalize` calls it.
  Apache-2.0, Copyright (c) OpenMMLab.
- mmsegmentation 0.27.0: `mmseg/ops/wrappers.py` `resize`; `mmseg/models/segmentors/encoder_decoder.py`
  `slide_inference`, `inference`, `simple_test`; `mmseg/core/evaluation/metrics.py` `intersect_and_union`,
  `total_intersect_and_union`, `total_area_to_metrics` (mIoU part) and the nan-mean of `CustomDataset.evaluate`.
  Apache-2.0, Copyright (c) OpenMMLab.
- TCL (kakaobrain/tcl, `models/tcl/tcl.py`): `compute_padsize` and the pad / upsample / cut steps of
  `generate_masks`; `convert_dataset/convert_coco_object.py`: `clsID_to_trID` and its background rewrite
  (from GroupViT). MIT, Copyright (c) 2023 Kakao Brain Corp. / (c) 2021-22 NVIDIA.
cv2 (opencv-python-headless) is the resize backend, as in mmcv.
"""

from __future__ import annotations

from collections import OrderedDict
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# ---- mmcv/image/geometric.py ----------------------------------------------------------------------------------

cv2_interp_codes = {
    'nearest': cv2.INTER_NEAREST,
    'bilinear': cv2.INTER_LINEAR,
    'bicubic': cv2.INTER_CUBIC,
    'area': cv2.INTER_AREA,
    'lanczos': cv2.INTER_LANCZOS4
}


def _scale_size(size, scale):
    if isinstance(scale, (float, int)):
        scale = (scale, scale)
    w, h = size
    return int(w * float(scale[0]) + 0.5), int(h * float(scale[1]) + 0.5)


def imresize(img, size, return_scale=False, interpolation='bilinear', out=None, backend='cv2'):
    h, w = img.shape[:2]
    resized_img = cv2.resize(img, size, dst=out, interpolation=cv2_interp_codes[interpolation])
    if not return_scale:
        return resized_img
    else:
        w_scale = size[0] / w
        h_scale = size[1] / h
        return resized_img, w_scale, h_scale


def rescale_size(old_size, scale, return_scale=False):
    w, h = old_size
    if isinstance(scale, (float, int)):
        if scale <= 0:
            raise ValueError(f'Invalid scale {scale}, must be positive.')
        scale_factor = scale
    elif isinstance(scale, tuple):
        max_long_edge = max(scale)
        max_short_edge = min(scale)
        scale_factor = min(max_long_edge / max(h, w),
                           max_short_edge / min(h, w))
    else:
        raise TypeError(
            f'Scale must be a number or tuple of int, but got {type(scale)}')

    new_size = _scale_size((w, h), scale_factor)

    if return_scale:
        return new_size, scale_factor
    else:
        return new_size


def imrescale(img, scale, return_scale=False, interpolation='bilinear', backend='cv2'):
    h, w = img.shape[:2]
    new_size, scale_factor = rescale_size((w, h), scale, return_scale=True)
    rescaled_img = imresize(
        img, new_size, interpolation=interpolation, backend=backend)
    if return_scale:
        return rescaled_img, scale_factor
    else:
        return rescaled_img


# ---- mmcv/image/photometric.py (Normalize with to_rgb=False: our images are RGB already) ------------------------

def imnormalize(img, mean, std):
    img = img.copy().astype(np.float32)
    mean = np.float64(np.asarray(mean).reshape(1, -1))
    stdinv = 1 / np.float64(np.asarray(std).reshape(1, -1))
    cv2.subtract(img, mean, img)  # inplace
    cv2.multiply(img, stdinv, img)  # inplace
    return img


# ---- mmseg/ops/wrappers.py ----------------------------------------------------------------------------------

def resize(input, size=None, scale_factor=None, mode='nearest', align_corners=None, warning=True):
    if warning:
        if size is not None and align_corners:
            input_h, input_w = tuple(int(x) for x in input.shape[2:])
            output_h, output_w = tuple(int(x) for x in size)
            if output_h > input_h or output_w > input_w:
                if ((output_h > 1 and output_w > 1 and input_h > 1
                     and input_w > 1) and (output_h - 1) % (input_h - 1)
                        and (output_w - 1) % (input_w - 1)):
                    warnings.warn(
                        f'When align_corners={align_corners}, '
                        'the output would more aligned if '
                        f'input size {(input_h, input_w)} is `x+1` and '
                        f'out size {(output_h, output_w)} is `nx+1`')
    return F.interpolate(input, size, scale_factor, mode, align_corners)


# ---- TCL models/tcl/tcl.py -----------------------------------------------------------------------------------

def compute_padsize(H: int, W: int, patch_size: int):
    l, r, t, b = 0, 0, 0, 0
    if W % patch_size:
        lr = patch_size - (W % patch_size)
        l = lr // 2
        r = lr - l

    if H % patch_size:
        tb = patch_size - (H % patch_size)
        t = tb // 2
        b = tb - t

    return l, r, t, b


def tcl_generate_masks(image, dense_logits, patch_size):
    """TCL `generate_masks` without PAMR / the kp branch: `dense_logits(padded normalised image) -> (B, N, H/p,
    W/p)` stands for `masker.forward_seg`."""
    H, W = image.shape[2:]  # original image shape

    # pad image when (image_size % patch_size != 0)
    pad = compute_padsize(H, W, patch_size)
    if any(pad):
        image = F.pad(image, pad)  # zero padding

    # padded image size
    pH, pW = image.shape[2:]

    mask = dense_logits(image)

    # resize
    mask = F.interpolate(mask, (pH, pW), mode='bilinear')  # [B, N, H, W]

    # mask cutting for padded image
    if any(pad):
        l, t = pad[0], pad[2]
        mask = mask[:, :, t:t+H, l:l+W]

    assert mask.shape[2] == H and mask.shape[3] == W, f"shape mismatch: ({H}, {W}) / {mask.shape}"
    return mask


# ---- mmseg/models/segmentors/encoder_decoder.py (test_cfg, num_classes, encode_decode as arguments) ----------

def slide_inference(img, img_meta, rescale, encode_decode, num_classes, stride=(224, 224), crop_size=(448, 448),
                    align_corners=False):
    h_stride, w_stride = stride
    h_crop, w_crop = crop_size
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            crop_seg_logit = encode_decode(crop_img, img_meta)
            preds += F.pad(crop_seg_logit,
                           (int(x1), int(preds.shape[3] - x2), int(y1),
                            int(preds.shape[2] - y2)))

            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    preds = preds / count_mat
    if rescale:
        # remove padding area
        resize_shape = img_meta[0]['img_shape'][:2]
        preds = preds[:, :, :resize_shape[0], :resize_shape[1]]
        preds = resize(
            preds,
            size=img_meta[0]['ori_shape'][:2],
            mode='bilinear',
            align_corners=align_corners,
            warning=False)
    return preds


def inference(img, img_meta, rescale, **slide_kwargs):
    seg_logit = slide_inference(img, img_meta, rescale, **slide_kwargs)
    output = F.softmax(seg_logit, dim=1)
    return output


def simple_test(img, img_meta, rescale=True, **slide_kwargs):
    seg_logit = inference(img, img_meta, rescale, **slide_kwargs)
    seg_pred = seg_logit.argmax(dim=1)
    seg_pred = seg_pred.cpu().numpy()
    # unravel batch dim
    seg_pred = list(seg_pred)
    return seg_pred


# ---- mmseg/core/evaluation/metrics.py ----------------------------------------------------------------------

def intersect_and_union(pred_label, label, num_classes, ignore_index, label_map=dict(), reduce_zero_label=False):
    pred_label = torch.from_numpy((pred_label))
    label = torch.from_numpy(label)

    if label_map is not None:
        for old_id, new_id in label_map.items():
            label[label == old_id] = new_id
    if reduce_zero_label:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255

    mask = (label != ignore_index)
    pred_label = pred_label[mask]
    label = label[mask]

    intersect = pred_label[pred_label == label]
    area_intersect = torch.histc(
        intersect.float(), bins=(num_classes), min=0, max=num_classes - 1)
    area_pred_label = torch.histc(
        pred_label.float(), bins=(num_classes), min=0, max=num_classes - 1)
    area_label = torch.histc(
        label.float(), bins=(num_classes), min=0, max=num_classes - 1)
    area_union = area_pred_label + area_label - area_intersect
    return area_intersect, area_union, area_pred_label, area_label


def total_intersect_and_union(results, gt_seg_maps, num_classes, ignore_index, label_map=dict(),
                              reduce_zero_label=False):
    total_area_intersect = torch.zeros((num_classes, ), dtype=torch.float64)
    total_area_union = torch.zeros((num_classes, ), dtype=torch.float64)
    total_area_pred_label = torch.zeros((num_classes, ), dtype=torch.float64)
    total_area_label = torch.zeros((num_classes, ), dtype=torch.float64)
    for result, gt_seg_map in zip(results, gt_seg_maps):
        area_intersect, area_union, area_pred_label, area_label = \
            intersect_and_union(
                result, gt_seg_map, num_classes, ignore_index,
                label_map, reduce_zero_label)
        total_area_intersect += area_intersect
        total_area_union += area_union
        total_area_pred_label += area_pred_label
        total_area_label += area_label
    return total_area_intersect, total_area_union, total_area_pred_label, \
        total_area_label


def total_area_to_metrics(total_area_intersect, total_area_union, total_area_pred_label, total_area_label):
    """The mIoU branch; then `CustomDataset.evaluate`'s summary (nan-mean x 100)."""
    all_acc = total_area_intersect.sum() / total_area_label.sum()
    ret_metrics = OrderedDict({'aAcc': all_acc})
    iou = total_area_intersect / total_area_union
    acc = total_area_intersect / total_area_label
    ret_metrics['IoU'] = iou
    ret_metrics['Acc'] = acc
    ret_metrics = {metric: value.numpy() for metric, value in ret_metrics.items()}
    summary = {'aAcc': float(ret_metrics['aAcc']) * 100, 'mIoU': float(np.nanmean(ret_metrics['IoU'])) * 100,
               'mAcc': float(np.nanmean(ret_metrics['Acc'])) * 100}
    return ret_metrics, summary


# ---- TCL convert_dataset/convert_coco_object.py (from GroupViT) ---------------------------------------------

def coco_object_table():
    """`clsID_to_trID` after the script's rewrite: raw COCO-Stuff ids -> COCO-Object ids (things 1..80, rest 0)."""
    clsID_to_trID = dict(COCO_STUFF_CLSID_TO_TRID)
    # set to background
    for k, v in clsID_to_trID.items():
        clsID_to_trID[k] = v + 1
        if k > 90:
            clsID_to_trID[k] = 0
    return clsID_to_trID


def convert_to_trainID(mask, clsID_to_trID):
    mask_copy = mask.copy()
    for clsID, trID in clsID_to_trID.items():
        mask_copy[mask == clsID] = trID
    return mask_copy


# The script's `clsID_to_trID` literal before the rewrite (the same table as mmseg's
# tools/convert_datasets/coco_stuff164k.py, which writes the `_labelTrainIds.png` files), copied entry by entry.
COCO_STUFF_CLSID_TO_TRID = {
    0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 10: 10, 12: 11, 13: 12, 14: 13, 15: 14, 16: 15, 17:
    16, 18: 17, 19: 18, 20: 19, 21: 20, 22: 21, 23: 22, 24: 23, 26: 24, 27: 25, 30: 26, 31: 27, 32: 28, 33: 29, 34:
    30, 35: 31, 36: 32, 37: 33, 38: 34, 39: 35, 40: 36, 41: 37, 42: 38, 43: 39, 45: 40, 46: 41, 47: 42, 48: 43, 49:
    44, 50: 45, 51: 46, 52: 47, 53: 48, 54: 49, 55: 50, 56: 51, 57: 52, 58: 53, 59: 54, 60: 55, 61: 56, 62: 57, 63:
    58, 64: 59, 66: 60, 69: 61, 71: 62, 72: 63, 73: 64, 74: 65, 75: 66, 76: 67, 77: 68, 78: 69, 79: 70, 80: 71, 81:
    72, 83: 73, 84: 74, 85: 75, 86: 76, 87: 77, 88: 78, 89: 79, 91: 80, 92: 81, 93: 82, 94: 83, 95: 84, 96: 85, 97:
    86, 98: 87, 99: 88, 100: 89, 101: 90, 102: 91, 103: 92, 104: 93, 105: 94, 106: 95, 107: 96, 108: 97, 109: 98,
    110: 99, 111: 100, 112: 101, 113: 102, 114: 103, 115: 104, 116: 105, 117: 106, 118: 107, 119: 108, 120: 109,
    121: 110, 122: 111, 123: 112, 124: 113, 125: 114, 126: 115, 127: 116, 128: 117, 129: 118, 130: 119, 131: 120,
    132: 121, 133: 122, 134: 123, 135: 124, 136: 125, 137: 126, 138: 127, 139: 128, 140: 129, 141: 130, 142: 131,
    143: 132, 144: 133, 145: 134, 146: 135, 147: 136, 148: 137, 149: 138, 150: 139, 151: 140, 152: 141, 153: 142,
    154: 143, 155: 144, 156: 145, 157: 146, 158: 147, 159: 148, 160: 149, 161: 150, 162: 151, 163: 152, 164: 153,
    165: 154, 166: 155, 167: 156, 168: 157, 169: 158, 170: 159, 171: 160, 172: 161, 173: 162, 174: 163, 175: 164,
    176: 165, 177: 166, 178: 167, 179: 168, 180: 169, 181: 170, 255: 255
}
