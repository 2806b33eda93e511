"""The `tiny` preset round trip on CPU (label -> train -> evaluate -> predict with random toy-width models), and
`predict_folder`'s outputs read back with plain Pillow."""

import json

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
    assert "1 images could not be read" in err and "broken.png" in err
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
