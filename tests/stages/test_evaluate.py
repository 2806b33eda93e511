"""Evaluation: the synthetic world end to end with the oracle preset (label -> train -> evaluate on a disjoint
world, every segmenter scored), the reports and their accumulation, and errors raised before any model runs."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from fmbseg.testing.world import write_world
from stages.evaluate import evaluate, resolve_models
from stages.train import TrainConfig, train_alignment


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, label_world):
    """30 labelled world images, alignment trained at DESIGN's settings except a 112-px view and 200 epochs
    (1200 SGD steps of 5 images: TSupCon's text terms weigh K / (M + K), so alignment needs many steps)."""
    base = tmp_path_factory.mktemp("eval")
    write_world(base / "train", 30, seed=1)
    write_world(base / "test", 6, seed=2)               # disjoint: another seed
    label_world(base / "train", base / "camp", shard_size=8)
    ckpt = train_alignment(str(base / "camp"), TrainConfig(epochs=200, train_size=112, cache_features=True,
                                                           device="cpu"), progress=False)
    return base, ckpt


def test_oracle_world_end_to_end(trained, capsys):
    base, ckpt = trained
    out = base / "report"
    results = evaluate("custom", str(base / "test"), "all", str(out), checkpoint=ckpt, device="cpu", progress=False)
    printed = capsys.readouterr().out
    print(printed)
    assert list(results) == ["maskclip", "stage1.1", "stage1.2", "stage1", "fmbseg"]
    for m, r in results.items():
        assert f"custom:test" in printed and m in printed
    print({m: round(r["mIoU"], 2) for m, r in results.items()})
    assert results["fmbseg"]["mIoU"] >= 87.0
    # the oracle CLIP and SAM know the planted answer: the baselines sit near the patch-resolution ceiling
    assert results["maskclip"]["mIoU"] >= 90.0
    assert results["stage1"]["mIoU"] >= 95.0
    for r in results.values():
        assert r["images"] == 6 and set(r["IoU"]) == {"red", "green", "blue", "yellow", "magenta", "cyan", "orange",
                                                     "purple", "gray", "brown", "white", "black"}

    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["custom:test"]["fmbseg"]["mIoU"] == pytest.approx(results["fmbseg"]["mIoU"], abs=1e-3)
    md = (out / "results.md").read_text()
    assert "| model | custom:test |" in md and "| fmbseg |" in md and "## custom:test: per-class IoU" in md
    with Image.open(out / "iou_custom_test.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_reports_accumulate_across_calls(trained, tmp_path):
    base, ckpt = trained
    out = tmp_path / "acc"
    write_world(tmp_path / "other", 2, seed=9, sizes=((200, 260),))
    evaluate("custom", str(base / "test"), ["maskclip"], str(out), preset="oracle", device="cpu", progress=False)
    evaluate("custom", str(tmp_path / "other"), ["maskclip"], str(out), preset="oracle", device="cpu",
             progress=False)
    evaluate("custom", str(base / "test"), ["fmbseg"], str(out), checkpoint=ckpt, device="cpu", progress=False)
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res) == {"custom:test", "custom:other"}
    assert set(res["custom:test"]) == {"maskclip", "fmbseg"} and set(res["custom:other"]) == {"maskclip"}
    md = (out / "results.md").read_text()
    assert "| model | custom:other | custom:test |" in md
    fmb_row = [line for line in md.splitlines() if line.startswith("| fmbseg |")][0]
    assert fmb_row.split("|")[2].strip() == ""          # fmbseg not evaluated on custom:other: empty cell
    # classes absent from a dataset's ground truth and predictions are nan, written as null / "–"
    iou = res["custom:other"]["maskclip"]["IoU"]
    assert any(v is None for v in iou.values())
    assert (out / "iou_custom_other.png").is_file() and (out / "iou_custom_test.png").is_file()


def test_errors_come_before_any_model(tmp_path, monkeypatch):
    import fmbseg.presets

    def no_models(*a, **k):
        raise AssertionError("a model was built before the inputs were checked")

    for name in ("make_clip", "make_sam", "make_dino"):
        monkeypatch.setattr(fmbseg.presets, name, no_models)
    write_world(tmp_path / "w", 2, seed=3, sizes=((100, 120),))
    (tmp_path / "w" / "annotations" / "world_0001.png").unlink()
    with pytest.raises(ValueError, match="1 of 2 images have no annotation"):
        evaluate("custom", str(tmp_path / "w"), "maskclip", str(tmp_path / "o"), device="cpu")
    write_world(tmp_path / "v", 1, seed=3, sizes=((100, 120),))
    (tmp_path / "v" / "classes.txt").write_text("red\ngreen\n")       # the world paints up to 12 classes
    with pytest.raises(ValueError, match="class-count mismatch"):
        evaluate("custom", str(tmp_path / "v"), "maskclip", str(tmp_path / "o"), device="cpu")
    write_world(tmp_path / "ok", 1, seed=3, sizes=((100, 120),))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate("custom", str(tmp_path / "ok"), "fmbseg", str(tmp_path / "o"), checkpoint=str(tmp_path / "no.pt"))
    with pytest.raises(ValueError, match="needs --checkpoint"):
        resolve_models("maskclip,fmbseg", None)
    with pytest.raises(ValueError, match="unknown model"):
        resolve_models("maskclip,sam", None)
    assert resolve_models("all", None) == ["maskclip", "stage1.1", "stage1.2", "stage1"]
    assert resolve_models("all", "x.pt")[-1] == "fmbseg"
    assert not (tmp_path / "o").exists()


def test_nan_handling_in_reports(tmp_path):
    from stages.evaluate import _num, results_markdown

    assert _num(float("nan")) is None and _num(12.345678) == 12.3457
    md = results_markdown({"results": {"d": {"maskclip": {"mIoU": 50.0, "mAcc": None, "aAcc": 1.0,
                                                          "IoU": {"a": None, "b": 50.0}}}}})
    assert "| a | – |" in md and "| b | 50.00 |" in md
    assert not math.isnan(np.nanmean([1.0]))


def test_images_whose_annotation_does_not_fit_are_skipped_and_listed(tmp_path):
    """An annotation of the wrong size, a JPEG whose EXIF orientation turns it upright into another shape and an
    unreadable image: each skipped with a warning and listed in results.json; the other images are scored."""
    w = tmp_path / "w"
    write_world(w, 5, seed=5, sizes=((120, 160),), formats=("png",))
    (w / "images" / "world_0004.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.zeros((100, 160), np.uint8)).save(w / "annotations" / "world_0001.png")
    rgb = np.array(Image.open(w / "images" / "world_0002.png"))
    (w / "images" / "world_0002.png").unlink()
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90°: upright it is 120 wide and 160 tall
    Image.fromarray(rgb).save(w / "images" / "world_0002.jpg", exif=exif.tobytes())
    with pytest.warns(UserWarning) as caught:
        res = evaluate("custom", str(w), ["maskclip"], str(tmp_path / "o"), preset="oracle", device="cpu",
                       progress=False)
    assert [str(c.message).split(":")[1].strip() for c in caught] == ["skipped world_0001", "skipped world_0002",
                                                                       "skipped world_0004"]
    skipped = res["maskclip"]["skipped_images"]
    assert [s["image"] for s in skipped] == ["world_0001", "world_0002", "world_0004"]
    assert "160x120" in skipped[0]["reason"] and "160x100" in skipped[0]["reason"]
    assert "120x160 (upright, after EXIF" in skipped[1]["reason"]
    assert "cannot read the image" in skipped[2]["reason"]
    assert res["maskclip"]["images"] == 2 and res["maskclip"]["mIoU"] > 50
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["results"]["custom:w"]["maskclip"]["skipped_images"] == skipped
    assert saved["skipped_images"]["custom:w"] == skipped
