"""`fmbseg predict`: segment a folder of images with a trained `fmbseg` checkpoint and any vocabulary.

For every image (a folder, searched recursively, a single image file, or a COCO JSON) it writes, under `out`
and mirroring the image's relative path: `<stem>.png`, the label map (class index into the vocabulary, an
8-bit palette PNG, 16-bit when the vocabulary has more than 256 classes), and `<stem>_overlay.jpg`, the picture
blended with the class colours and a legend. `out/classes.txt` lists the vocabulary, one class per line, in
index order; `out/index.csv` maps every input to what was written for it (`input,label_map,overlay,status,
error`), so the report always matches the files.

Inputs are never touched and outputs never overwrite one another:
- `out` equal to, or inside, the input tree (the folder; a single image's or a COCO JSON's folder) is refused
  unless it is a fresh subfolder (absent or empty) or an earlier predict output (it holds `.fmbseg-predict`);
  images under `out` are never taken as inputs, and no output path may equal an input path.
- Output names keep the relative path; inputs sharing a stem in one folder (`x.png`, `x.jpg`) keep their
  extension in the name (`x.png.png`, `x.jpg.png`); a name too long for the file system (over 200 bytes of
  stem) is shortened with a hash suffix; any remaining clash gets a hash suffix too.
- A failure in one image (unreadable, or an error while segmenting or writing it) is reported and the run goes
  on; a full, read-only or over-quota disk stops the run (every later write would fail too).

Prediction uses the evaluation protocol (short side 448, sliding 448² windows). When the vocabulary has a class
named `background`, the 91 COCO-Stuff stuff names are added as prompts for it (the background rule of DESIGN §2).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import posixpath
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
from stages.latest_checkpoint import resolve_checkpoint
from storage.planning import is_image_name, list_coco_images, list_image_folder

MARKER = ".fmbseg-predict"
MAX_STEM_BYTES = 200  # + "_overlay.jpg" or ".png" + the writer's ".tmp.png" stays under NAME_MAX (255)
# Errors that every later write would hit too: stop instead of failing each image in turn.
FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


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


def input_root(images: str) -> str:
    """The folder whose tree the inputs come from (the folder itself, or a file's folder)."""
    return images if os.path.isdir(images) else os.path.dirname(os.path.abspath(images))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_out_folder(images: str, out: str) -> None:
    """Refuse an `out` that is the input tree or a used folder inside it (see the module docstring)."""
    if "://" in images or "://" in out:
        return
    root, dest = os.path.realpath(input_root(images)), os.path.realpath(out)
    if not _inside(dest, root):
        return
    if dest == root:
        raise ValueError(f"--out {out} is the input folder: predictions would overwrite the input images; "
                         "choose another folder (a fresh subfolder such as predictions/ is fine)")
    if not os.path.exists(dest):
        return
    if os.path.isdir(dest) and (not os.listdir(dest) or os.path.isfile(os.path.join(dest, MARKER))):
        return
    raise ValueError(f"--out {out} is inside the input folder {images} and already holds files: predictions could "
                     "overwrite input images; choose another folder, or a new (empty) subfolder")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _fit(stem: str, key: str) -> str:
    """`stem` with its last component shortened to MAX_STEM_BYTES (plus a hash of `key`) when too long."""
    head, name = posixpath.split(stem)
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_STEM_BYTES:
        return stem
    short = raw[: MAX_STEM_BYTES - 9].decode("utf-8", "ignore")  # never cut a multi-byte character in half
    return posixpath.join(head, f"{short}-{_short_hash(key)}")


def output_stems(rels: list[str]) -> list[str]:
    """Relative output stems (POSIX, inside `out`), one per input relative path, pairwise distinct even on a
    case-insensitive file system."""
    clean = []
    for rel in rels:
        parts = [p for p in rel.replace(os.sep, "/").split("/") if p not in ("", ".", "..")]
        clean.append("/".join(parts) or _short_hash(rel))
    stems = [posixpath.splitext(c)[0] or c for c in clean]
    by_stem: dict[str, int] = {}
    for s in stems:
        by_stem[s.casefold()] = by_stem.get(s.casefold(), 0) + 1
    # `x.png` and `x.jpg` in one folder: both keep their extension.
    stems = [c if by_stem[s.casefold()] > 1 else s for c, s in zip(clean, stems)]
    stems = [_fit(s, rel) for s, rel in zip(stems, rels)]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s.casefold()] = seen.get(s.casefold(), 0) + 1
    return [s if seen[s.casefold()] == 1 else _fit(f"{s}-{_short_hash(rel)}", rel) for s, rel in zip(stems, rels)]


