"""`fmbseg predict`: segment a folder of images with a trained `fmbseg` checkpoint and any vocabulary.

For every image (a folder, searched recursively, a single image file, or a COCO JSON) it writes, under `out`
and mirroring the image's relative path: `<stem>.png`, the label map (class index into the vocabulary, an
8-bit palette PNG, 16-bit when the vocabulary has more than 256 classes), and `<stem>_overlay.jpg`, the picture
blended with the class colours and a legend. `out/classes.txt` lists the vocabulary, one class per line, in
index order. Images that cannot be read are reported and skipped; the others are still written.

Prediction uses the evaluation protocol (short side 448, sliding 448² windows). When the vocabulary has a class
named `background`, the 91 COCO-Stuff stuff names are added as prompts for it (the background rule of DESIGN §2).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from fmbseg.checkpoint import load_checkpoint
from fmbseg.images import load_image
from fmbseg.overlay import overlay, save_label_png
from fmbseg.segmenters import load_fmbseg
from fmbseg.vocab import parse_vocab
from fmbseg.vocab_builtin import COCO_STUFF_91
from storage.planning import is_image_name, list_coco_images, list_image_folder


def list_inputs(images: str) -> list[tuple[str, str]]:
    """(relative id, path) of the images to segment: a folder (recursive), one image file, or a COCO JSON."""
    if os.path.isfile(images) and is_image_name(images):
        return [(os.path.basename(images), images)]
    if images.lower().endswith(".json"):
        if not os.path.isfile(images):
            raise FileNotFoundError(f"COCO JSON not found: {images}")
        entries = [(e.image_id, e.path) for e in list_coco_images(images)]
        return [(os.path.relpath(p, os.path.dirname(os.path.abspath(images))), p) for _, p in entries]
    entries = list_image_folder(images)
    if not entries:
        raise FileNotFoundError(f"no images (jpg, jpeg, png, webp, bmp, tif, tiff) under {images}")
    return [(e.image_id, e.path) for e in entries]


def predict_folder(checkpoint: str, images: str, vocab: str, out: str, device: str = "auto",
                   progress: bool = True) -> list[str]:
    """Segment every image; returns the label-map paths written (in input order)."""
    from fmbseg.device import resolve_device
    from fmbseg.presets import make_clip, make_dino

    ckpt = load_checkpoint(checkpoint)
    vocabulary = parse_vocab(vocab)
    inputs = list_inputs(images)
    dev = resolve_device(device)
    preset = ckpt["encoders"]["preset"]
    background = COCO_STUFF_91 if "background" in vocabulary.names else ()
    seg = load_fmbseg(ckpt, make_dino(preset, device=str(dev)), make_clip(preset, device=str(dev)), background)
    prompts = [p[0] if len(p) == 1 else p for p in vocabulary.prompts()]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{n}\n" for n in vocabulary.names))

    written, failed = [], []
    for rel, path in tqdm(inputs, desc="predict", unit="img", disable=not progress, file=sys.stderr):
        try:
            image = load_image(path)
        except Exception as e:  # noqa: BLE001 - an unreadable image is reported, the rest are still segmented
            failed.append(f"{path}: {e}")
            continue
        pred = seg.predict(image, prompts)
        stem = os.path.splitext(rel)[0]
        label_path = os.path.join(out, stem + ".png")
        save_label_png(pred, label_path)
        pic = overlay(image, pred, list(vocabulary.names))
        Image.fromarray(np.ascontiguousarray(pic)).save(os.path.join(out, stem + "_overlay.jpg"), quality=90)
        written.append(label_path)
    print(f"predict: {len(written)} label maps + overlays in {out}"
          + (f"; {len(failed)} images could not be read:" if failed else ""), file=sys.stderr)
    for line in failed:
        print(f"  {line}", file=sys.stderr)
    return written
