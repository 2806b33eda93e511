"""The `tiny` preset round trip on CPU (label -> train -> evaluate -> predict with random toy-width models), and
`predict_folder`'s outputs read back with plain Pillow."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from fmbseg.checkpoint import load_checkpoint
from fmbseg.testing.world import write_world
from stages.evaluate import evaluate
from stages.predict import predict_folder
from stages.train import TrainConfig, train_alignment


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, label_world):
    base = tmp_path_factory.mktemp("tiny")
    write_world(base / "w", 3, seed=4, sizes=((160, 200), (200, 150)))
    label_world(base / "w", base / "camp", preset="tiny")
    ckpt = train_alignment(str(base / "camp"), TrainConfig(epochs=1, train_size=448, device="cpu"),
                           progress=False)  # 448 px view
    return base, ckpt


def test_tiny_train_and_eval_round_trip(tiny, capsys):
    base, ckpt = tiny
    ck = load_checkpoint(ckpt)
    assert ck["encoders"]["preset"] == "tiny" and ck["encoders"]["dino"]["model_id"] == "tiny-dino"
    assert ck["epoch"] == 1 and len(ck["vocabulary"]["names"]) == 12
    results = evaluate("custom", str(base / "w"), "all", str(base / "eval"), checkpoint=ckpt, device="cpu",
                       progress=False)
    print(capsys.readouterr().out)
    assert list(results) == ["maskclip", "stage1.1", "stage1.2", "stage1", "fmbseg"]
    for r in results.values():       # random weights: any figure, but a real one
        assert 0.0 <= r["mIoU"] <= 100.0 and 0.0 <= r["aAcc"] <= 100.0 and r["images"] == 3
    saved = json.loads((base / "eval" / "results.json").read_text())
    assert saved["results"]["custom:w"]["fmbseg"]["config"]["checkpoint_train_hash"] == ck["train_hash"]
    assert saved["results"]["custom:w"]["stage1"]["config"]["stage1"]["points_per_side"] == 8   # tiny's override


def test_predict_writes_label_maps_and_overlays(tiny, tmp_path, capsys):
    base, ckpt = tiny
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((base / "w" / "images").iterdir())[:2]):
        (images / ("sub" if i else "") / src.name).write_bytes(src.read_bytes())
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "pred"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red\ngreen: lime, emerald\nblue\n")             # synonyms average their text embeddings
    written = predict_folder(ckpt, str(images), str(vocab), str(out), device="cpu", progress=False)
    err = capsys.readouterr().err
    assert "1 images failed" in err and "broken.png" in err
    assert [p.replace(str(out) + "/", "") for p in written] == ["sub/world_0001.png", "world_0000.png"]
    assert (out / "classes.txt").read_text() == "red\ngreen\nblue\n"
    for p in written:
        stem = p[:-4]
        src = next((base / "w" / "images").glob(stem.rsplit("/", 1)[-1] + ".*"))
        with Image.open(src) as im:
            w, h = im.size
        with Image.open(p) as lab:
            arr = np.array(lab)
        assert arr.shape == (h, w) and arr.max() <= 2
        with Image.open(stem + "_overlay.jpg") as ov:
            assert ov.size[0] == w and ov.size[1] > h       # legend strip under the picture
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        predict_folder(str(tmp_path / "none.pt"), str(images), "red", str(out))
    with pytest.raises(FileNotFoundError, match="no images"):
        (tmp_path / "empty").mkdir()
        predict_folder(ckpt, str(tmp_path / "empty"), "red", str(tmp_path / "p2"))


def test_label_png_round_trip_8_and_16_bit(tmp_path):
    from fmbseg.overlay import save_label_png

    small = np.array([[0, 1], [2, 255]])
    save_label_png(small, str(tmp_path / "a.png"))
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "P" and np.array_equal(np.array(im), small)
    large = np.array([[0, 300], [1000, 65535]])     # more than 256 classes: 16-bit grey
    save_label_png(large, str(tmp_path / "b.png"))
    with Image.open(tmp_path / "b.png") as im:
        assert np.array_equal(np.array(im).astype(np.int64), large)
    with pytest.raises(ValueError, match="0..65535"):
        save_label_png(np.array([[-1]]), str(tmp_path / "c.png"))


# -- predict never touches its inputs (issue 13 item 7) ----------------------------------------------------------
def _copy_images(base, dest, n=2):
    dest.mkdir(parents=True, exist_ok=True)
    srcs = sorted((base / "w" / "images").iterdir())[:n]
    for src in srcs:
        (dest / src.name).write_bytes(src.read_bytes())
    return srcs


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_in_the_input_tree_is_refused_unless_fresh(tiny, tmp_path):
    base, ckpt = tiny
    images = tmp_path / "imgs"
    _copy_images(base, images)
    (images / "old").mkdir()
    (images / "old" / "keep.png").write_bytes((images / "world_0000.png").read_bytes())
    before = _snapshot(images)
    with pytest.raises(ValueError, match="is the input folder"):
        predict_folder(ckpt, str(images), "red,green", str(images), device="cpu", progress=False)
    with pytest.raises(ValueError, match="inside the input folder .* already holds files"):
        predict_folder(ckpt, str(images), "red,green", str(images / "old"), device="cpu", progress=False)
    assert _snapshot(images) == before                               # nothing written, nothing overwritten
    # A fresh subfolder is fine; its outputs are never read back as inputs, so a rerun gives the same files.
    written = predict_folder(ckpt, str(images), "red,green", str(images / "pred"), device="cpu", progress=False)
    assert sorted(os.path.relpath(p, images / "pred") for p in written) == [
        "old/keep.png", "world_0000.png", "world_0001.png"]
    first = _snapshot(images / "pred")
    again = predict_folder(ckpt, str(images), "red,green", str(images / "pred"), device="cpu", progress=False)
    assert again == written and _snapshot(images / "pred") == first
    assert {k: v for k, v in _snapshot(images).items() if k.parts[0] != "pred"} == before


def test_same_stem_long_names_and_failures_each_get_their_own_output(tiny, tmp_path, capsys):
    base, ckpt = tiny
    images = tmp_path / "imgs"
    src = _copy_images(base, images, 1)[0]
    with Image.open(src) as im:
        im.convert("RGB").save(images / "x.jpg", quality=95)
        im.save(images / "x.png")
        w, h = im.size
    long_name = "n" * 246 + ".png"                                   # 250 characters: the overlay's name would be 258
    (images / long_name).write_bytes(src.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    written = predict_folder(ckpt, str(images), "red,green,blue", str(out), device="cpu", progress=False)
    err = capsys.readouterr().err
    names = sorted(os.path.relpath(p, out) for p in written)
    assert len(names) == 4 and "x.jpg.png" in names and "x.png.png" in names and src.name in names
    long_out = next(n for n in names if n.startswith("nnnn"))
    assert len(long_out.encode()) <= 255 and len(long_out) < 250
    for n in names:
        with Image.open(out / n) as lab:
            assert lab.size == (w, h)
        assert (out / (n[:-4] + "_overlay.jpg")).is_file()
    # The report matches what was written: one row per input, the broken one failed with its reason.
    with open(out / "index.csv", newline="") as f:
        rows = {os.path.basename(r["input"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(["x.jpg", "x.png", long_name, "broken.png", src.name])
    assert rows["broken.png"]["status"] == "failed" and rows["broken.png"]["label_map"] == ""
    assert sorted(r["label_map"] for r in rows.values() if r["status"] == "ok") == names
    assert "4 label maps + overlays" in err and "1 images failed" in err and "broken.png" in err


def test_output_stems_are_distinct_and_stay_inside_out():
    from stages.predict import output_stems

    rels = ["a/x.png", "a/x.jpg", "a/X.PNG", "b/x.png", "../../etc/passwd.png", "/abs/y.png", "é" * 150 + ".png"]
    stems = output_stems(rels)
    assert stems[1] == "a/x.jpg" and stems[3] == "b/x"                # x.png / x.jpg keep their extension
    assert stems[0].startswith("a/x.png-") and stems[2].startswith("a/X.PNG-")   # equal but for case: hashed
    assert len({s.casefold() for s in stems}) == len(stems)          # distinct on a case-insensitive disk too
    assert stems[4] == "etc/passwd" and stems[5] == "abs/y"           # never `..` or absolute
    assert len(stems[6].encode()) <= 200 and stems[6].startswith("é" * 90)


def test_write_errors_fail_one_image_but_a_full_disk_stops_the_run(tiny, tmp_path, monkeypatch):
    import errno

    import stages.predict as predict

    base, ckpt = tiny
    images = tmp_path / "imgs"
    _copy_images(base, images, 2)
    out = tmp_path / "out"
    (out / "world_0000.png").mkdir(parents=True)     # a folder where the first label map goes: that image fails
    written = predict_folder(ckpt, str(images), "red,green", str(out), device="cpu", progress=False)
    assert [os.path.basename(p) for p in written] == ["world_0001.png"]
    with open(out / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["failed", "ok"] and "IsADirectoryError" in rows[0]["error"]

    def full_disk(label, path):                      # a real ENOSPC from the kernel, in the writer's place
        with open("/dev/full", "wb") as f:
            f.write(b"\0" * 100_000)

    monkeypatch.setattr(predict, "save_label_png", full_disk)
    with pytest.raises(OSError) as e:
        predict_folder(ckpt, str(images), "red,green", str(tmp_path / "out2"), device="cpu", progress=False)
    assert e.value.errno == errno.ENOSPC