def predict_folder(checkpoint: str, images: str, vocab: str, out: str, device: str = "auto",
                   progress: bool = True) -> list[str]:
    """Segment every image; returns the label-map paths written (in input order). `checkpoint`: a model.pt path or
    URL, or a campaign (or its `train/latest`) whose newest finished checkpoint is used (`resolve_checkpoint`)."""
    from fmbseg.device import resolve_device
    from fmbseg.presets import make_clip, make_dino

    check_out_folder(images, out)
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    vocabulary = parse_vocab(vocab)
    inputs = list_inputs(images)
    if "://" not in out and "://" not in images:
        dest = os.path.realpath(out)
        inputs = [(rel, p) for rel, p in inputs if not _inside(os.path.realpath(p), dest)]  # our own outputs
        if not inputs:
            raise FileNotFoundError(f"no images under {images} outside --out {out}")
    stems = output_stems([rel for rel, _ in inputs])
    targets = [(os.path.join(out, *s.split("/")) + ".png", os.path.join(out, *s.split("/")) + "_overlay.jpg")
               for s in stems]
    sources = {os.path.realpath(p) for _, p in inputs if "://" not in p}
    clash = [t for pair in targets for t in pair if os.path.realpath(t) in sources]
    if clash:
        raise ValueError(f"predict would overwrite the input image {clash[0]}: choose another --out")
    dev = resolve_device(device)
    preset = ckpt["encoders"]["preset"]
    background = COCO_STUFF_91 if "background" in vocabulary.names else ()
    seg = load_fmbseg(ckpt, make_dino(preset, device=str(dev)), make_clip(preset, device=str(dev)), background)
    prompts = [p[0] if len(p) == 1 else p for p in vocabulary.prompts()]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
        f.write("written by fmbseg predict\n")
    with open(os.path.join(out, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{n}\n" for n in vocabulary.names))

    written, failed, index = [], [], []
    for (rel, path), (label_path, overlay_path) in tqdm(list(zip(inputs, targets)), desc="predict", unit="img",
                                                         disable=not progress, file=sys.stderr):
        try:
            image = load_image(path)
            pred = seg.predict(image, prompts)
            save_label_png(pred, label_path)
            pic = overlay(image, pred, list(vocabulary.names))
            Image.fromarray(np.ascontiguousarray(pic)).save(overlay_path, quality=90)
        except OSError as e:
            if e.errno in FATAL_ERRNOS:
                raise
            failed.append((path, f"{type(e).__name__}: {e}"))
        except Exception as e:  # noqa: BLE001 - one image's failure is reported, the rest are still segmented
            failed.append((path, str(e) if type(e).__name__ == "ImageDecodeError" else f"{type(e).__name__}: {e}"))
        else:
            written.append(label_path)
            index.append((path, os.path.relpath(label_path, out), os.path.relpath(overlay_path, out), "ok", ""))
            continue
        for stale in (label_path, overlay_path):   # no half-written output of a failed image
            if os.path.isfile(stale) and os.path.realpath(stale) not in sources:
                os.unlink(stale)
        index.append((path, "", "", "failed", failed[-1][1]))
    with open(os.path.join(out, "index.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["input", "label_map", "overlay", "status", "error"])
        w.writerows(index)
    print(f"predict: {len(written)} label maps + overlays in {out}"
          + (f"; {len(failed)} images failed:" if failed else ""), file=sys.stderr)
    for p, reason in failed:
        print(f"  {p}: {reason}", file=sys.stderr)
    return written
